"""The control plane's state of one request, owned by the control loop."""

from __future__ import annotations

import enum
import time
from dataclasses import dataclass, field, replace

from engine.protocol import FinishReason, NewRequest, Offer, SamplingParams
from server.mailbox import Mailbox
from server.request import Chunk, Final, GenerationRequest, SpeculationSummary
from server.text_stream import TextStream


class Status(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    FINISHED = "finished"


@dataclass(eq=False, slots=True)
class RequestState:
    req_id: str  # unique inside the server (the client's request_id need not be)
    request: GenerationRequest
    prompt_ids: list[int]
    sampling: SamplingParams  # seed filled in
    stop_token_ids: list[int]
    text: TextStream
    deadline_s: float | None = None  # time.monotonic() after which the request is cut short
    mailbox: Mailbox = field(default_factory=Mailbox)
    status: Status = Status.WAITING
    is_in_engine: bool = False  # the engine holds its KV; it must be told when the request ends
    num_prompt_done: int = 0  # prompt tokens prefilled so far
    # An engine died while it ran: it went back to the queue to start again on the next engine
    # (once: a request that kills the engine must not kill every engine after it).
    was_requeued: bool = False
    # Output tokens the next engine reads as prompt: those sent before the engine died, so the
    # stream resumes after them instead of failing.
    num_resumed_ids: int = 0
    # What each drafter could propose for the next step, as of the last result
    offers: dict[str, Offer] = field(default_factory=dict)
    output_ids: list[int] = field(default_factory=list)
    speculation: SpeculationSummary = field(default_factory=SpeculationSummary)
    finish_reason: FinishReason = FinishReason.NONE
    arrival_s: float = field(default_factory=time.monotonic)
    first_token_s: float | None = None
    finished_s: float | None = None

    @property
    def speculation_mode(self) -> int:
        return self.request.speculation_mode

    @property
    def requested_draft_tokens(self) -> int:
        return self.request.num_draft_tokens

    @property
    def requested_drafter(self) -> str:
        return self.request.drafter

    @property
    def num_reserved_tokens(self) -> int:
        """KV rows the engine keeps for this request: its prompt and every token it may generate."""
        return len(self.prompt_ids) + self.request.max_new_tokens

    @property
    def num_tokens(self) -> int:
        """Prompt and generated tokens: what the engine holds in its KV cache, give or take one."""
        return len(self.prompt_ids) + len(self.output_ids)

    @property
    def num_new_tokens_left(self) -> int:
        return self.request.max_new_tokens - len(self.output_ids)

    @property
    def num_engine_prompt_ids(self) -> int:
        """What the engine prefills: the prompt, and on a resumed request the output it had sent."""
        return len(self.prompt_ids) + self.num_resumed_ids

    @property
    def is_prefilling(self) -> bool:
        return self.num_prompt_done < self.num_engine_prompt_ids

    @property
    def num_prompt_left(self) -> int:
        return self.num_engine_prompt_ids - self.num_prompt_done

    def new_request(self) -> NewRequest:
        return NewRequest(
            req_id=self.req_id,
            prompt_token_ids=self.prompt_ids + self.output_ids[: self.num_resumed_ids],
            max_new_tokens=self.request.max_new_tokens - self.num_resumed_ids,
            sampling=self.sampling,
            stop_token_ids=self.stop_token_ids,
        )

    def final(self, now: float) -> Final:
        return Final(
            finish_reason=self.finish_reason,
            num_prompt_tokens=len(self.prompt_ids),
            num_completion_tokens=len(self.output_ids),
            speculation=self.speculation,
            seed=self.sampling.seed,
            time_to_first_token_s=(self.first_token_s - self.arrival_s) if self.first_token_s else 0.0,
            total_s=now - self.arrival_s,
        )

    def end(self, reason: FinishReason, now: float, error: Exception | None = None, step: Chunk | None = None) -> None:
        """Marks the request finished and posts its last chunk: the rest of its text (after the
        tokens of step, the step that ended it, if any), or the error. The one place a last chunk
        is made."""
        self.status = Status.FINISHED
        self.finish_reason = reason
        self.finished_s = now
        text = "" if error else self.text.finish()
        last = step or Chunk("", [])
        self.mailbox.put(replace(last, text=last.text + text, final=self.final(now), error=error))
