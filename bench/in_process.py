"""The server's scheduler and speculation policy driving an engine in this process.

`bench engine` runs every one of our batch-1 variants through this: the same planning, policy
and bookkeeping a served request gets (AUTO included, with its start-up profile), without gRPC
and without the process boundary, so what is compared with transformers is the engine and the
control plane's decisions, not transport.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import anyio

from api.speculation import SpeculationMode
from engine.profile import profile_steps
from engine.protocol import EngineReady, SamplingParams, StepSample
from engine.runner import ModelRunner
from server.app import build_policy, scheduler_limits, start_up_profile_shapes
from server.config import ServerConfig
from server.policy.profile import REPEATS
from server.request import GenerationRequest, SpeculationSummary
from server.request_state import RequestState, Status
from server.scheduler import Scheduler
from server.text_stream import TextStream
from server.tokenizer import TextTokenizer


@dataclass(frozen=True, slots=True)
class Outcome:
    output_ids: list[int]
    seconds: float  # arrival to last token
    first_token_s: float  # arrival to first token (the prefill, mostly)
    speculation: SpeculationSummary  # the request's, as its response would report it


class InProcessServer:
    """One server's control plane (its own policy, with what it learns) over a shared runner."""

    def __init__(
        self, runner: ModelRunner, ready: EngineReady, tokenizer: TextTokenizer, config: ServerConfig | None = None
    ) -> None:
        self.runner, self.ready, self.tokenizer = runner, ready, tokenizer
        self.config = config or ServerConfig()
        self.policy = build_policy(self.config, ready)
        self.scheduler = Scheduler(scheduler_limits(self.config, ready), self.policy)
        self.num_requests = 0

    def profile(self) -> dict[str, list[StepSample]]:
        """The server's start-up profile: the target's steps ("") and each draft model's forwards."""
        shapes = start_up_profile_shapes(self.config, self.ready)
        return {
            drafter: profile_steps(self.runner, shapes, REPEATS, drafter)
            for drafter in ["", *self.ready.model_drafters]
        }

    def warm(self, profile: dict[str, list[StepSample]]) -> None:
        for drafter, samples in profile.items():
            self.policy.warm([(s.shape, s.step_s) for s in samples], drafter)

    def generate(
        self,
        prompt_ids: list[int],
        max_new_tokens: int,
        mode: SpeculationMode = SpeculationMode.AUTO,
        num_draft_tokens: int = 0,
        drafter: str = "",
    ) -> Outcome:
        """One greedy request, alone, as the server would run it."""
        (outcome,), _ = self.generate_batch([prompt_ids], max_new_tokens, mode, num_draft_tokens, drafter)
        return outcome

    def generate_batch(
        self,
        prompts: list[list[int]],
        max_new_tokens: int,
        mode: SpeculationMode = SpeculationMode.AUTO,
        num_draft_tokens: int = 0,
        drafter: str = "",
        num_prefilled_tokens: int = 0,
    ) -> tuple[list[Outcome], float]:
        """Greedy requests arriving together, run to the end as one continuous batch. Returns
        their outcomes and the seconds from the step that gave every request its first token to
        the last step (the decoding phase). num_prefilled_tokens: prompt tokens the engine already
        holds for each request (see bench/longctx.py), so the control plane plans no prefill for them."""
        return anyio.run(
            self._generate_batch, prompts, max_new_tokens, mode, num_draft_tokens, drafter, num_prefilled_tokens
        )

    def new_state(
        self,
        prompt_ids: list[int],
        max_new_tokens: int,
        mode: SpeculationMode,
        num_draft_tokens: int = 0,
        drafter: str = "",
        num_prefilled_tokens: int = 0,
    ) -> RequestState:
        """A greedy request as the service would hand it to the scheduler."""
        self.num_requests += 1
        req_id = f"bench-{self.num_requests}"
        request = GenerationRequest(
            request_id=req_id,
            prompt="(token ids)",
            max_new_tokens=max_new_tokens,
            speculation_mode=mode,
            num_draft_tokens=num_draft_tokens,
            drafter=drafter,
        )
        return RequestState(
            req_id=req_id,
            request=request,
            prompt_ids=prompt_ids,
            sampling=SamplingParams(),
            stop_token_ids=list(self.ready.eos_token_ids),
            text=TextStream(self.tokenizer, ()),
            num_prompt_done=min(num_prefilled_tokens, len(prompt_ids) - 1),
        )

    def step(self) -> None:
        """One plan through the engine and back, as the control loop runs it."""
        plan = self.scheduler.schedule()
        if plan is None:
            raise RuntimeError("the scheduler has nothing to run")
        result = self.runner.step(plan)
        self.scheduler.update(result)
        self.scheduler.observe_step(result)
        self.scheduler.take_finished()

    def release_finished(self) -> None:
        """Sends the plan that tells the engine which requests ended, if there is one."""
        plan = self.scheduler.schedule()
        if plan is not None:
            self.runner.step(plan)

    async def _generate_batch(
        self,
        prompts: list[list[int]],
        max_new_tokens: int,
        mode: SpeculationMode,
        num_draft_tokens: int,
        drafter: str,
        num_prefilled_tokens: int,
    ) -> tuple[list[Outcome], float]:
        states = [
            self.new_state(ids, max_new_tokens, mode, num_draft_tokens, drafter, num_prefilled_tokens)
            for ids in prompts
        ]
        started = time.perf_counter()
        first_token_s: dict[str, float] = {}
        last_token_s: dict[str, float] = {}
        for state in states:
            self.scheduler.add(state)
        while any(state.status != Status.FINISHED for state in states):
            self.step()
            now = time.perf_counter() - started
            for state in states:
                if state.output_ids:
                    first_token_s.setdefault(state.req_id, now)
                if state.status == Status.FINISHED:
                    last_token_s.setdefault(state.req_id, now)
        ended = time.perf_counter() - started
        self.release_finished()
        outcomes = [
            Outcome(
                list(s.output_ids), last_token_s.get(s.req_id, ended), first_token_s.get(s.req_id, ended), s.speculation
            )
            for s in states
        ]
        return outcomes, ended - max(first_token_s.values(), default=ended)
