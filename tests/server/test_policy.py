"""The goodput policy with a fake step-cost model and fake acceptance (no model, no engine)."""

from __future__ import annotations

from dataclasses import dataclass, field
from itertools import pairwise

import numpy as np
import pytest
import structlog.testing

from api.speculation import SpeculationMode
from engine.protocol import MAX_SHORT_QUERY_TOKENS, SHARED_READ_QUERIES, BatchShape, Offer
from server.errors import InvalidArgumentError
from server.policy import PolicySettings, PolicyUpdate, SpeculationPolicy
from server.policy.acceptance import AcceptanceEstimator
from server.policy.cost_model import FEATURES, DraftCosts, StepCostModel, features, nonnegative_lstsq
from server.policy.goodput import Candidate, Option, StepBase, choose, gains_of, rank
from server.policy.speculation import PROBE_AFTER_STEPS

NO_DRAFT_COSTS = DraftCosts(0.0, 0.0, 0.0)


@dataclass
class FakeCost:
    """T(N) = base + per_token * max(0, N - free_tokens): the first `free_tokens` cost nothing
    (memory-bound), every further token `per_token` (compute-bound)."""

    base: float = 0.030
    per_token: float = 0.002
    free_tokens: int = 8
    is_fitted: bool = True

    def step_times(self, base: BatchShape, max_tokens: int) -> list[float]:
        return [self.base + self.per_token * max(0, n - self.free_tokens) for n in range(max_tokens + 1)]

    def predict(self, shape: BatchShape) -> float:
        return self.step_times(shape, shape.num_tokens)[-1]

    def draft_costs(self) -> DraftCosts:
        return NO_DRAFT_COSTS

    def observe(self, shape: BatchShape, seconds: float) -> None:
        pass


@dataclass
class FakeRequest:
    req_id: str
    speculation_mode: int = SpeculationMode.DEFAULT
    requested_draft_tokens: int = 0
    num_new_tokens_left: int = 100
    num_tokens: int = 100
    offer: Offer = field(default_factory=lambda: Offer(8, match_len=2))
    requested_drafter: str = ""

    @property
    def offers(self) -> dict[str, Offer]:
        return {"ngram": self.offer}


def cand(req_id: str, chances: list[float], max_k: int, num_kv_tokens: int, drafter: str = "ngram") -> Candidate:
    return Candidate(req_id, [Option(drafter, chances, max_k)], num_kv_tokens)


def fixed_rate(rates: dict[str, float]) -> AcceptanceEstimator:
    """Every draft token of a request passes with its given rate (first and further alike)."""

    class Fixed(AcceptanceEstimator):
        def pass_chances(self, req_id: str, match_len: int, max_draft_tokens: int) -> list[float]:
            return [rates[req_id]] * max_draft_tokens

    return Fixed()


def make_policy(
    rates: dict[str, float], cost: FakeCost, mode: SpeculationMode = SpeculationMode.AUTO, max_k: int = 8
) -> SpeculationPolicy:
    settings = PolicySettings(mode, 4, max_k)
    return SpeculationPolicy(
        settings,
        max_k,
        cost_model=cost,  # type: ignore[arg-type]
        acceptance={"ngram": fixed_rate(rates)},
    )


def base_for(requests: list[FakeRequest], room: int = 512) -> StepBase:
    n = len(requests)
    return StepBase(BatchShape(n, n, 100 * n, 0, 100 * n), float(n), room)


def choose_for(policy: SpeculationPolicy, requests: list[FakeRequest]) -> dict[str, int]:
    """k per request (all from the n-gram drafter, the only one)."""
    chosen = policy.choose(requests, base_for(requests))
    assert all(a.drafter == "ngram" for a in chosen.values() if a.num_draft_tokens)
    return {req_id: a.num_draft_tokens for req_id, a in chosen.items()}


def test_k_grows_with_acceptance() -> None:
    cost = FakeCost(per_token=0.004, free_tokens=2)
    ks = []
    for rate in (0.2, 0.5, 0.8, 0.95):
        policy = make_policy({"r": rate}, cost)
        ks.append(choose_for(policy, [FakeRequest("r")])["r"])
    assert ks == sorted(ks) and ks[0] < ks[-1]
    assert ks[0] <= 1 and ks[-1] == 8


def test_per_request_k_follows_each_request_acceptance() -> None:
    rates = {"repetitive": 0.9, "creative": 0.3}
    policy = make_policy(rates, FakeCost(per_token=0.004, free_tokens=4))
    chosen = choose_for(policy, [FakeRequest("repetitive"), FakeRequest("creative")])
    assert chosen["repetitive"] > chosen["creative"]


def test_k_shrinks_as_the_batch_gets_expensive() -> None:
    cost = FakeCost(per_token=0.002, free_tokens=8)
    totals = []
    for batch_size in (1, 4, 16):
        requests = [FakeRequest(f"r{i}") for i in range(batch_size)]
        policy = make_policy({r.req_id: 0.7 for r in requests}, cost)
        chosen = choose_for(policy, requests)
        totals.append(sum(chosen.values()) / batch_size)
    assert totals[0] > totals[1] > totals[2]


def test_zero_for_everyone_under_saturation() -> None:
    # Compute-bound from the first token: each extra token costs as much as a whole step share.
    cost = FakeCost(base=0.0, per_token=0.003, free_tokens=0)
    requests = [FakeRequest(f"r{i}") for i in range(32)]
    policy = make_policy({r.req_id: 0.6 for r in requests}, cost)
    assert set(choose_for(policy, requests).values()) == {0}


def test_probing_lets_a_stale_estimate_recover() -> None:
    estimator = AcceptanceEstimator()
    policy = SpeculationPolicy(
        PolicySettings(SpeculationMode.AUTO, 4, 8),
        8,
        cost_model=FakeCost(per_token=0.006, free_tokens=1),  # type: ignore[arg-type]
        acceptance={"ngram": estimator},
    )
    request = FakeRequest("r")
    for _ in range(20):  # a run of rejections: the estimate drops and k goes to 0
        estimator.observe("r", 2, num_drafted=4, num_accepted=0)
    ks = [choose_for(policy, [request])["r"] for _ in range(PROBE_AFTER_STEPS)]
    assert ks[:-1] == [0] * (PROBE_AFTER_STEPS - 1) and ks[-1] == 1  # the probe
    for _ in range(12):  # the text turned repetitive: probes now get accepted
        estimator.observe("r", 2, num_drafted=1, num_accepted=1)
    assert choose_for(policy, [request])["r"] >= 1
    assert policy.num_probes == 1  # chosen, not probed


def test_modes_and_bounds_are_respected() -> None:
    policy = make_policy(
        {"auto": 0.99, "off": 0.99, "fixed": 0.99, "short": 0.99, "nomatch": 0.99}, FakeCost(per_token=0.0001), max_k=6
    )
    requests = [
        FakeRequest("auto"),
        FakeRequest("off", speculation_mode=SpeculationMode.OFF),
        FakeRequest("fixed", speculation_mode=SpeculationMode.FIXED, requested_draft_tokens=2),
        FakeRequest("short", num_new_tokens_left=3),  # k + 1 may not pass max_new_tokens
        FakeRequest("nomatch", offer=Offer(0)),  # the drafter has nothing: drafting is free to skip
    ]
    assert choose_for(policy, requests) == {"auto": 6, "off": 0, "fixed": 2, "short": 2, "nomatch": 0}
    policy.apply(PolicyUpdate(SpeculationMode.OFF))
    assert choose_for(policy, requests) == {"auto": 0, "off": 0, "fixed": 2, "short": 0, "nomatch": 0}
    policy.apply(PolicyUpdate(SpeculationMode.FIXED, num_draft_tokens=3))
    assert choose_for(policy, requests) == {"auto": 3, "off": 0, "fixed": 2, "short": 2, "nomatch": 3}


def test_step_budget_caps_the_drafts() -> None:
    policy = make_policy({"a": 0.99, "b": 0.99}, FakeCost(per_token=0.0))
    requests = [FakeRequest("a"), FakeRequest("b")]
    chosen = policy.choose(requests, base_for(requests, room=5))
    assert sum(a.num_draft_tokens for a in chosen.values()) == 5


def test_chooser_finds_the_best_prefix_past_a_costly_first_token() -> None:
    # The first draft token costs a jump (a kernel switch), later ones are nearly free: one token
    # alone loses, four win. A chooser that stopped at the first loss would never speculate.
    times = [0.0, 0.030, 0.040, 0.0405, 0.041, 0.0415, 0.042]
    base = StepBase(BatchShape(1, 1, 100, 0, 100), 1.0, 100)
    choice = choose([cand("r", [0.7] * 5, 5, 100)], base, times, NO_DRAFT_COSTS)
    assert choice.draft_tokens["r"] == 5 and choice.goodput > choice.plain_goodput


def shape_of(num_seqs: int, num_query: int, num_cached: int) -> BatchShape:
    """num_seqs sequences of num_query query tokens, each after num_cached tokens in its cache."""
    kv = num_cached + num_query
    n = num_seqs * num_query
    deep = num_seqs * max(num_query - SHARED_READ_QUERIES, 0) * kv if num_query <= MAX_SHORT_QUERY_TOKENS else 0
    return BatchShape(n, num_seqs, num_seqs * kv, num_seqs * (num_query > 1), n * kv, num_deep_query_pairs=deep)


@pytest.mark.parametrize("noise", [0.0, 0.02])
def test_cost_model_recovers_a_known_step_cost(noise: float) -> None:
    rng = np.random.default_rng(0)

    def true_cost(shape: BatchShape) -> float:
        n = shape.num_tokens
        return (
            0.03
            + 0.0004 * n
            + 0.0015 * max(0, n - 8)
            + 0.0005 * shape.num_seqs
            + 0.001 * shape.num_multi_token_seqs
            + 2e-6 * shape.num_attention_pairs
            + 3e-6 * shape.num_deep_query_pairs  # a sequence's third query on costs more a key
        )

    model = StepCostModel(refit_every=10)
    shapes = [shape_of(b, q, c) for b in (1, 2, 4, 8, 16) for q in (1, 2, 4, 8) for c in (64, 512)]
    model.warm([(s, true_cost(s) * (1 + noise * rng.standard_normal())) for s in shapes])
    for shape in shapes:
        assert model.predict(shape) == pytest.approx(true_cost(shape), rel=0.08 + 2 * noise)
    for _ in range(50):  # online samples refit it; prediction error is tracked
        shape = shapes[int(rng.integers(len(shapes)))]
        model.observe(shape, true_cost(shape))
    assert model.relative_error < 0.1 + 2 * noise
    base = shape_of(4, 1, 300)
    times = model.step_times(base, 100)
    assert all(b >= a - 1e-12 for a, b in pairwise(times[1:]))  # never cheaper with more tokens
    for n in (1, 3, 12, 64, 100):  # what predict says of the same step with n query tokens
        same_but_n = BatchShape(
            n, base.num_seqs, base.num_context_tokens, base.num_multi_token_seqs, base.num_attention_pairs
        )
        assert times[n] == pytest.approx(model.predict(same_but_n))
    # The chooser prices k drafts for each of 4 requests as predict prices that verification step
    # (from k = 2 on, the deep queries' pairs too).
    for k in (1, 2, 3, 5):
        request = cand("r", [0.9] * k, k, 301)
        drafts = gains_of(request, request.options[0], model.draft_costs())
        verifying = shape_of(4, 1 + k, 300)
        assert times[4 * (1 + k)] + 4 * sum(g.extra_s for g in drafts) == pytest.approx(model.predict(verifying))


def test_cost_model_keeps_plain_steps_close_where_long_steps_are_off_its_line() -> None:
    """Steps of 32 tokens or more (prefill chunks) take 25% longer than any line through the
    features allows. A fit of absolute errors pays for them with the short steps, and a plain
    decode step, the price every draft is set against, comes out up to a quarter under its time;
    a fit of relative errors keeps those within 6%."""

    def true_cost(shape: BatchShape) -> float:
        linear = 0.010 + 0.0004 * shape.num_tokens + 2e-6 * shape.num_attention_pairs
        return linear * (1.25 if shape.num_tokens >= 32 else 1.0)

    short = [shape_of(b, q, c) for b in (1, 2, 4, 8) for q in (1, 3, 5, 9) for c in (256, 2048)]
    chunks = [shape_of(1, q, c) for q in (64, 128, 256) for c in (0, 512)]
    samples = [(s, true_cost(s)) for s in short + chunks]
    model = StepCostModel()
    model.warm(samples)
    plain = [s for s in short if not s.num_multi_token_seqs]
    assert all(model.predict(s) == pytest.approx(true_cost(s), rel=0.06) for s in plain)
    # the same data fitted without weights misses them (the test tells the two fits apart)
    x, y = np.array([features(s) for s, _ in samples]), np.array([t for _, t in samples])
    unweighted = nonnegative_lstsq(x, y, np.array([name == "const" for name in FEATURES]))
    assert max(abs(float(np.dot(unweighted, features(s))) / true_cost(s) - 1) for s in plain) > 0.15


def test_positions_are_ranked_by_tokens_per_second_and_taken_in_order() -> None:
    # The first draft pays the switch to verification: alone it would rank below the second, so
    # the two are ranked as one block by their pooled ratio; the unlikely third ranks on its own.
    costs = DraftCosts(per_context_token=0.0, per_multi_token_seq=0.010, per_attention_pair=0.0)
    request = cand("r", [0.9, 0.9, 0.05], 3, 100)
    gains = gains_of(request, request.options[0], costs)
    assert [g.tokens for g in gains] == pytest.approx([0.9, 0.81, 0.0405])  # P(reaching and passing)
    keys = [key for key, _ in rank(gains, per_token_s=0.001)]
    assert 0.9 / 0.011 < 0.81 / 0.001  # unpooled, the second would rank first
    assert keys[0] == keys[1] == pytest.approx((0.9 + 0.81) / (0.011 + 0.001))
    assert keys[2] == pytest.approx(0.0405 / 0.001)


def test_a_long_draft_for_one_copying_request_is_worth_slowing_the_others() -> None:
    # One request copies text (a long draft would pass), seven cannot draft. Drafting 8 for the
    # copier makes the step 50% slower but yields 14.4 tokens in 60 ms against 8 in 40: the copier
    # finishes about 5x sooner and hands its slot on, so the others pay only during its short life.
    times = [0.040 + 0.002 * max(0, n - 8) for n in range(32)]
    costs = DraftCosts(per_context_token=0.0, per_multi_token_seq=0.004, per_attention_pair=0.0)
    candidates = [cand("copy", [0.95] * 8, 8, 100)]
    choice = choose(candidates, StepBase(BatchShape(8, 8, 800, 0, 800), 8.0, 100), times, costs)
    assert choice.draft_tokens["copy"] == 8 and choice.goodput > 1.15 * choice.plain_goodput
    # A weak copier is not worth it.
    weak = [cand("copy", [0.3] * 8, 8, 100)]
    assert choose(weak, StepBase(BatchShape(8, 8, 800, 0, 800), 8.0, 100), times, costs).draft_tokens["copy"] == 0


def test_drafts_are_spread_over_requests_of_equal_acceptance() -> None:
    # Equal chances and costs: a second draft for one request yields less than a first draft for
    # another (0.36 against 0.6 tokens), so the chooser gives each request one before anyone two.
    times = [0.040 + 0.001 * max(0, n - 4) for n in range(64)]
    candidates = [cand(f"r{i}", [0.6] * 8, 8, 100) for i in range(4)]
    base = StepBase(BatchShape(4, 4, 400, 0, 400), 4.0, 100)
    choice = choose(candidates, base, times, NO_DRAFT_COSTS)
    ks = sorted(choice.draft_tokens.values())
    assert ks[0] >= 1 and ks[-1] - ks[0] <= 1


def test_long_contexts_draft_less_when_attention_is_costly() -> None:
    # Each query-key pair costs: a draft token of a 4000-token request costs 40x one of a
    # 100-token request, so at equal acceptance the short one gets the longer draft.
    costs = DraftCosts(per_context_token=0.0, per_multi_token_seq=0.0, per_attention_pair=1e-6)
    candidates = [cand("short", [0.8] * 8, 8, 100), cand("long", [0.8] * 8, 8, 4000)]
    base = StepBase(BatchShape(2, 2, 4100, 0, 4100), 2.0, 100)
    times = [0.030] * 20
    for order in (candidates, candidates[::-1]):  # whichever arrived first
        choice = choose(order, base, times, costs)
        assert choice.draft_tokens["short"] > choice.draft_tokens["long"]
    # A costly switch from decode to verification keeps weak requests at k = 0.
    switch = DraftCosts(per_context_token=0.0, per_multi_token_seq=0.02, per_attention_pair=0.0)
    weak = [cand("weak", [0.3] * 8, 8, 100)]
    assert choose(weak, base, times, switch).draft_tokens["weak"] == 0
    assert choose(weak, base, times, NO_DRAFT_COSTS).draft_tokens["weak"] > 0


def test_bursty_acceptance_gets_a_first_rate_and_a_position_curve() -> None:
    estimator = AcceptanceEstimator(8)
    for _ in range(30):  # copying: a draft is either right all the way or wrong at once
        estimator.observe("copy", 3, num_drafted=8, num_accepted=8)
        estimator.observe("copy", 3, num_drafted=8, num_accepted=0)
    chances = estimator.pass_chances("copy", 3, 8)
    assert 0.4 < chances[0] < 0.6
    assert all(c > 0.9 for c in chances[1:])  # the eighth token, given the seventh passed, too
    assert estimator.server_rest_rate > 0.9


def test_first_token_rate_follows_the_match_length_and_the_request() -> None:
    estimator = AcceptanceEstimator(8)
    for i in range(40):  # long matches are right, short ones half the time
        estimator.observe(f"r{i}", 8, num_drafted=4, num_accepted=4)
        estimator.observe(f"r{i}", 2, num_drafted=4, num_accepted=i % 2)
    rates = estimator.first_token_rates()
    assert rates[8] > 0.9 and 0.35 < rates[2] < 0.65
    # A new request starts from the match length's rate; an unseen length from the server's.
    assert estimator.first_rate("new", 8) == pytest.approx(rates[8])
    assert estimator.first_rate("new", 5) == pytest.approx(estimator.server_first_rate)
    # Its own record scales that: a request whose long matches keep failing drops below the
    # rate of short matches elsewhere.
    for _ in range(10):
        estimator.observe("odd", 8, num_drafted=4, num_accepted=0)
    assert estimator.first_rate("odd", 8) < rates[2] < estimator.first_rate("new", 8)
    estimator.forget("odd")
    assert estimator.first_rate("odd", 8) == estimator.first_rate("new", 8)


def test_a_model_free_offer_is_sure_where_its_first_tokens_pass_as_often_as_a_costly_offer_at_best() -> None:
    settings = PolicySettings(SpeculationMode.AUTO, 4, 8)
    policy = SpeculationPolicy(settings, 8, ("ngram", "mlp"), ("mlp",), offer_model_drafters=("mlp",))

    def observe(drafter: str, match_len: int, num_drafts: int, num_passing: int) -> None:
        for i in range(num_drafts):
            policy.observe_draft(f"r{i}", drafter, Offer(4, match_len=match_len), 4, int(i < num_passing))

    observe("ngram", 8, 100, 95)
    assert policy.sure_match_lens() == {}  # the speculator has not drafted yet: nothing to compare with
    observe("mlp", 10, 100, 80)  # its most confident bucket passes 80% of the time
    observe("mlp", 3, 100, 20)
    observe("ngram", 2, 100, 50)
    assert policy.sure_match_lens() == {"ngram": 8}
    observe("ngram", 5, 100, 85)
    assert policy.sure_match_lens() == {"ngram": 5}
    observe("ngram", 6, 100, 60)  # a longer match that passes less often: sure only past it
    assert policy.sure_match_lens() == {"ngram": 8}
    observe("ngram", 6, 400, 380)  # once it passes as often too, the 5s are sure again
    assert policy.sure_match_lens() == {"ngram": 5}
    observe("ngram", 2, 400, 380)
    observe("ngram", 0, 100, 90)  # FIXED drafts, planned without an offer, count under length 0
    assert policy.sure_match_lens() == {"ngram": 2}
    observe("mlp", 9, 400, 392)  # the speculator at its best now beats even the longest matches
    assert policy.sure_match_lens() == {}
    # with no drafter whose offers run a model there is nothing to skip
    plain = SpeculationPolicy(settings, 8, ("ngram",))
    plain.observe_draft("r", "ngram", Offer(4, match_len=8), 4, 4)
    assert plain.sure_match_lens() == {}


def test_later_positions_follow_the_request_as_well_as_the_server_curve() -> None:
    estimator = AcceptanceEstimator(8)
    for i in range(40):  # the server has seen requests that copy all the way
        estimator.observe(f"copy{i}", 8, num_drafted=8, num_accepted=8)
    fresh = estimator.pass_chances("new", 8, 8)
    assert all(c > 0.9 for c in fresh[1:])
    # A request whose first tokens pass but whose drafts then break after two or three is
    # priced below the curve past its first token, not only once the curve has moved.
    for i in range(8):
        estimator.observe("breaks", 8, num_drafted=8, num_accepted=2 + i % 2)
    breaking = estimator.pass_chances("breaks", 8, 8)
    assert all(b < f - 0.1 for b, f in zip(breaking[1:], estimator.pass_chances("new", 8, 8)[1:], strict=True))
    estimator.forget("breaks")
    assert estimator.pass_chances("breaks", 8, 8) == estimator.pass_chances("new", 8, 8)


def test_debug_log_shows_each_auto_choice_and_its_measured_step() -> None:
    policy = make_policy({"copying": 0.95, "idle": 0.9}, FakeCost())
    requests = [FakeRequest("copying"), FakeRequest("idle", offer=Offer(0))]
    with structlog.testing.capture_logs() as logs:
        chosen = choose_for(policy, requests)
        policy.observe_step(BatchShape(10, 2, 200, 1, 1000), 0.041)
    choice, step = [entry for entry in logs if entry["event"] in ("auto choice", "step time")]
    assert choice["chosen"] == {"copying": f"ngram k={chosen['copying']}"} and chosen["copying"] > 0
    assert choice["first_pass_chance"] == {"copying/ngram": 0.95}
    assert (choice["running"], choice["waiting"]) == (2, 0)
    # the cost model's price of the step that ran (10 tokens: 30 ms + 2 x 2 ms), against its time
    assert step["predicted_ms"] == 34.0 and step["measured_ms"] == 41.0


def test_a_draft_is_taken_when_it_raises_goodput_at_all() -> None:
    # Four requests, plain step 40 ms for 4 tokens (100 tokens/s); a first draft costs 4 ms. At
    # 0.45 it makes 4.45 tokens in 44 ms (101/s): taken. At 0.35, 4.35 in 44 ms (99/s): not.
    times = [0.040 + 0.004 * max(0, n - 4) for n in range(16)]
    base = StepBase(BatchShape(4, 4, 400, 0, 400), 4.0, 100)
    taken = choose([cand("r", [0.45], 1, 100)], base, times, NO_DRAFT_COSTS)
    assert taken.draft_tokens["r"] == 1
    assert taken.step_s == pytest.approx(0.044) and taken.goodput == pytest.approx(4.45 / 0.044)
    declined = choose([cand("r", [0.35], 1, 100)], base, times, NO_DRAFT_COSTS)
    assert declined.draft_tokens["r"] == 0 and declined.goodput == pytest.approx(100.0)


def test_set_policy_changes_only_the_given_fields_and_a_bad_one_changes_nothing() -> None:
    policy = make_policy({}, FakeCost(), max_k=6)
    assert policy.apply(PolicyUpdate(num_draft_tokens=2)) == PolicySettings(SpeculationMode.AUTO, 2, 6)
    with pytest.raises(InvalidArgumentError, match="policy.max_draft_tokens"):
        policy.apply(PolicyUpdate(SpeculationMode.OFF, max_draft_tokens=7))  # past the engine's limit
    with pytest.raises(InvalidArgumentError, match="policy.num_draft_tokens"):
        policy.apply(PolicyUpdate(max_draft_tokens=1))  # below the k FIXED uses
    assert policy.settings == PolicySettings(SpeculationMode.AUTO, 2, 6)


def test_the_snapshot_is_what_the_policy_knew_then_and_stays_so() -> None:
    estimator, cost = AcceptanceEstimator(max_draft_tokens=4), StepCostModel(refit_every=1)
    policy = SpeculationPolicy(
        PolicySettings(SpeculationMode.AUTO, 4, 4), 4, cost_model=cost, acceptance={"ngram": estimator}
    )
    before = policy.snapshot()
    estimator.observe("r", 3, num_drafted=4, num_accepted=4)
    policy.apply(PolicyUpdate(SpeculationMode.OFF))
    after = policy.snapshot()
    assert before.settings.mode == SpeculationMode.AUTO and after.settings.mode == SpeculationMode.OFF
    assert after.first_rate > before.first_rate and set(after.first_token_rates) == {3}
    assert before.first_token_rates == {} and len(after.position_rates) == 4
    with pytest.raises(TypeError):
        after.first_token_rates[5] = 0.5  # type: ignore[index]
    with pytest.raises(AttributeError):
        after.num_probes = 3  # type: ignore[misc]
