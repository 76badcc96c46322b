"""The model runner in-process on a tiny random llama: KV regions, not output quality."""

from __future__ import annotations

from pathlib import Path

import pytest

from engine.config import EngineConfig
from engine.drafters.base import Draft, Drafter, DraftRequest
from engine.drafters.ngram import NgramIndex
from engine.offline import Job, run_alone
from engine.protocol import FinishReason, NewRequest, Offer, OfferOutcome, ScheduledRequest, StepPlan
from engine.runner import ModelRunner
from engine.worker import build_runner
from tests.tiny_models import make_tiny_llama


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("tiny-llama")
    make_tiny_llama(path)
    return path


def make_runner(model: Path, kv_tokens: int) -> ModelRunner:
    config = EngineConfig(model=str(model), kv_cache_tokens=kv_tokens, num_threads=1)
    return build_runner(config, show_progress=False)[0]


def test_a_sequence_keeps_its_tokens_when_compaction_moves_its_kv(tiny_model: Path) -> None:
    # Regression: a sequence kept the start of its region from when it was allocated, so once
    # compaction moved the region it read rows that now belong to another request.
    runner = make_runner(tiny_model, kv_tokens=100)
    prompts = {"a": list(range(3, 13)), "b": list(range(20, 45)), "c": list(range(50, 62)), "d": list(range(70, 90))}
    max_new = {"a": 10, "b": 5, "c": 8, "d": 20}  # rows: a 20, b 30, c 20; then d 40
    outputs: dict[str, list[int]] = {name: [] for name in prompts}

    def step(step_id: int, names: str, new: str = "", finished: str = "") -> None:
        plan = StepPlan(
            step_id,
            [NewRequest(n, prompts[n], max_new[n], stop_token_ids=[]) for n in new],
            [ScheduledRequest(n, num_prompt_tokens=64) for n in names],
            list(finished),
        )
        for output in runner.step(plan).outputs:
            assert output.finish_reason != FinishReason.ERROR, output.error
            outputs[output.req_id] += output.new_token_ids

    step(0, "abc", new="abc")
    step(1, "abc")
    # b leaves: 30 free rows where it was and 30 at the end, but d needs 40 in one piece.
    step(2, "acd", new="d", finished="b")
    assert runner.seqs["c"].kv_start == 20  # compaction moved c down into b's rows
    step_id = 3
    while "c" in runner.seqs:
        step(step_id, "".join(n for n in "acd" if n in runner.seqs))
        step_id += 1
    for name in list(runner.seqs):
        runner.remove_request(name)
    alone = run_alone(runner, Job("c-alone", prompts["c"], max_new["c"]), eos_ids=[])
    assert outputs["c"] == alone.output_ids and len(alone.output_ids) == max_new["c"]


def test_a_drafter_without_a_cache_is_not_run_for_prefill_and_costs_no_draft_time(tiny_model: Path) -> None:
    runner = make_runner(tiny_model, kv_tokens=100)  # the n-gram drafter
    prefill = runner.step(StepPlan(0, [NewRequest("a", list(range(3, 20)), 8)], [ScheduledRequest("a", 8)]))
    assert prefill.timings.draft_s == 0.0
    runner.step(StepPlan(1, scheduled=[ScheduledRequest("a", 64)]))
    decode = runner.step(StepPlan(2, scheduled=[ScheduledRequest("a", num_draft_tokens=3)]))
    assert decode.timings.draft_s > 0.0


def test_a_plan_naming_a_drafter_the_engine_lacks_fails_only_that_request(tiny_model: Path) -> None:
    runner = make_runner(tiny_model, kv_tokens=100)  # the default drafters: n-gram and self
    new = [NewRequest(name, list(range(3, 12)), 8) for name in ("a", "b")]
    runner.step(StepPlan(0, new, [ScheduledRequest("a", 64), ScheduledRequest("b", 64)]))
    plan = [ScheduledRequest("a", num_draft_tokens=2, drafter="medusa"), ScheduledRequest("b", num_draft_tokens=2)]
    a, b = sorted(runner.step(StepPlan(1, scheduled=plan)).outputs, key=lambda o: o.req_id)
    assert a.finish_reason == FinishReason.ERROR and "unknown drafter 'medusa'; the engine has ngram, self" in a.error
    assert b.finish_reason == FinishReason.NONE and b.new_token_ids and len(b.offers) == 2
    assert "a" not in runner.seqs and "a" not in runner.allocator.regions


def test_an_offer_not_drafted_is_checked_against_the_tokens_the_target_emitted(tiny_model: Path) -> None:
    runner = make_runner(tiny_model, kv_tokens=200)  # the default drafters: n-gram and self
    # this tiny model continues [3, 4] * 10 with 57 47 119 18, then 45 114 over and over, which
    # n-gram lookup catches on to
    runner.step(StepPlan(0, [NewRequest("a", [3, 4] * 10, 60)], [ScheduledRequest("a", 64)]))
    outcomes = []
    for step_id in range(1, 13):
        k, drafter = ((0, ""), (3, "self"), (2, "ngram"))[step_id % 3]
        before = list(runner.seqs["a"].token_ids)
        offered, _ = NgramIndex(2).lookup(before, max_n=8, num_draft_tokens=8)  # what n-gram offered
        plan = StepPlan(step_id, scheduled=[ScheduledRequest("a", num_draft_tokens=k, drafter=drafter)])
        (output,) = runner.step(plan).outputs
        emitted = output.new_token_ids
        num_tested = min(len(offered), len(emitted))
        if drafter == "ngram" or not num_tested:  # a draft is counted as such, and no offer is no outcome
            assert output.offer_outcomes == []
            continue
        num_passed = next((i for i in range(num_tested) if offered[i] != emitted[i]), num_tested)
        # only n-gram can tell without a forward; self-speculation's offer is never checked
        assert output.offer_outcomes == [OfferOutcome("ngram", num_tested, num_passed)]
        outcomes.append(output.offer_outcomes[0])
    assert any(o.num_passed >= 2 for o in outcomes) and any(o.num_passed == o.num_tested == 1 for o in outcomes)


class AskedDrafter(Drafter):
    """Offers every request one token, as if it had run a model to know it; records whom it was asked for."""

    name = "asked"
    offers_run_model = True

    def __init__(self) -> None:
        self.asked: list[set[str]] = []

    def propose(self, requests: list[DraftRequest]) -> list[Draft]:
        return [Draft() for _ in requests]

    def offers(self, requests: list[DraftRequest]) -> list[Offer]:
        self.asked.append({r.req_id for r in requests})
        return [Offer(1, match_len=1) for _ in requests]


def test_an_offer_that_runs_a_model_is_not_worked_out_where_a_free_one_is_sure(tiny_model: Path) -> None:
    runner = make_runner(tiny_model, kv_tokens=300)
    asked = AskedDrafter()
    runner.drafters = {asked.name: asked, **runner.drafters}  # first, so its offers must wait for n-gram's
    # n-gram lookup catches on to what this tiny model writes after [3, 4] * 10 (see above)
    new = [NewRequest("copy", [3, 4] * 10, 60), NewRequest("fresh", list(range(30, 50)), 60)]
    runner.step(StepPlan(0, new, [ScheduledRequest("copy", 64), ScheduledRequest("fresh", 64)]))
    assert asked.asked == [{"copy", "fresh"}]  # no sure lengths in the plan: everyone is asked
    num_sure = 0
    for step_id in range(1, 16):
        plan = StepPlan(
            step_id, scheduled=[ScheduledRequest("copy"), ScheduledRequest("fresh")], sure_match_lens={"ngram": 4}
        )
        num_calls = len(asked.asked)
        outputs = runner.step(plan).outputs
        ngram_offers = {out.req_id: out.offers[1] for out in outputs}
        is_sure = {req_id: offer.num_tokens > 0 and offer.match_len >= 4 for req_id, offer in ngram_offers.items()}
        unsure = {req_id for req_id, sure in is_sure.items() if not sure}
        assert asked.asked[num_calls:] == ([unsure] if unsure else [])  # not called for nobody
        for out in outputs:  # the offers keep the engine's order of drafters; a skipped one is empty
            assert len(out.offers) == 3 and (out.offers[0] == Offer()) == is_sure[out.req_id]
        num_sure += sum(is_sure.values())
    assert 0 < num_sure < 30  # some offers were sure and some were not
