"""Continuous batching decisions, driven with hand-built engine results (no model)."""

from __future__ import annotations

import time

import pytest

from api.speculation import SpeculationMode
from engine.protocol import (
    BatchShape,
    FinishReason,
    Offer,
    OfferOutcome,
    RequestOutput,
    ScheduledRequest,
    StepResult,
    StepTimings,
)
from server.errors import DeadlineExceededError, ResourceExhaustedError
from server.policy import PolicySettings, SpeculationPolicy
from server.request_state import Status
from server.scheduler import Scheduler, SchedulerLimits
from tests.server.fakes import make_state, result

NONE = FinishReason.NONE


def make_scheduler(
    max_running: int = 4,
    max_waiting: int = 4,
    max_step_tokens: int = 64,
    kv: int = 1000,
    mode: SpeculationMode = SpeculationMode.FIXED,
    k: int = 3,
    max_prefill_slowdown: float = 0.0,
    drafters: tuple[str, ...] = ("ngram",),
    model_drafters: tuple[str, ...] = (),
) -> Scheduler:
    policy = SpeculationPolicy(
        PolicySettings(mode, k, 8), 8, drafters, model_drafters, offer_model_drafters=model_drafters
    )
    return Scheduler(SchedulerLimits(max_running, max_waiting, max_step_tokens, kv, max_prefill_slowdown), policy)


def test_admission_respects_batch_size_and_kv_budget_first_come_first_served() -> None:
    scheduler = make_scheduler(max_running=2, kv=100)
    for name, prompt_len in (("a", 30), ("b", 30), ("c", 10)):
        scheduler.add(make_state(name, prompt_len, max_new_tokens=20))
    plan = scheduler.schedule()
    assert plan is not None and [n.req_id for n in plan.new_requests] == ["a", "b"]
    assert scheduler.num_reserved_tokens == 100 and [s.req_id for s in scheduler.waiting] == ["c"]


def test_requests_that_can_never_fit_or_overflow_the_queue_are_refused() -> None:
    scheduler = make_scheduler(max_waiting=1, kv=100)
    with pytest.raises(ResourceExhaustedError, match="needs 120 KV tokens"):
        scheduler.add(make_state("big", 100, max_new_tokens=20))
    scheduler.add(make_state("a", 10))
    with pytest.raises(ResourceExhaustedError, match="waiting queue is full"):
        scheduler.add(make_state("b", 10))


def test_only_requests_planned_from_offers_ask_the_engine_for_them() -> None:
    scheduler = make_scheduler(mode=SpeculationMode.AUTO, drafters=("ngram", "mlp"), model_drafters=("mlp",))
    scheduler.add(make_state("auto", 4))
    scheduler.add(make_state("off", 4, mode=SpeculationMode.OFF))
    scheduler.add(make_state("fixed", 4, mode=SpeculationMode.FIXED, k=2))
    for i in range(40):  # n-gram drafts from 8-token matches pass more often than the speculator's
        scheduler.policy.observe_draft(f"r{i}", "ngram", Offer(4, match_len=8), 4, 4)
        scheduler.policy.observe_draft(f"r{i}", "mlp", Offer(3, match_len=10), 3, i % 2)
    plan = scheduler.schedule()
    assert plan is not None and {s.req_id: s.wants_offers for s in plan.scheduled} == {
        "auto": True,
        "off": False,
        "fixed": False,
    }
    assert plan.sure_match_lens == {"ngram": 8}  # so the engine need not run a model to offer beside them
    scheduler.policy.drafters = ()  # an engine without drafters has nothing to offer
    scheduler.update(result(plan.step_id, *[(name, [65], 0, 0, NONE) for name in ("auto", "off", "fixed")]))
    plan = scheduler.schedule()
    assert plan is not None and not any(s.wants_offers for s in plan.scheduled) and plan.sure_match_lens == {}


def test_long_prompt_is_prefilled_in_chunks_while_decoding_continues() -> None:
    scheduler = make_scheduler(max_step_tokens=32, k=3)
    scheduler.add(make_state("short", 4, max_new_tokens=50))
    plan = scheduler.schedule()
    # FIXED plans without offers, so the engine's drafters need not make them
    assert plan is not None and plan.scheduled == [ScheduledRequest("short", num_prompt_tokens=4, wants_offers=False)]
    scheduler.update(result(plan.step_id, ("short", [65], 0, 0, NONE)))
    scheduler.add(make_state("long", 100))
    chunks, drafts = [], []
    for _ in range(4):
        plan = scheduler.schedule()
        assert plan is not None
        decode = [s for s in plan.scheduled if s.req_id == "short"]
        assert len(decode) == 1 and decode[0].num_prompt_tokens == 0  # decoding every step
        drafts.append(decode[0].num_draft_tokens)
        chunks += [s.num_prompt_tokens for s in plan.scheduled if s.req_id == "long"]
        scheduler.update(result(plan.step_id, ("short", [66], 0, 0, NONE)))
    assert chunks == [31, 31, 31, 7]  # 32-token steps minus the decode token
    assert drafts == [0, 0, 0, 3]  # drafts only take what the prefill leaves
    assert not scheduler.running["long"].is_prefilling


def step_s(shape: BatchShape) -> float:
    """A step-cost law like a small CPU's: 10 ms a forward, 0.5 ms a token, 2 ms per 1000 query-key pairs."""
    return 0.010 + 0.0005 * shape.num_tokens + 0.002 * (shape.num_attention_pairs + shape.num_long_query_pairs) / 1000


def decoding_one_request(max_prefill_slowdown: float, k: int = 3) -> Scheduler:
    """A scheduler whose cost model knows step_s, with "short" decoding (FIXED k)."""
    scheduler = make_scheduler(kv=20_000, max_step_tokens=512, max_prefill_slowdown=max_prefill_slowdown, k=k)
    # token counts at each of the cost model's knots, so that every segment is fitted
    counts = (1, 2, 4, 5, 9, 16, 17, 32, 33, 64, 512)
    shapes = [BatchShape.of([(n, c + n)] * b) for n in counts for c in (0, 100, 3000) for b in (1, 3)]
    scheduler.policy.warm([(shape, step_s(shape)) for shape in shapes])
    scheduler.add(make_state("short", 4, max_new_tokens=1000))
    plan = scheduler.schedule()
    assert plan is not None
    scheduler.update(result(plan.step_id, ("short", [65], 0, 0, NONE)))
    return scheduler


def chunks_while_one_request_decodes(max_prefill_slowdown: float, prompt_len: int) -> list[tuple[int, float]]:
    """The long prompt's chunk and the step's predicted time / the decode-only step's, per step
    ("short" decoding plainly)."""
    scheduler = decoding_one_request(max_prefill_slowdown, k=0)
    scheduler.add(make_state("long", prompt_len))
    steps = []
    while scheduler.running.get("long") is None or scheduler.running["long"].is_prefilling:
        decode_alone = step_s(BatchShape.of([(1, scheduler.running["short"].num_tokens)]))
        plan = scheduler.schedule()
        assert plan is not None
        by_id = {s.req_id: s for s in plan.scheduled}
        assert by_id["short"].num_prompt_tokens == 0  # decoding every step
        long, done = by_id["long"].num_prompt_tokens, scheduler.running["long"].num_prompt_done
        shape = BatchShape.of([(1, scheduler.running["short"].num_tokens), (long, done)])
        steps.append((long, step_s(shape) / decode_alone))
        scheduler.update(result(plan.step_id, ("short", [66], 0, 0, NONE)))
    return steps


def test_prefill_next_to_decoding_requests_is_cut_to_the_allowed_slowdown() -> None:
    capped = chunks_while_one_request_decodes(2.0, 3000)
    assert sum(n for n, _ in capped) == 3000
    assert all(slowdown <= 2.0 + 1e-6 for _, slowdown in capped)
    sizes = [n for n, _ in capped]
    assert sizes == sorted(sizes, reverse=True) and sizes[0] > 4 * sizes[-1]  # later tokens cost more
    assert max(slowdown for _, slowdown in capped) > 1.8  # the allowance is used, not wasted
    uncapped = chunks_while_one_request_decodes(0.0, 3000)
    assert [n for n, _ in uncapped] == [511] * 5 + [445]
    assert max(slowdown for _, slowdown in uncapped) > 10


def test_a_chunk_too_costly_for_the_allowance_still_moves_by_one_token() -> None:
    # at 1.01x no prompt token fits beside the decode (0.5 ms each against 0.1 ms of room)
    steps = chunks_while_one_request_decodes(1.01, 20)
    assert [n for n, _ in steps] == [1] * 20


def test_no_prompt_runs_beside_decodes_while_earlier_steps_are_over_the_bound() -> None:
    scheduler = decoding_one_request(2.0)
    scheduler.add(make_state("long", 300))
    scheduler.prefill_cap.overrun_s = 0.005  # as if the last steps with prefill had run 5 ms over
    plan = scheduler.schedule()
    assert plan is not None and {s.req_id: s.num_prompt_tokens for s in plan.scheduled} == {"short": 0}
    scheduler.update(result(plan.step_id, ("short", [66], 0, 0, NONE)))
    scheduler.prefill_cap.overrun_s = 0.0
    plan = scheduler.schedule()
    assert plan is not None and {s.req_id: s.num_prompt_tokens for s in plan.scheduled}["long"] > 0


def test_drafts_beside_a_prefill_do_not_hold_the_prompt_back() -> None:
    # The prefill bound is on what the prompt adds to the decodes; the drafts' own time is the
    # policy's to price. Counted as overrun, each step with drafts would stall the prompt a step.
    scheduler = decoding_one_request(2.0)
    scheduler.add(make_state("long", 1500))
    chunks, drafts = [], []
    while scheduler.running.get("long") is None or scheduler.running["long"].is_prefilling:
        short, done = scheduler.running["short"], scheduler.running.get("long")
        num_done = done.num_prompt_done if done else 0
        plan = scheduler.schedule()
        assert plan is not None
        by_id = {s.req_id: s for s in plan.scheduled}
        k, chunk = by_id["short"].num_draft_tokens, by_id["long"].num_prompt_tokens if "long" in by_id else 0
        chunks.append(chunk)
        drafts.append(k)
        shape = BatchShape.of([(1 + k, short.num_tokens + k), *([(chunk, num_done + chunk)] if chunk else [])])
        scheduler.update(result(plan.step_id, ("short", [66], k, 0, NONE)))  # every draft rejected
        scheduler.observe_step(StepResult(plan.step_id, timings=StepTimings(step_s=step_s(shape)), shape=shape))
    assert all(k == 3 for k in drafts) and sum(chunks) == 1500
    assert 0 not in chunks  # no step without a chunk: the drafts ran over nothing


def test_a_prompt_beside_drafts_slows_the_drafted_step_as_much_as_a_plain_one() -> None:
    # Cut to the plain step's bound, the prompt moved as many tokens beside drafts as beside plain
    # decoding, in longer steps: under AUTO, prompts arriving together started a second later.
    chunk_of, slowdown_of = {}, {}
    for k in (0, 3):
        scheduler = decoding_one_request(2.0, k=k)
        scheduler.add(make_state("long", 1500))
        plan = scheduler.schedule()  # admits "long" and runs its first chunk
        assert plan is not None
        scheduler.update(result(plan.step_id, ("short", [66], k, 0, NONE)))
        short, long = scheduler.running["short"], scheduler.running["long"]
        plan = scheduler.schedule()
        assert plan is not None
        by_id = {s.req_id: s for s in plan.scheduled}
        assert by_id["short"].num_draft_tokens == k
        chunk, done = by_id["long"].num_prompt_tokens, long.num_prompt_done - by_id["long"].num_prompt_tokens
        decodes = (1 + k, short.num_tokens + k)
        chunk_of[k] = chunk
        slowdown_of[k] = step_s(BatchShape.of([decodes, (chunk, done + chunk)])) / step_s(BatchShape.of([decodes]))
    assert chunk_of[3] > chunk_of[0]
    assert 1.8 < slowdown_of[3] <= 2.0 + 1e-6 and 1.8 < slowdown_of[0] <= 2.0 + 1e-6


def test_per_request_modes_override_the_server_policy() -> None:
    scheduler = make_scheduler(mode=SpeculationMode.AUTO, k=3)
    scheduler.add(make_state("default", 2))
    scheduler.add(make_state("off", 2, mode=SpeculationMode.OFF))
    scheduler.add(make_state("fixed", 2, mode=SpeculationMode.FIXED, k=6))
    plan = scheduler.schedule()
    assert plan is not None
    scheduler.update(result(plan.step_id, *[(n, [70], 0, 0, NONE) for n in ("default", "off", "fixed")]))
    plan = scheduler.schedule()
    assert plan is not None
    assert {s.req_id: s.num_draft_tokens for s in plan.scheduled} == {"default": 3, "off": 0, "fixed": 6}


def test_abort_releases_kv_and_tells_the_engine_in_the_next_plan() -> None:
    scheduler = make_scheduler()
    scheduler.add(make_state("a", 10, max_new_tokens=10))
    plan = scheduler.schedule()
    assert plan is not None
    state = scheduler.abort("a", FinishReason.CANCELLED, time.monotonic())
    assert state is not None and state.status == Status.FINISHED and scheduler.num_reserved_tokens == 0
    plan = scheduler.schedule()
    assert plan is not None and plan.finished_req_ids == ["a"] and not plan.scheduled
    assert scheduler.schedule() is None


def test_engine_finished_requests_are_not_reported_back() -> None:
    scheduler = make_scheduler()
    state = make_state("a", 3, max_new_tokens=2)
    scheduler.add(state)
    plan = scheduler.schedule()
    assert plan is not None
    scheduler.update(result(plan.step_id, ("a", [72], 0, 0, NONE)))
    plan = scheduler.schedule()
    assert plan is not None
    scheduler.update(result(plan.step_id, ("a", [105], 0, 0, FinishReason.LENGTH)))
    chunks = state.mailbox._chunks
    assert chunks[-1].final is not None and chunks[-1].final.finish_reason == FinishReason.LENGTH
    assert "".join(c.text for c in chunks) == "Hi"
    assert scheduler.schedule() is None  # nothing to tell the engine: it freed the request itself


def test_stop_sequence_ends_the_request_and_frees_it_in_the_engine() -> None:
    scheduler = make_scheduler()
    state = make_state("a", 3, max_new_tokens=20, stop=("\n\n",))
    scheduler.add(state)
    plan = scheduler.schedule()
    assert plan is not None
    scheduler.update(result(plan.step_id, ("a", [ord("o")], 0, 0, NONE)))
    for ids in ([ord("k"), ord("\n")], [ord("\n"), ord("x")]):
        plan = scheduler.schedule()
        assert plan is not None
        scheduler.update(result(plan.step_id, ("a", ids, 3, 1, NONE)))
    texts = [c.text for c in state.mailbox._chunks]
    assert texts == ["o", "k", ""] and state.finish_reason == FinishReason.STOP
    plan = scheduler.schedule()
    assert plan is not None and plan.finished_req_ids == ["a"]


def test_deadlines_end_waiting_and_running_requests() -> None:
    scheduler = make_scheduler(max_running=1)
    scheduler.pace.observe_step(0.01)  # fast enough that "wait" could start in time
    now = time.monotonic()
    running, waiting = make_state("run", 3, deadline_s=now + 10), make_state("wait", 3, deadline_s=now + 1)
    scheduler.add(running)
    scheduler.add(waiting)
    assert scheduler.schedule() is not None
    expired = scheduler.expire(now + 5)
    assert expired == [waiting] and isinstance(waiting.mailbox._chunks[-1].error, DeadlineExceededError)
    assert scheduler.expire(now + 11) == [running]
    assert scheduler.schedule() is not None and not scheduler.running


def test_a_step_records_the_k_it_drafted_not_the_k_planned() -> None:
    scheduler = make_scheduler(k=3)  # FIXED 3
    scheduler.add(make_state("a", 2))
    plan = scheduler.schedule()
    assert plan is not None
    scheduler.update(result(plan.step_id, ("a", [70], 0, 0, NONE)))
    plan = scheduler.schedule()
    assert plan is not None and plan.scheduled[0].num_draft_tokens == 3
    scheduler.update(result(plan.step_id, ("a", [71, 72], 1, 1, NONE)))  # the drafter had one token
    assert scheduler.running["a"].speculation.draft_lengths == [1]


def test_the_policy_learns_each_draft_with_the_offer_it_was_planned_from() -> None:
    scheduler = make_scheduler(mode=SpeculationMode.AUTO)
    seen: list[tuple[str, str, Offer, int, int]] = []
    scheduler.policy.observe_draft = lambda *args: seen.append(args)  # type: ignore[method-assign]
    scheduler.add(make_state("a", 2))
    steps = [([70], 0, 0, Offer(4, 7)), ([71, 72, 73], 3, 2, Offer(2, 3)), ([74], 2, 0, Offer())]
    for token_ids, num_drafted, num_accepted, offer in steps:
        plan = scheduler.schedule()
        assert plan is not None
        output = RequestOutput("a", token_ids, num_drafted, num_accepted, offers=[offer])
        scheduler.update(StepResult(plan.step_id, [output]))
    # the prefill's token is no draft step; each draft is paired with the offer before it
    assert seen == [("a", "ngram", Offer(4, 7), 3, 2), ("a", "ngram", Offer(2, 3), 2, 0)]
    assert scheduler.running["a"].offers == {"ngram": Offer()}


def test_the_policy_learns_how_the_offers_not_drafted_would_have_fared() -> None:
    scheduler = make_scheduler(mode=SpeculationMode.AUTO, drafters=("ngram", "self"))
    seen: list[tuple[str, str, Offer, int, int]] = []
    scheduler.policy.observe_draft = lambda *args: seen.append(args)  # type: ignore[method-assign]
    scheduler.add(make_state("a", 2))
    offers = [Offer(4, 7), Offer(3)]
    outputs = [
        RequestOutput("a", [70], offers=offers),  # the prefill's token: nothing offered before it
        RequestOutput("a", [71], offers=offers, offer_outcomes=[OfferOutcome("ngram", 1, 1)]),  # k = 0
        RequestOutput("a", [72, 73], 3, 1, offers=offers, offer_outcomes=[OfferOutcome("ngram", 2, 0)]),
    ]
    for output, drafter in zip(outputs, ("", "", "self"), strict=True):
        plan = scheduler.schedule()
        assert plan is not None
        if plan.scheduled[0].num_prompt_tokens == 0:
            scheduler.decoding["a"] = drafter  # as if the policy had chosen plain, then self-speculation
        scheduler.update(StepResult(plan.step_id, [output]))
    assert seen == [("a", "ngram", Offer(4, 7), 1, 1), ("a", "self", Offer(3), 3, 1), ("a", "ngram", Offer(4, 7), 2, 0)]


def test_a_request_that_ends_with_a_step_gets_one_last_chunk_with_that_steps_tokens() -> None:
    scheduler = make_scheduler(k=0)
    state = make_state("a", 2, max_new_tokens=3)
    scheduler.add(state)
    for token_ids, reason in (([65], NONE), ([66], NONE), ([67], FinishReason.LENGTH)):
        plan = scheduler.schedule()
        assert plan is not None
        scheduler.update(result(plan.step_id, ("a", token_ids, 0, 0, reason)))
    chunks = state.mailbox._chunks
    assert [(c.text, c.token_ids, c.final is not None) for c in chunks] == [
        ("A", [65], False),
        ("B", [66], False),
        ("C", [67], True),
    ]
    assert chunks[-1].final is not None and chunks[-1].final.num_completion_tokens == 3
    assert not scheduler.running and scheduler.take_finished() == [state]


def test_a_short_request_passes_a_head_waiting_for_kv_without_delaying_it() -> None:
    # Regression: admission was strictly first come, first served, so a 4-token request waited
    # behind a head that needed KV held by long-running requests until its deadline passed.
    scheduler = make_scheduler(max_running=8, max_waiting=8, max_step_tokens=512, kv=1000)
    scheduler.add(make_state("running", 500, max_new_tokens=100))  # 600 KV tokens, ends within 100 steps
    assert scheduler.schedule() is not None
    scheduler.add(make_state("head", 10, max_new_tokens=690))  # 700: starts when "running" ends
    scheduler.add(make_state("short", 4, max_new_tokens=4))  # ends within 5 steps: passes
    scheduler.add(make_state("middle", 10, max_new_tokens=340))  # fits now, but would delay the head
    plan = scheduler.schedule()
    assert plan is not None and [n.req_id for n in plan.new_requests] == ["short"]
    assert [s.req_id for s in scheduler.waiting] == ["head", "middle"]


def test_requests_that_fit_beside_the_head_start_at_once() -> None:
    scheduler = make_scheduler(max_running=8, max_waiting=8, max_step_tokens=512, kv=1000)
    scheduler.add(make_state("running", 500, max_new_tokens=100))
    assert scheduler.schedule() is not None
    scheduler.add(make_state("head", 10, max_new_tokens=690))  # 700 of the 1000 once "running" ends
    scheduler.add(make_state("beside", 10, max_new_tokens=240))  # 250: fits in the 300 the head leaves
    scheduler.add(make_state("late", 10, max_new_tokens=190))  # 200: fits now, but not beside both
    plan = scheduler.schedule()
    assert plan is not None and [n.req_id for n in plan.new_requests] == ["beside"]
    assert [s.req_id for s in scheduler.waiting] == ["head", "late"]


def test_a_request_that_cannot_start_before_its_deadline_is_refused_at_once() -> None:
    scheduler = make_scheduler(max_running=1, max_waiting=8, kv=1000)
    scheduler.pace.observe_step(0.05)
    scheduler.add(make_state("long", 10, max_new_tokens=400))  # about 20 s to run
    assert scheduler.schedule() is not None
    now = time.monotonic()
    with pytest.raises(ResourceExhaustedError, match=r"within its deadline \(5.0 s\): 1 running, 0 waiting"):
        scheduler.add(make_state("hurried", 4, max_new_tokens=4, deadline_s=now + 5), now=now)
    scheduler.add(make_state("patient", 4, max_new_tokens=4, deadline_s=now + 60), now=now)
    # the expected length is the measured share of max_new_tokens that requests used
    for _ in range(200):
        scheduler.pace.observe_length(20, 400)
    scheduler.add(make_state("hurried", 4, max_new_tokens=4, deadline_s=now + 5), now=now)
    assert [s.req_id for s in scheduler.waiting] == ["patient", "hurried"]


def test_an_engine_death_requeues_running_requests_and_resumes_streams_after_what_they_sent() -> None:
    scheduler = make_scheduler(max_running=3)
    streaming, admitted, waiting = make_state("streaming", 3), make_state("admitted", 3), make_state("waiting", 3)
    scheduler.add(streaming)
    plan = scheduler.schedule()
    assert plan is not None
    scheduler.update(result(plan.step_id, ("streaming", [72, 73], 0, 0, NONE)))
    scheduler.add(admitted)
    assert scheduler.schedule() is not None  # "admitted" is sent to the engine, which then dies
    scheduler.add(waiting)
    scheduler.release_running(RuntimeError("engine died"))
    assert not streaming.mailbox._chunks[-1].error  # its stream only pauses
    assert [s.req_id for s in scheduler.waiting] == ["streaming", "admitted", "waiting"]
    assert admitted.status == Status.WAITING and admitted.num_prompt_done == 0
    assert scheduler.num_reserved_tokens == 0 and not scheduler.running
    plan = scheduler.schedule()
    assert plan is not None and [n.req_id for n in plan.new_requests] == ["streaming", "admitted", "waiting"]
    assert not plan.finished_req_ids  # the new engine never knew the old requests
    resumed = plan.new_requests[0]  # reads what it had sent as prompt, and may write the rest
    assert resumed.prompt_token_ids == [1, 2, 3, 72, 73] and resumed.max_new_tokens == 16 - 2
    assert [s.num_prompt_tokens for s in plan.scheduled if s.req_id == "streaming"] == [5]
    scheduler.update(result(plan.step_id, ("streaming", [74], 0, 0, NONE)))
    assert streaming.output_ids == [72, 73, 74] and streaming.num_new_tokens_left == 13


def test_a_request_requeued_once_fails_if_the_next_engine_dies_under_it_too() -> None:
    # A request that kills every engine it runs on must not spend the whole restart budget.
    scheduler = make_scheduler()
    scheduler.add(make_state("suspect", 3))
    for _ in range(2):
        assert scheduler.schedule() is not None
        scheduler.release_running(RuntimeError("engine died"))
    assert not scheduler.waiting and not scheduler.running
    assert scheduler.take_finished()[0].req_id == "suspect"


def test_a_plan_that_only_released_requests_does_not_move_the_pace() -> None:
    scheduler = make_scheduler()
    scheduler.observe_step(StepResult(1, timings=StepTimings(step_s=0.08), shape=BatchShape(1, 1, 10, 0, 10)))
    scheduler.observe_step(StepResult(2, timings=StepTimings(step_s=0.0002)))  # no forward ran
    assert scheduler.pace.step_s == 0.08 and scheduler.policy.cost_model.num_samples == 1
