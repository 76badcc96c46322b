"""Hand-made stand-ins for scheduler tests: no model, no engine process."""

from __future__ import annotations

from engine.protocol import FinishReason, RequestOutput, SamplingParams, StepResult
from server.request import GenerationRequest
from server.request_state import RequestState
from server.text_stream import TextStream


class CharTokenizer:
    """Token id i decodes to chr(i): enough for the text stream's bookkeeping."""

    def decode(self, token_ids: list[int], skip_special_tokens: bool = True) -> str:
        return "".join(chr(i) for i in token_ids if not (skip_special_tokens and i == 0))


def make_state(
    req_id: str,
    prompt_len: int,
    max_new_tokens: int = 16,
    stop: tuple[str, ...] = (),
    deadline_s: float | None = None,
    mode: int = 0,
    k: int = 0,
) -> RequestState:
    request = GenerationRequest(
        request_id=req_id,
        prompt="x",
        max_new_tokens=max_new_tokens,
        stop=stop,
        speculation_mode=mode,
        num_draft_tokens=k,
    )
    return RequestState(
        req_id=req_id,
        request=request,
        prompt_ids=list(range(1, prompt_len + 1)),
        sampling=SamplingParams(seed=1),
        stop_token_ids=[0],
        text=TextStream(CharTokenizer(), stop),  # type: ignore[arg-type]
        deadline_s=deadline_s,
    )


def result(step_id: int, *outputs: tuple[str, list[int], int, int, FinishReason]) -> StepResult:
    return StepResult(step_id, [RequestOutput(r, ids, d, a, f) for r, ids, d, a, f in outputs], finished_at_s=1.0)
