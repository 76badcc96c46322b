"""Server-wide statistics for GetStats and Prometheus, fed by the control loop."""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Mapping
from dataclasses import dataclass, field

from engine.protocol import FinishReason, StepPlan, StepResult
from server.metrics import Metrics
from server.request import DrafterUsage
from server.request_state import RequestState

RECENT_STEPS = 200


@dataclass
class ServerStats:
    max_draft_tokens: int
    metrics: Metrics = field(default_factory=Metrics)
    started_s: float = field(default_factory=time.monotonic)
    num_finished: int = 0
    num_prompt_tokens: int = 0
    num_generated_tokens: int = 0
    num_steps: int = 0
    num_drafted: int = 0
    num_accepted: int = 0
    num_decode_steps: int = 0  # request-steps that decoded (with or without drafts)
    num_decode_tokens: int = 0  # tokens those produced
    num_engine_restarts: int = 0
    drafted_per_position: list[int] = field(default_factory=list)
    accepted_per_position: list[int] = field(default_factory=list)
    drafts_per_length: list[int] = field(default_factory=list)
    recent_step_s: deque[float] = field(default_factory=lambda: deque(maxlen=RECENT_STEPS))
    recent_draft_s: deque[float] = field(default_factory=lambda: deque(maxlen=RECENT_STEPS))  # steps it ran
    recent_overhead: deque[float] = field(default_factory=lambda: deque(maxlen=RECENT_STEPS))
    recent_chunk_handed_s: deque[float] = field(default_factory=lambda: deque(maxlen=RECENT_STEPS))
    recent_chunk_written_s: deque[float] = field(default_factory=lambda: deque(maxlen=RECENT_STEPS))
    by_drafter: dict[str, DrafterUsage] = field(default_factory=dict)  # request-steps each drafted for
    # each drafter's time per step it ran in (a draft model's prefill-only steps too)
    recent_draft_s_by_drafter: dict[str, deque[float]] = field(default_factory=dict)

    def __post_init__(self) -> None:
        n = self.max_draft_tokens
        self.drafted_per_position = [0] * n
        self.accepted_per_position = [0] * n
        self.drafts_per_length = [0] * (n + 1)

    def observe_step(
        self, plan: StepPlan, result: StepResult, decoding: Mapping[str, str], is_back_to_back: bool
    ) -> None:
        """One engine step. is_back_to_back: the loop sent this plan right after the previous result,
        so the engine's idle time before it was control-plane and IPC overhead, not a lack of work.
        decoding: the requests this step decoded (the rest prefilled), each with its drafter ("" for none)."""
        m = self.metrics
        self.num_steps += 1
        m.steps.inc()
        m.batch_size.set(len(plan.scheduled))
        timings = result.timings
        self.recent_step_s.append(timings.step_s)
        m.step_seconds.observe(timings.step_s)
        if timings.draft_s > 0:
            self.recent_draft_s.append(timings.draft_s)
        for run in result.draft_runs:
            recent = self.recent_draft_s_by_drafter.setdefault(run.drafter, deque(maxlen=RECENT_STEPS))
            recent.append(run.seconds)
            m.draft_seconds.labels(drafter=run.drafter).observe(run.seconds)
        if is_back_to_back:
            self.recent_overhead.append(timings.idle_s / (timings.idle_s + timings.step_s))
        for new in plan.new_requests:
            self.num_prompt_tokens += len(new.prompt_token_ids)
            m.prompt_tokens.inc(len(new.prompt_token_ids))
        for output in result.outputs:
            num_new = len(output.new_token_ids)
            self.num_generated_tokens += num_new
            m.generated_tokens.inc(num_new)
            drafter = decoding.get(output.req_id)
            if drafter is not None:
                self._observe_decode(drafter, num_new, output.num_drafted, output.num_accepted)

    def _observe_decode(self, drafter: str, num_new: int, num_drafted: int, num_accepted: int) -> None:
        m = self.metrics
        self.num_decode_steps += 1
        self.num_decode_tokens += num_new
        # What the step drafted, not the k planned: FIXED plans k whether or not the drafter has a proposal.
        self.drafts_per_length[min(num_drafted, self.max_draft_tokens)] += 1
        m.draft_length.observe(num_drafted)
        self.num_drafted += num_drafted
        self.num_accepted += num_accepted
        if drafter:
            self.by_drafter.setdefault(drafter, DrafterUsage()).add(num_drafted, num_accepted)
            m.draft_tokens.labels(drafter=drafter).inc(num_drafted)
            m.accepted_tokens.labels(drafter=drafter).inc(num_accepted)
        for i in range(min(num_drafted, self.max_draft_tokens)):
            self.drafted_per_position[i] += 1
        for i in range(min(num_accepted, self.max_draft_tokens)):
            self.accepted_per_position[i] += 1
            m.accepted_per_position.labels(position=str(i + 1)).inc()

    def observe_finished(self, state: RequestState) -> None:
        m = self.metrics
        self.num_finished += 1
        m.requests.labels(finish_reason=FinishReason(state.finish_reason).name).inc()
        if state.first_token_s is not None:
            m.ttft_seconds.observe(state.first_token_s - state.arrival_s)
        if state.finished_s is not None:
            m.request_seconds.observe(state.finished_s - state.arrival_s)

    def observe_chunk_delay(self, handed_s: float, written_s: float) -> None:
        """From the end of the engine step that made a chunk to its handing to gRPC, and to gRPC
        having written it to the transport."""
        self.recent_chunk_handed_s.append(handed_s)
        self.recent_chunk_written_s.append(written_s)

    @property
    def mean_accepted_length(self) -> float:
        return self.num_decode_tokens / self.num_decode_steps if self.num_decode_steps else 0.0

    @property
    def uptime_s(self) -> float:
        return time.monotonic() - self.started_s


def mean(values: deque[float]) -> float:
    return sum(values) / len(values) if values else 0.0
