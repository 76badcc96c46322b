"""Continuous batching: which requests run in the next engine step, and with how many tokens.

Requests join and leave between steps. A request is admitted when a batch slot is free and the
KV budget can hold its prompt plus its max_new_tokens (the engine reserves exactly that), in
arrival order, except that a later request may pass a head that does not fit when it delays
the head in no way (backfilling, see admission.py). A request that could not start before its
deadline is refused at once.

Each step gives every decoding request one token, fills the step's token budget with prefill
chunks (so a long prompt is prefilled over several steps while running streams keep flowing),
and leaves the rest to draft tokens, whose number per request the speculation policy chooses
knowing the prefill's cost. While requests decode, prefill chunks are also cut by time
(prefill_cap.py): at least one token a step, unless steps with prefill ran over that bound as
measured, and the steps since have not made up for it.
"""

from __future__ import annotations

import math
import time
from collections import deque
from collections.abc import Iterable
from dataclasses import dataclass

from engine.protocol import (
    BatchShape,
    FinishReason,
    NewRequest,
    Offer,
    RequestOutput,
    ScheduledRequest,
    StepPlan,
    StepResult,
    max_draft_len,
)
from server.admission import Job, Pace, estimate_start, select
from server.errors import DeadlineExceededError, EngineFailedError, ResourceExhaustedError
from server.policy import PolicySettings, PolicyUpdate, SpeculationPolicy
from server.policy.goodput import StepBase
from server.policy.speculation import NO_DRAFT
from server.prefill_cap import PrefillCap, largest_within
from server.request import Chunk
from server.request_state import RequestState, Status


@dataclass(frozen=True, slots=True)
class SchedulerLimits:
    max_running: int
    max_waiting: int
    max_step_tokens: int
    kv_capacity_tokens: int
    max_prefill_slowdown: float = 0.0  # 0: prefill chunks fill the token budget, whatever they cost


class Scheduler:
    """Owns the queue, the batch and the speculation policy, which nothing else feeds."""

    def __init__(self, limits: SchedulerLimits, policy: SpeculationPolicy) -> None:
        self.limits = limits
        self.policy = policy
        self.waiting: deque[RequestState] = deque()
        self.running: dict[str, RequestState] = {}
        self.num_reserved_tokens = 0
        self.finished_in_engine: list[str] = []  # ended here; the next plan tells the engine
        # The requests the current plan decodes (the rest prefill), each with who drafts for it ("" for k = 0)
        self.decoding: dict[str, str] = {}
        self.undrafted_shape = BatchShape()  # the last plan's step before drafts
        self.just_finished: list[RequestState] = []  # for stats and logs; see take_finished
        self.step_id = 0
        self.pace = Pace()
        self.prefill_cap = PrefillCap(limits.max_prefill_slowdown)
        self.is_prefilling_beside_decodes = False  # the last plan's kind, for prefill_cap

    @property
    def has_work(self) -> bool:
        return bool(self.waiting or self.running or self.finished_in_engine)

    def add(self, state: RequestState, now: float | None = None) -> None:
        """Queues a request, or refuses it with ResourceExhaustedError saying why."""
        need = state.num_reserved_tokens
        if need > self.limits.kv_capacity_tokens:
            raise ResourceExhaustedError(
                f"the request needs {need} KV tokens (prompt + max_new_tokens) but the server holds "
                f"{self.limits.kv_capacity_tokens} in all; shorten the prompt or lower max_new_tokens"
            )
        if len(self.waiting) >= self.limits.max_waiting:
            raise ResourceExhaustedError(f"the waiting queue is full ({self.limits.max_waiting} requests); retry later")
        self._refuse_if_late(state, time.monotonic() if now is None else now)
        self.waiting.append(state)

    def _refuse_if_late(self, state: RequestState, now: float) -> None:
        """Refuses a request that, by the running requests' expected progress, cannot start in time."""
        if state.deadline_s is None or state.deadline_s <= now:
            return  # none, or already passed: the loop ends it as DEADLINE
        is_room_now = len(self.running) < self.limits.max_running and (
            self.num_reserved_tokens + state.num_reserved_tokens <= self.limits.kv_capacity_tokens
        )
        if is_room_now and not self.waiting:
            return  # it starts at the next step: no need to walk the queue
        budget_steps = (state.deadline_s - now) / self.pace.step_s
        start = estimate_start(
            self._jobs([state])[0],
            self._jobs(self.waiting),
            self._jobs(self.running.values()),
            self.limits.kv_capacity_tokens - self.num_reserved_tokens,
            self.limits.max_running - len(self.running),
            give_up_at=budget_steps,
        )
        if start is None or start <= budget_steps:
            return  # in time, or too far to tell cheaply: the deadline ends it if need be
        share = self.num_reserved_tokens / self.limits.kv_capacity_tokens
        raise ResourceExhaustedError(
            f"the server is too busy to start this request within its deadline ({state.deadline_s - now:.1f} s): "
            f"{len(self.running)} running, {len(self.waiting)} waiting, {share:.0%} of the KV budget reserved, "
            f"{self.pace.step_s * 1000:.0f} ms a step; retry later or with a later deadline"
        )

    def _jobs(self, states: Iterable[RequestState]) -> list[Job]:
        """The requests as admission sees them (see admission.py).

        Prefill shares each step's token budget, first come first served, and gets at least what
        a full batch of decodes leaves; a prompt waits at most for every prompt already being
        prefilled, so that bound holds whatever its place.
        """
        num_backlog = sum(s.num_prompt_left for s in self.running.values())
        min_prefill = max(1, self.limits.max_step_tokens - self.limits.max_running)
        return [
            self._job(
                state, math.ceil((num_backlog + state.num_prompt_left) / min_prefill) if state.is_prefilling else 0
            )
            for state in states
        ]

    def _job(self, state: RequestState, num_prefill_steps: int) -> Job:
        num_left = state.num_new_tokens_left
        num_expected = self.pace.length_share * state.request.max_new_tokens - len(state.output_ids)
        tokens_per_step = state.speculation.mean_accepted_length or 1.0
        return Job(
            state.num_reserved_tokens,
            max_steps=num_prefill_steps + num_left,
            expected_steps=num_prefill_steps + min(num_left, max(1.0, num_expected)) / tokens_per_step,
        )

    def take_finished(self) -> list[RequestState]:
        finished, self.just_finished = self.just_finished, []
        return finished

    def abort(self, req_id: str, reason: FinishReason, now: float) -> RequestState | None:
        """Ends a waiting or running request (cancel, deadline); returns it, or None if unknown."""
        for state in self.waiting:
            if state.req_id == req_id:
                self.waiting.remove(state)
                self._finish(state, reason, now)
                return state
        running = self.running.get(req_id)
        if running is not None:
            self._finish(running, reason, now)
        return running

    def expire(self, now: float) -> list[RequestState]:
        expired = [s for s in [*self.waiting, *self.running.values()] if s.deadline_s and s.deadline_s <= now]
        for state in expired:
            self.abort(state.req_id, FinishReason.DEADLINE, now)
        return expired

    def release_running(self, error: Exception) -> None:
        """The engine is gone with everything it held. Each running request goes back to the head
        of the queue, in order, to go on on the next engine: from the start, or, when it has sent
        tokens, after them (the engine reads them as prompt), so its stream only pauses. Once only:
        one that was requeued before fails with error (a request that kills the engine must not
        kill every engine after it). The waiting ones keep their place."""
        now = time.monotonic()
        requeued = []
        for state in list(self.running.values()):
            state.is_in_engine = False
            if state.was_requeued:
                self._finish(state, FinishReason.CANCELLED, now, error)
                continue
            del self.running[state.req_id]
            self.num_reserved_tokens -= state.num_reserved_tokens
            state.status, state.num_prompt_done, state.was_requeued = Status.WAITING, 0, True
            state.num_resumed_ids = len(state.output_ids)
            state.offers = {}  # the next engine's drafters have offered nothing yet
            self.policy.forget(state.req_id)
            requeued.append(state)
        self.waiting.extendleft(reversed(requeued))
        self.finished_in_engine.clear()

    def fail_all_waiting(self, error: Exception) -> None:
        """No engine will run them: end every waiting request with error."""
        now = time.monotonic()
        while self.waiting:
            self._finish(self.waiting.popleft(), FinishReason.CANCELLED, now, error)

    def schedule(self) -> StepPlan | None:
        """The next step's plan, or None when there is nothing to send."""
        new = self._admit()
        decoding = [s for s in self.running.values() if not s.is_prefilling]
        # Prefill chunks take what one token per decoding request leaves; drafts come on top.
        budget = self.limits.max_step_tokens - len(decoding)
        chunks = self._prefill_chunks(decoding, budget)
        budget -= sum(n for _, n in chunks)
        base = self._base(decoding, chunks, budget)
        self.undrafted_shape = base.shape
        chosen = self.policy.choose(decoding, base)
        scheduled = []
        self.decoding = {}
        for state in decoding:
            drafter, k = chosen.get(state.req_id, NO_DRAFT)
            k = max_draft_len(k, state.num_new_tokens_left, step_budget=budget)
            budget -= k
            self.decoding[state.req_id] = drafter if k else ""
            wants_offers = self.policy.plans_with_offers(state)
            drafter = self.decoding[state.req_id]
            scheduled.append(
                ScheduledRequest(state.req_id, num_draft_tokens=k, drafter=drafter, wants_offers=wants_offers)
            )
        if chunks and any(s.num_draft_tokens for s in scheduled):
            chunks = self._grow_beside_drafts(decoding, scheduled, chunks, budget)
            self.undrafted_shape = self._base(decoding, chunks, 0).shape
        for state, chunk in chunks:
            state.num_prompt_done += chunk
            wants_offers = self.policy.plans_with_offers(state)
            scheduled.append(ScheduledRequest(state.req_id, num_prompt_tokens=chunk, wants_offers=wants_offers))
        if not (new or scheduled or self.finished_in_engine):
            return None
        self.step_id += 1
        sure_match_lens = self.policy.sure_match_lens() if any(s.wants_offers for s in scheduled) else {}
        plan = StepPlan(self.step_id, new, scheduled, self.finished_in_engine, sure_match_lens)
        self.finished_in_engine = []
        return plan

    def _prefill_chunks(self, decoding: list[RequestState], budget: int) -> list[tuple[RequestState, int]]:
        """The prompt tokens each prefilling request runs this step, first come first served."""
        decode_kv = [(1, s.num_tokens) for s in decoding]
        max_step_s = None
        if decoding:
            max_step_s = self.prefill_cap.max_step_s(self.policy.predict_step_s, BatchShape.of(decode_kv))
            if self.prefill_cap.is_overrun:  # earlier steps with prefill ran over: this one makes up
                self.is_prefilling_beside_decodes = False
                return []
        else:
            self.prefill_cap.forgive()
        chunks: list[tuple[RequestState, int]] = []
        for state in self.running.values():
            if not state.is_prefilling or budget <= 0:
                continue
            num_tokens = min(state.num_prompt_left, budget)
            if max_step_s is not None:
                planned = decode_kv + [(n, s.num_prompt_done + n) for s, n in chunks]
                num_tokens = self._largest_chunk(state, planned, num_tokens, max_step_s, minimum=0 if chunks else 1)
                if num_tokens == 0:
                    break
            chunks.append((state, num_tokens))
            budget -= num_tokens
        self.is_prefilling_beside_decodes = bool(decoding and chunks)
        return chunks

    def _grow_beside_drafts(
        self,
        decoding: list[RequestState],
        scheduled: list[ScheduledRequest],
        chunks: list[tuple[RequestState, int]],
        budget: int,
    ) -> list[tuple[RequestState, int]]:
        """Drafts lengthen the decodes' step, and a prompt may slow that step as much as a plain
        one: the chunks grow to the bound on the drafted step (and the token budget left). Cut
        to the plain step's bound, a prompt beside drafts moved as many tokens a step as beside
        plain decoding in steps up to twice as long: 16 completions arriving together under AUTO
        kept 5-7 running where OFF grew to 12, and all started a second later (after 5.7-6.2 s
        against OFF's 4.5-5.2, float32)."""
        if self.prefill_cap.max_slowdown <= 0:
            return chunks  # no cap: they already fill the token budget
        drafted = [
            (1 + s.num_draft_tokens, state.num_tokens + s.num_draft_tokens)
            for s, state in zip(scheduled, decoding, strict=True)
        ]
        decode_s = self.policy.predict_step_s(BatchShape.of(drafted))
        if decode_s is None:
            return chunks
        limit = self.prefill_cap.bound_s(decode_s)
        grown = list(chunks)
        for i, (state, num_tokens) in enumerate(grown):
            planned = drafted + [(n, s.num_prompt_done + n) for j, (s, n) in enumerate(grown) if j != i]
            upper = min(state.num_prompt_left, num_tokens + budget)
            more = self._largest_chunk(state, planned, upper, limit, minimum=num_tokens)
            budget -= more - num_tokens
            grown[i] = (state, more)
        return grown

    def _largest_chunk(
        self, state: RequestState, planned: list[tuple[int, int]], upper: int, max_step_s: float, minimum: int
    ) -> int:
        """The most prompt tokens of state, up to upper, that keep the step with the planned
        (query, KV) sequences within max_step_s, as predicted (at least minimum)."""

        def step_s(n: int) -> float:
            return self.policy.predict_step_s(BatchShape.of([*planned, (n, state.num_prompt_done + n)])) or 0.0

        return largest_within(upper, step_s, max_step_s, minimum)

    def _base(self, decoding: list[RequestState], chunks: list[tuple[RequestState, int]], room: int) -> StepBase:
        """The step as it stands before drafts, for the goodput policy."""
        # A decode token attends to the whole sequence; a chunk of n prompt tokens to what is
        # prefilled so far plus itself.
        prefill = tuple((n, s.num_prompt_done + n) for s, n in chunks)
        kv_tokens = [(1, s.num_tokens) for s in decoding] + list(prefill)
        num_prefilling = sum(s.is_prefilling for s in self.running.values())
        shape = BatchShape.of(kv_tokens)
        return StepBase(shape, float(len(decoding)), room, len(self.waiting), prefill, num_prefilling)

    def _admit(self) -> list[NewRequest]:
        num_free_slots = self.limits.max_running - len(self.running)
        if not self.waiting or num_free_slots < 1:
            return []
        queue = list(self.waiting)
        ends = [(job.max_steps, job.num_tokens) for job in self._jobs(self.running.values())]
        num_free_tokens = self.limits.kv_capacity_tokens - self.num_reserved_tokens
        chosen = select(self._jobs(queue), ends, num_free_tokens, num_free_slots)
        new = []
        for i in chosen:
            state = queue[i]
            state.status, state.is_in_engine = Status.RUNNING, True
            self.running[state.req_id] = state
            self.num_reserved_tokens += state.num_reserved_tokens
            new.append(state.new_request())
        if chosen:
            started = set(chosen)
            self.waiting = deque(state for i, state in enumerate(queue) if i not in started)
        return new

    def apply_policy(self, update: PolicyUpdate) -> PolicySettings:
        """Admin.SetPolicy, through the control loop; InvalidArgumentError leaves the settings as they were."""
        return self.policy.apply(update)

    def update(self, result: StepResult) -> None:
        """Applies the engine's step result to each request, then posts the request's chunk."""
        now = time.monotonic()
        for output in result.outputs:
            state = self.running.get(output.req_id)
            if state is None:
                continue  # ended while the step ran; the engine is told in the next plan
            if output.finish_reason == FinishReason.ERROR:
                state.is_in_engine = False
                self._finish(state, FinishReason.CANCELLED, now, EngineFailedError(output.error))
                continue
            text = self._apply(state, output, now)
            step = Chunk(
                text,
                output.new_token_ids,
                output.num_drafted,
                output.num_accepted,
                step_finished_s=result.finished_at_s,
            )
            self._emit(state, FinishReason(output.finish_reason), step, now)

    def observe_step(self, result: StepResult) -> None:
        """Tells admission's pace and the policy how long the step took. Apart from update, so the
        loop can first let the handlers send the step's chunks: every 25 steps this refits the cost
        model (about a millisecond). A plan that only released requests ran no forward: it says
        nothing about how long steps take."""
        if result.shape.num_tokens == 0:
            return
        timings = result.timings
        self.pace.observe_step(timings.step_s)
        if self.decoding and not any(run.forwards for run in result.draft_runs):  # no draft model's time in it
            predicted_s = self.policy.predict_step_s(result.shape)
            undrafted_s = self.policy.predict_step_s(self.undrafted_shape)
            draft_s = max(0.0, predicted_s - undrafted_s) if predicted_s and undrafted_s else 0.0
            self.prefill_cap.observe(predicted_s, timings.step_s, self.is_prefilling_beside_decodes, draft_s)
        self.policy.observe_step(result.shape, timings.step_s, result.draft_runs)

    def _apply(self, state: RequestState, output: RequestOutput, now: float) -> str:
        """The step's tokens join the request, its draft is counted; returns their text."""
        planned_with, state.offers = state.offers, dict(zip(self.policy.drafters, output.offers, strict=False))
        if not output.new_token_ids:
            return ""
        state.first_token_s = state.first_token_s or now
        state.output_ids.extend(output.new_token_ids)
        drafter = self.decoding.get(state.req_id)
        if drafter is not None:  # the token that ends a prefill is no draft step
            self._count_draft(state, drafter, planned_with, output)
        return state.text.push(output.new_token_ids)

    def _emit(self, state: RequestState, reason: FinishReason, step: Chunk, now: float) -> None:
        """Posts the step's chunk, or ends the request with it when the engine or a stop sequence ended it."""
        if reason != FinishReason.NONE:
            state.is_in_engine = False  # the engine freed it itself
        elif state.text.is_stopped:
            reason = FinishReason.STOP
        if reason != FinishReason.NONE:
            self._finish(state, reason, now, step=step)
        elif step.token_ids:
            state.mailbox.put(step)

    def _count_draft(
        self, state: RequestState, drafter: str, planned_with: dict[str, Offer], output: RequestOutput
    ) -> None:
        """A decoding step's speculation figures; planned_with: the drafters' offers its k was
        chosen from. The policy learns from the draft, and from how the other drafters' offers
        would have fared."""
        if drafter:
            offer = planned_with.get(drafter, Offer())
            self.policy.observe_draft(state.req_id, drafter, offer, output.num_drafted, output.num_accepted)
        for outcome in output.offer_outcomes:
            offer = planned_with.get(outcome.drafter, Offer())
            self.policy.observe_draft(state.req_id, outcome.drafter, offer, outcome.num_tested, outcome.num_passed)
        state.speculation.add_step(drafter, len(output.new_token_ids), output.num_drafted, output.num_accepted)

    def _finish(
        self,
        state: RequestState,
        reason: FinishReason,
        now: float,
        error: Exception | None = None,
        step: Chunk | None = None,
    ) -> None:
        """Ends a request: it leaves the batch, its KV reservation is released, and it posts its last
        chunk (with step, the chunk of the step that ended it)."""
        if state.status == Status.RUNNING:
            del self.running[state.req_id]
            self.num_reserved_tokens -= state.num_reserved_tokens
        if state.is_in_engine:
            self.finished_in_engine.append(state.req_id)
            state.is_in_engine = False
        if reason == FinishReason.DEADLINE and error is None:
            error = DeadlineExceededError("the deadline passed before the request finished")
        if reason in (FinishReason.EOS, FinishReason.LENGTH, FinishReason.STOP):
            self.pace.observe_length(len(state.output_ids), state.request.max_new_tokens)
        state.end(reason, now, error, step)
        self.policy.forget(state.req_id)
        self.just_finished.append(state)
