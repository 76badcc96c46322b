"""Choosing the drafter and k per request when a drafter costs time (a draft model), with fake
cost models (no model, no engine)."""

from __future__ import annotations

from dataclasses import dataclass, field

import pytest

from api.speculation import SpeculationMode
from engine.protocol import BatchShape, DraftRun, Offer
from server.errors import InvalidArgumentError
from server.policy import PolicySettings, PolicyUpdate, SpeculationPolicy, speculation
from server.policy.acceptance import AcceptanceEstimator
from server.policy.cost_model import DraftCosts, StepCostModel, features
from server.policy.goodput import Candidate, Choice, Option, StepBase, choose, choose_prefix
from server.policy.speculation import ALONE_PROBE_AFTER_STEPS, PROBE_AFTER_STEPS, Assignment

NO_COSTS = DraftCosts(0.0, 0.0, 0.0)
TARGET_TIMES = [0.100 + 0.002 * n for n in range(300)]  # a target step: 100 ms, 2 ms per extra token


@dataclass
class FakeDraftCost:
    """A draft model's forward: `fixed` whatever the batch, plus `per_seq` per sequence and
    `per_token` per query token."""

    fixed: float = 0.030
    per_seq: float = 0.001
    per_token: float = 0.0005
    per_context_token: float = 0.0
    is_fitted: bool = True

    @property
    def fixed_s(self) -> float:
        return self.fixed

    def predict(self, shape: BatchShape) -> float:
        return (
            self.fixed
            + self.per_seq * shape.num_seqs
            + self.per_token * shape.num_tokens
            + self.per_context_token * shape.num_context_tokens
        )


def base(n: int) -> StepBase:
    return StepBase(BatchShape(n, n, 100 * n, 0, 100 * n), float(n), 256)


def candidate(req_id: str, ngram: tuple[float, int], model: tuple[float, int], num_unseen: int = 1) -> Candidate:
    """Options: n-gram with its (pass chance, tokens offered), the draft model likewise."""
    options = [
        Option("ngram", [ngram[0]] * 8, ngram[1]),
        Option("model", [model[0]] * 8, model[1], num_unseen),
    ]
    return Candidate(req_id, options, 100)


def pick(candidates: list[Candidate], draft: FakeDraftCost) -> tuple[dict[str, tuple[str, int]], float, float]:
    choice = choose(candidates, base(len(candidates)), TARGET_TIMES, NO_COSTS, {"model": draft})  # type: ignore[dict-item]
    picks = {r: (choice.drafters.get(r, ""), k) for r, k in choice.draft_tokens.items()}
    return picks, choice.draft_s, choice.goodput / choice.plain_goodput


def test_a_long_ngram_match_wins_over_a_draft_model_that_costs_time() -> None:
    picks, draft_s, gain = pick([candidate("r", (0.97, 8), (0.7, 8))], FakeDraftCost())
    assert picks["r"] == ("ngram", 8) and draft_s == 0.0 and gain > 3


def test_the_draft_model_drafts_where_ngram_has_nothing_and_its_time_is_priced() -> None:
    picks, draft_s, gain = pick([candidate("r", (0.5, 0), (0.8, 8))], FakeDraftCost())
    drafter, k = picks["r"]
    assert drafter == "model" and 2 <= k <= 6 and gain > 1.2
    # k forwards: the first feeds one token, each later one extends by one token
    assert draft_s == pytest.approx(k * (0.030 + 0.001 + 0.0005))


def test_a_draft_model_too_slow_or_too_wrong_to_pay_is_not_used() -> None:
    for draft, rate in ((FakeDraftCost(fixed=0.200), 0.8), (FakeDraftCost(), 0.15)):
        picks, draft_s, gain = pick([candidate("r", (0.5, 0), (rate, 8))], draft)
        assert picks["r"] == ("", 0) and draft_s == 0.0 and gain == pytest.approx(1.0)


def test_catching_up_on_many_unseen_tokens_makes_the_draft_model_dearer() -> None:
    draft = FakeDraftCost(per_token=0.004)
    _, _, fresh_gain = pick([candidate("r", (0.5, 0), (0.7, 8), num_unseen=1)], draft)
    _, _, behind_gain = pick([candidate("r", (0.5, 0), (0.7, 8), num_unseen=40)], draft)
    assert fresh_gain > behind_gain


def test_requests_share_the_draft_models_forwards_and_each_gets_its_own_drafter() -> None:
    # Six requests with nothing to copy share the draft model's forwards: the fixed part is paid
    # once per forward, not once per request.
    drafting = [candidate(f"m{i}", (0.5, 0), (0.8, 8)) for i in range(6)]
    picks, draft_s, gain = pick(drafting, FakeDraftCost())
    ks = {picks[f"m{i}"] for i in range(6)}
    assert len(ks) == 1 and next(iter(ks))[0] == "model" and gain > 1.2
    k = next(iter(ks))[1]
    assert draft_s == pytest.approx(k * (0.030 + 6 * (0.001 + 0.0005)))
    # Two copiers join on n-gram: the step is now worth 2x plain, and at that rate forwards of
    # 30 ms no longer pay for the model's tokens; forwards of 10 ms still do.
    copying = [candidate(f"c{i}", (0.97, 8), (0.8, 8)) for i in range(2)]
    for fixed, uses_model in ((0.030, False), (0.010, True)):
        picks, draft_s, gain = pick(drafting + copying, FakeDraftCost(fixed=fixed))
        assert all(picks[f"c{i}"][0] == "ngram" and picks[f"c{i}"][1] == 8 for i in range(2))
        assert all((picks[f"m{i}"][0] == "model") == uses_model for i in range(6)), fixed
        assert (draft_s > 0) == uses_model and gain > 2


def test_a_draft_model_prefilling_anyway_makes_its_first_forward_cheap() -> None:
    # With a prompt being prefilled in the step, the draft model runs its first forward anyway:
    # a one-token draft then costs only its own sequence, not the forward's constant.
    weak = [candidate("r", (0.5, 0), (0.45, 1))]
    draft = FakeDraftCost(fixed=0.050)
    idle = choose(weak, base(1), TARGET_TIMES, NO_COSTS, {"model": draft})  # type: ignore[dict-item]
    prefilling = StepBase(BatchShape(65, 2, 164, 1, 2180), 1.0, 256, prefill_seqs=((64, 64),), num_prefilling=1)
    busy = choose(weak, prefilling, TARGET_TIMES, NO_COSTS, {"model": draft}, prefilling={"model"})  # type: ignore[dict-item]
    assert idle.draft_tokens["r"] == 0 and busy.draft_tokens["r"] == 1
    prefill_forward_s = 0.050 + 0.001 + 0.0005 * 64
    assert busy.plain_step_s == pytest.approx(TARGET_TIMES[65] + prefill_forward_s)  # plain pays the prefill too
    assert busy.draft_s == pytest.approx(prefill_forward_s + 0.001 + 0.0005)
    # a drafter that reads the target's cache (self-speculation) prefills nothing: no free forward
    reader = choose(weak, prefilling, TARGET_TIMES, NO_COSTS, {"model": draft})  # type: ignore[dict-item]
    assert reader.plain_step_s == pytest.approx(TARGET_TIMES[65])
    assert reader.draft_s == pytest.approx(0.050 + 0.001 + 0.0005)  # its one forward, whole


def test_a_plan_without_the_draft_model_wins_when_its_forwards_do_not_pay_for_themselves() -> None:
    # A copier prefers n-gram; one weak request would take the model, but its whole forward is
    # not worth it: the walk with that request on its model-free option (none) wins.
    candidates = [candidate("copy", (0.97, 8), (0.5, 8)), candidate("weak", (0.3, 0), (0.45, 8))]
    picks, draft_s, _ = pick(candidates, FakeDraftCost(fixed=0.060))
    assert picks["copy"][0] == "ngram" and picks["weak"] == ("", 0) and draft_s == 0.0


@dataclass
class FakeRequest:
    req_id: str
    speculation_mode: int = SpeculationMode.DEFAULT
    requested_draft_tokens: int = 0
    requested_drafter: str = ""
    num_new_tokens_left: int = 100
    num_tokens: int = 100
    offers: dict[str, Offer] = field(default_factory=lambda: {"ngram": Offer(0), "model": Offer(8)})


def two_drafter_policy(
    mode: SpeculationMode = SpeculationMode.AUTO, prior_acceptance: dict[str, float] | None = None
) -> SpeculationPolicy:
    target = StepCostModel()
    target.warm([(BatchShape(n, 1, 100 + n, int(n > 1), n * (100 + n)), 0.100 + 0.002 * n) for n in range(1, 20)])
    return SpeculationPolicy(
        PolicySettings(mode, 2, 8),
        8,
        drafters=("ngram", "model"),
        model_drafters=("model",),
        prefill_drafters=("model",),
        prior_acceptance=prior_acceptance or {},
        cost_model=target,
    )


def draft_forwards(fixed_s: float) -> list[tuple[BatchShape, float]]:
    """A draft model's profile: fixed_s a forward, 1 ms more per sequence."""
    return [
        (BatchShape(q, b, b * 100, int(q > b), q * 100), fixed_s + 0.001 * b) for b in (1, 2, 4) for q in (b, 2 * b)
    ]


def test_before_its_first_draft_a_drafter_is_planned_with_the_prior_it_declares() -> None:
    # Alone on a server, self-speculation at 7,680 tokens never drafted: its acceptance started at
    # 0.5, where its forwards did not pay, and nothing ran it to learn better. A drafter that
    # knows its own pass rate (self-speculation: 0.9) declares it.
    request = FakeRequest("r")
    for prior, expected in ((None, ""), ({"model": 0.9}, "model")):
        policy = two_drafter_policy(prior_acceptance=prior)
        policy.warm(draft_forwards(0.060) * 3, "model")
        assert policy.choose([request], base(1))["r"].drafter == expected, prior
        assert policy.snapshot().drafters["model"].first_rate == (0.9 if prior else 0.5)
    # its drafts then replace the prior: a drafter that turns out to miss is dropped
    for _ in range(20):
        policy.observe_draft("r", "model", Offer(8), num_drafted=2, num_accepted=0)
    assert policy.choose([request], base(1))["r"] == Assignment("", 0)


def test_the_draft_model_is_left_out_of_auto_until_its_cost_is_known_then_chosen() -> None:
    policy = two_drafter_policy()
    acceptance: AcceptanceEstimator = policy.acceptance["model"]
    for _ in range(40):
        acceptance.observe("r", 0, num_drafted=4, num_accepted=4)
    request = FakeRequest("r")
    assert policy.choose([request], base(1))["r"] == Assignment("", 0)  # no price for the model yet
    policy.warm(draft_forwards(0.030) * 3, "model")
    assert policy.snapshot().drafters["model"].cost_coefficients["const"] > 0.02
    drafter, k = policy.choose([request], base(1))["r"]
    assert drafter == "model" and k > 1
    # A step's draft forwards refit the drafter's own model, and their time is taken off the
    # step's before the target's model sees it; a model-free drafter's time stays in.
    shape = BatchShape(1, 1, 100, 0, 100)
    for _ in range(25):
        runs = [DraftRun("model", 0.062, 1, [shape] * 2), DraftRun("ngram", 0.001, 1)]
        policy.observe_step(shape, 0.165, runs)
    assert policy.cost_model.recent[-1][1] == pytest.approx(0.103)
    assert policy.cost_model.predict(shape) == pytest.approx(0.103, abs=0.005)
    assert policy.draft_cost_models["model"].predict(shape) == pytest.approx(0.031, abs=0.003)
    # its prediction error is its own: the first runs (0.062 s for two forwards) were priced off the
    # profile's 2 x 0.031, so the error stays small, and the model-free drafter has none
    snapshot = policy.snapshot().drafters
    assert 0 < snapshot["model"].cost_model_error < 0.1 and snapshot["ngram"].cost_model_error == 0.0


def test_fixed_names_its_drafter_or_gets_the_servers() -> None:
    policy = two_drafter_policy(SpeculationMode.FIXED)
    named = FakeRequest("a", SpeculationMode.FIXED, requested_draft_tokens=3, requested_drafter="model")
    unnamed = FakeRequest("b", SpeculationMode.FIXED, requested_draft_tokens=3)
    server_wide = FakeRequest("c")
    chosen = policy.choose([named, unnamed, server_wide], base(3))
    assert chosen == {"a": ("model", 3), "b": ("ngram", 3), "c": ("ngram", 2)}
    policy.apply(PolicyUpdate(drafter="model"))
    assert policy.choose([unnamed, server_wide], base(2)) == {"b": ("model", 3), "c": ("model", 2)}
    with pytest.raises(InvalidArgumentError, match="policy.drafter"):
        policy.apply(PolicyUpdate(drafter="medusa"))


def test_a_draft_model_is_probed_only_in_a_step_that_runs_it_anyway() -> None:
    # The model's estimate for r is low (every draft rejected): AUTO keeps r at k = 0. A probe
    # would make a whole draft forward run for one token, so it waits for a step that prefills.
    policy = two_drafter_policy()
    policy.warm([(BatchShape(b, b, b * 100, 0, b * 100), 0.030 + 0.001 * b) for b in (1, 2, 4, 8)] * 4, "model")
    for _ in range(40):
        policy.acceptance["model"].observe("r", 0, num_drafted=2, num_accepted=0)
    request = FakeRequest("r")
    idle = [policy.choose([request], base(1))["r"] for _ in range(2 * PROBE_AFTER_STEPS)]
    assert idle == [Assignment("", 0)] * (2 * PROBE_AFTER_STEPS)
    prefilling = StepBase(BatchShape(65, 2, 164, 1, 2180), 1.0, 256, prefill_seqs=((64, 64),), num_prefilling=1)
    assert policy.choose([request], prefilling)["r"] == Assignment("model", 1)
    assert policy.num_probes == 1
    # with no step to ride on, a much longer wait buys a probe that runs the forward alone
    alone = [policy.choose([request], base(1))["r"] for _ in range(ALONE_PROBE_AFTER_STEPS)]
    assert alone[:-1] == [Assignment("", 0)] * (ALONE_PROBE_AFTER_STEPS - 1) and alone[-1] == Assignment("model", 1)


def test_a_draft_model_waiting_for_its_probe_does_not_keep_the_other_drafters_from_theirs() -> None:
    # Both estimates are low (every draft rejected), and the draft model comes first in turn: its
    # probe waits for a step that runs its forward, and n-gram lookup probes meanwhile. Before,
    # the request waited on the model's turn and n-gram lookup was never probed again.
    policy = two_drafter_policy()
    policy.drafters = ("model", "ngram")
    policy.warm([(BatchShape(b, b, b * 100, 0, b * 100), 0.030 + 0.001 * b) for b in (1, 2, 4, 8)] * 4, "model")
    for name in policy.drafters:
        for _ in range(40):
            policy.acceptance[name].observe("r", 2, num_drafted=2, num_accepted=0)
    request = FakeRequest("r", offers={"ngram": Offer(4, match_len=2), "model": Offer(8)})
    steps = [policy.choose([request], base(1))["r"] for _ in range(ALONE_PROBE_AFTER_STEPS)]
    probes = [(i + 1, a) for i, a in enumerate(steps) if a.num_draft_tokens]
    expected = [
        (n * PROBE_AFTER_STEPS, Assignment("ngram", 1)) for n in range(1, ALONE_PROBE_AFTER_STEPS // PROBE_AFTER_STEPS)
    ]
    # ... and once the request has long gone without it, the draft model probes alone
    assert probes == [*expected, (ALONE_PROBE_AFTER_STEPS, Assignment("model", 1))]


def test_a_step_that_prefills_prices_its_drafting_time_at_what_decoding_buys() -> None:
    # A prefill chunk makes the step long (1.1 s), so its own goodput is low and the draft model's
    # 7 extra forwards (0.7 s for ~5.4 tokens) raise it. But at 10 tokens a second, what decode-only
    # steps buy with that time, they are not worth it: only its first draft token is, which rides
    # on the forward that prefills anyway (and is worth more than n-gram's two).
    candidates = [candidate("r", (0.5, 2), (0.95, 8))]
    long_times = [1.0 + 0.002 * n for n in range(300)]
    prefilling = StepBase(BatchShape(65, 2, 164, 1, 2180), 1.0, 256, prefill_seqs=((64, 64),), num_prefilling=1)
    draft = FakeDraftCost(fixed=0.100)

    def pick_at(time_value: float) -> tuple[str, int]:
        choice = choose(candidates, prefilling, long_times, NO_COSTS, {"model": draft}, time_value, {"model"})  # type: ignore[dict-item]
        return choice.drafters.get("r", ""), choice.draft_tokens["r"]

    assert pick_at(0.0) == ("model", 8)
    assert pick_at(2.0) == ("model", 8)  # below the step's own best goodput (3.7): no change
    assert pick_at(10.0) == ("model", 1)
    assert pick_at(1000.0) == ("", 0)
    # With n-gram offering 8 tokens, its k = 5 has the higher goodput (1.547 against 1.540 for
    # model k = 1), but at 10 tokens a second the model's nearly free token is worth more: the two
    # plans are compared at the price too.
    candidates[0] = candidate("r", (0.5, 8), (0.95, 8))
    assert pick_at(0.0) == ("model", 8) and pick_at(10.0) == ("model", 1)


def test_choose_prefix_takes_the_best_goodput_unless_time_is_worth_more() -> None:
    prefixes = [(1.0, 1.0), (3.0, 1.5), (4.0, 2.0), (5.0, 3.0)]  # goodput 1, 2, 2, 1.67
    assert choose_prefix(prefixes) == 1  # ties: the shorter prefix
    assert choose_prefix(prefixes, 2.0) == 1  # a price equal to the best goodput changes nothing
    assert choose_prefix(prefixes, 3.0) == 1  # 3 - 4.5 = -1.5 beats 1 - 3 = -2 and 4 - 6 = -2
    assert choose_prefix(prefixes, 5.0) == 0  # 1 - 5 = -4 beats 3 - 7.5 = -4.5
    assert choose_prefix([(2.0, 1.0)], 5.0) == 0


def test_decode_only_steps_set_the_price_of_time_for_steps_that_prefill(monkeypatch: pytest.MonkeyPatch) -> None:
    prices: list[float] = []

    def spy(*args: object) -> Choice:
        prices.append(args[5])  # type: ignore[arg-type]
        return choose(*args)  # type: ignore[arg-type]

    monkeypatch.setattr(speculation, "choose", spy)
    policy = two_drafter_policy()
    policy.warm([(BatchShape(b, b, b * 100, 0, b * 100), 0.030 + 0.001 * b) for b in (1, 2, 4, 8)] * 4, "model")
    for _ in range(20):
        policy.acceptance["model"].observe("r", 0, num_drafted=4, num_accepted=4)
    prefilling = StepBase(BatchShape(65, 2, 164, 1, 2180), 1.0, 256, prefill_seqs=((64, 64),), num_prefilling=1)
    policy.choose([FakeRequest("r")], prefilling)
    assert prices == [0.0]  # no decode-only step yet: no price
    goodputs = []
    for num_left in (100, 3):  # the second step can draft only 2 tokens: a lower goodput
        policy.choose([FakeRequest("r", num_new_tokens_left=num_left)], base(1))
        assert policy.last_choice is not None
        goodputs.append(policy.last_choice.goodput)
    assert goodputs[1] < goodputs[0] and prices[1:] == [0.0, 0.0]  # decode-only steps are not priced
    learned = goodputs[0] + speculation.DECODE_GOODPUT_DECAY * (goodputs[1] - goodputs[0])
    assert policy.decode_goodput == {1: pytest.approx(learned)}
    # a step that prefills with 3 decoding requests is priced at the nearest count seen, 1
    policy.choose([FakeRequest(f"r{i}") for i in range(3)], StepBase(*astuple_of(prefilling, 3.0)))
    assert prices[-1] == pytest.approx(learned) and policy.decode_goodput == {1: pytest.approx(learned)}
    # so is a step without a chunk while a prompt waits for its own (the prefill cap held it back)
    # or a request for a slot: its drafts delay them as much. Priced, it teaches no price.
    for held_back in (
        StepBase(BatchShape(1, 1, 100, 0, 100), 1.0, 256, num_prefilling=1),
        StepBase(BatchShape(1, 1, 100, 0, 100), 1.0, 256, num_waiting=1),
    ):
        policy.choose([FakeRequest("r")], held_back)
        assert prices[-1] == pytest.approx(learned) and policy.decode_goodput == {1: pytest.approx(learned)}


def astuple_of(step: StepBase, num_generated: float) -> tuple[object, ...]:
    return (step.shape, num_generated, step.max_extra_tokens, step.num_waiting, step.prefill_seqs, step.num_prefilling)


def test_a_draft_model_only_ever_drafted_one_deep_is_still_drafted_deeper() -> None:
    # Its first token always passed; nothing is known past it. Position 2 leans on position 1's
    # rate, not on a fixed 0.5 that would keep AUTO at k = 1-2 and so never learn otherwise.
    policy = two_drafter_policy()
    policy.warm([(BatchShape(b, b, b * 100, 0, b * 100), 0.030 + 0.001 * b) for b in (1, 2, 4, 8)] * 4, "model")
    for _ in range(40):
        policy.acceptance["model"].observe("r", 0, num_drafted=1, num_accepted=1)
    drafter, k = policy.choose([FakeRequest("r")], base(1))["r"]
    assert drafter == "model" and k >= 4
    # what it then learns rules: position 2 failing every time brings AUTO back to k = 1
    for _ in range(40):
        policy.acceptance["model"].observe("r", 0, num_drafted=k, num_accepted=1)
    assert policy.choose([FakeRequest("r")], base(1))["r"] == Assignment("model", 1)


def test_self_speculation_pays_at_long_context_through_its_window_and_not_at_short_context() -> None:
    # The measurements of the default model (float32, batch 4): a plain step costs 42 ms at
    # 256 tokens of context and 175 ms at 7,680; the same forward over a 512-token window costs
    # what a short-context step costs. Drafts pass 80% of the time.
    forward = FakeDraftCost(fixed=0.030, per_seq=0.001, per_token=0.0, per_context_token=4.6e-6)

    def picked(num_kv: int, window: int) -> list[int]:
        candidates = [Candidate(f"r{i}", [Option("self", [0.8] * 8, 8, 1, window)], num_kv) for i in range(4)]
        plain_s = forward.predict(BatchShape.of([(1, num_kv)] * 4))
        times = [plain_s + 0.001 * n for n in range(64)]
        step = StepBase(BatchShape.of([(1, num_kv)] * 4), 4.0, 64)
        choice = choose(candidates, step, times, NO_COSTS, {"self": forward})  # type: ignore[dict-item]
        return sorted(choice.draft_tokens.values())

    long_ks = picked(7680, 512)
    assert min(long_ks) >= 2, long_ks
    assert picked(7680, 0) == [0, 0, 0, 0]  # drafting over the whole context costs a full step per token
    assert picked(256, 512) == [0, 0, 0, 0]  # short context: the window is the whole context


def test_a_drafters_cost_model_follows_its_forwards_when_they_run_slower_than_its_profile() -> None:
    """The fit keeps the start-up profile, so a few dozen forwards barely move it; the drafter's
    predictions scale by how its latest forwards ran against the fit, both ways."""
    model = StepCostModel(drift_window=20)
    model.warm(
        [
            (BatchShape(q, b, b * c, int(q > b), q * c), 0.010 + 0.001 * b + 0.0002 * q + 2e-7 * q * c)
            for b in (1, 2, 4, 8)
            for q in (b, 2 * b)
            for c in (100, 400)
        ]
    )
    shape = BatchShape(1, 1, 100, 0, 100)
    profiled = model.predict(shape)
    assert profiled == pytest.approx(0.01122, rel=0.01)
    for _ in range(20):
        model.observe_forwards([shape, shape], 2.2 * profiled)  # two forwards, each 10% slower
    assert model.predict(shape) == pytest.approx(1.1 * profiled, rel=0.01)
    wider = BatchShape(4, 4, 400, 0, 400)
    assert model.predict(wider) == pytest.approx(1.1 * model.fit_coef @ features(wider), rel=1e-6)
    for _ in range(20):
        model.observe_forwards([shape], profiled)
    assert model.predict(shape) == pytest.approx(profiled, rel=0.02)
