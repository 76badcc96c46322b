"""What a client asks for and what it gets back, as domain objects (no protobuf types here)."""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from api.speculation import SpeculationMode
from engine.protocol import FinishReason
from server.errors import InvalidArgumentError

CHAT_ROLES = ("system", "user", "assistant")


@dataclass(frozen=True, slots=True)
class Limits:
    max_new_tokens: int
    max_draft_tokens: int
    max_stop_sequences: int
    max_stop_length: int
    max_prompt_bytes: int = 1 << 20  # UTF-8 bytes of the prompt, or of all messages' contents
    max_messages: int = 8192  # each message renders to at least a token, so the context length is plenty
    drafters: tuple[str, ...] = ("ngram",)  # the engine's, which a FIXED request may name


@dataclass(frozen=True, slots=True)
class ChatMessage:
    role: str
    content: str


@dataclass(frozen=True, slots=True)
class GenerationRequest:
    """A client's request, validated by `validate` before it reaches the scheduler."""

    request_id: str
    prompt: str = ""
    messages: tuple[ChatMessage, ...] = ()
    max_new_tokens: int = 128
    temperature: float = 0.0
    top_p: float = 1.0
    top_k: int = 0
    seed: int | None = None
    stop: tuple[str, ...] = ()
    speculation_mode: int = SpeculationMode.DEFAULT
    num_draft_tokens: int = 0
    drafter: str = ""  # for FIXED: which drafter; "" leaves it to the server

    def validate(self, limits: Limits) -> None:
        """Raises InvalidArgumentError naming the first bad field."""
        validate_input(self.prompt, self.messages, limits, text_field="prompt")
        if not 1 <= self.max_new_tokens <= limits.max_new_tokens:
            raise InvalidArgumentError(
                "max_new_tokens", f"must be in [1, {limits.max_new_tokens}], got {self.max_new_tokens}"
            )
        if not math.isfinite(self.temperature) or self.temperature < 0:
            raise InvalidArgumentError("temperature", f"must be a finite number >= 0, got {self.temperature}")
        if not math.isfinite(self.top_p) or not 0 < self.top_p <= 1:
            raise InvalidArgumentError("top_p", f"must be in (0, 1], got {self.top_p}")
        if self.top_k < 0:
            raise InvalidArgumentError("top_k", f"must be >= 0 (0 turns it off), got {self.top_k}")
        self._validate_stop(limits)
        self._validate_speculation(limits)

    def _validate_stop(self, limits: Limits) -> None:
        if len(self.stop) > limits.max_stop_sequences:
            raise InvalidArgumentError(
                "stop", f"at most {limits.max_stop_sequences} stop sequences, got {len(self.stop)}"
            )
        for i, sequence in enumerate(self.stop):
            if not sequence:
                raise InvalidArgumentError(f"stop[{i}]", "stop sequences must not be empty")
            if len(sequence) > limits.max_stop_length:
                raise InvalidArgumentError(
                    f"stop[{i}]", f"stop sequences are at most {limits.max_stop_length} characters"
                )

    def _validate_speculation(self, limits: Limits) -> None:
        if self.speculation_mode not in SpeculationMode._value2member_map_:
            raise InvalidArgumentError(
                "speculation.mode", f"unknown mode {self.speculation_mode}; use AUTO, OFF or FIXED"
            )
        if self.speculation_mode == SpeculationMode.FIXED:
            if not 1 <= self.num_draft_tokens <= limits.max_draft_tokens:
                raise InvalidArgumentError(
                    "speculation.num_draft_tokens",
                    f"FIXED needs 1 <= num_draft_tokens <= {limits.max_draft_tokens}, got {self.num_draft_tokens}",
                )
            if self.drafter and self.drafter not in limits.drafters:
                raise InvalidArgumentError(
                    "speculation.drafter",
                    f"unknown drafter {self.drafter!r}; this server has {', '.join(limits.drafters) or 'none'}",
                )
        elif self.num_draft_tokens != 0:
            raise InvalidArgumentError("speculation.num_draft_tokens", "is only used with mode FIXED")
        elif self.drafter:
            raise InvalidArgumentError(
                "speculation.drafter", "is only used with mode FIXED (AUTO picks the drafter per step)"
            )


def validate_input(text: str, messages: tuple[ChatMessage, ...], limits: Limits, text_field: str) -> None:
    """Exactly one of a text and chat messages, with known roles, within the size limit.

    The size is checked in bytes before anything tokenizes it: cheap, and enough to keep a huge
    prompt from costing seconds of tokenizer time when it could never fit the context anyway.
    """
    if bool(text) == bool(messages):
        which = "both are set" if text else "neither is set"
        raise InvalidArgumentError(text_field, f"give exactly one of {text_field} and messages ({which})")
    for i, message in enumerate(messages):
        if message.role not in CHAT_ROLES:
            raise InvalidArgumentError(
                f"messages[{i}].role", f"must be one of {', '.join(CHAT_ROLES)}, got {message.role!r}"
            )
    num_bytes = len(text.encode()) if text else sum(len(m.content.encode()) for m in messages)
    if num_bytes > limits.max_prompt_bytes:
        raise InvalidArgumentError(
            text_field if text else "messages",
            f"is {num_bytes} bytes; this server takes at most {limits.max_prompt_bytes} "
            "(more could not fit the model's context; --max-prompt-bytes)",
        )


@dataclass(slots=True)
class DrafterUsage:
    num_steps: int = 0  # decoding steps it drafted in
    num_drafted: int = 0
    num_accepted: int = 0

    def add(self, num_drafted: int, num_accepted: int) -> None:
        self.num_steps += 1
        self.num_drafted += num_drafted
        self.num_accepted += num_accepted


@dataclass(slots=True)
class SpeculationSummary:
    num_steps: int = 0  # decoding steps (the token that ends a prefill is not counted here)
    num_generated: int = 0  # tokens those steps produced
    num_drafted: int = 0
    num_accepted: int = 0
    draft_lengths: list[int] = field(default_factory=list)  # k planned at each step
    by_drafter: dict[str, DrafterUsage] = field(default_factory=dict)

    def add_step(self, drafter: str, num_generated: int, num_drafted: int, num_accepted: int) -> None:
        """A decoding step; drafter is who drafted in it ("" for none)."""
        self.num_steps += 1
        self.num_generated += num_generated
        self.num_drafted += num_drafted
        self.num_accepted += num_accepted
        self.draft_lengths.append(num_drafted)  # what was verified: the plan may ask for more
        if drafter:
            self.by_drafter.setdefault(drafter, DrafterUsage()).add(num_drafted, num_accepted)

    @property
    def mean_accepted_length(self) -> float:
        """Tokens per step, the bonus token included; 1.0 means speculation gained nothing."""
        return self.num_generated / self.num_steps if self.num_steps else 0.0


@dataclass(frozen=True, slots=True)
class Final:
    """What the last chunk carries."""

    finish_reason: FinishReason
    num_prompt_tokens: int
    num_completion_tokens: int
    speculation: SpeculationSummary
    seed: int
    time_to_first_token_s: float
    total_s: float


@dataclass(frozen=True, slots=True)
class Chunk:
    """One engine step's worth of a request's output, or its end."""

    text: str
    token_ids: list[int]
    num_drafted: int = 0
    num_accepted: int = 0
    final: Final | None = None
    error: Exception | None = None  # the request failed; raised to the client instead of a chunk
    step_finished_s: float = 0.0  # time.monotonic() at the end of the engine step that made it
