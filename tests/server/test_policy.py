"""The goodput policy with a fake step-cost model and fake acceptance (no model, no engine)."""

from __future__ import annotations

from dataclasses import dataclass
from itertools import pairwise

import numpy as np
import pytest

from server.policy import PolicySettings, SpeculationPolicy
from server.policy.acceptance import AcceptanceEstimator
from server.policy.cost_model import StepCostModel, StepShape
from server.policy.goodput import Candidate, StepBase, choose
from server.policy.speculation import PROBE_AFTER_STEPS
from server.request import SpeculationMode


@dataclass
class FakeCost:
    """T(N) = base + per_token * max(0, N - free_tokens): the first `free_tokens` cost nothing
    (memory-bound), every further token `per_token` (compute-bound)."""

    base: float = 0.030
    per_token: float = 0.002
    free_tokens: int = 8
    is_fitted: bool = True

    def step_times(self, num_seqs: int, num_context_tokens: int, max_tokens: int) -> list[float]:
        return [self.base + self.per_token * max(0, n - self.free_tokens) for n in range(max_tokens + 1)]

    def observe(self, shape: StepShape, seconds: float) -> None:
        pass


@dataclass
class FakeRequest:
    req_id: str
    speculation_mode: int = SpeculationMode.DEFAULT
    requested_draft_tokens: int = 0
    num_new_tokens_left: int = 100
    num_draftable: int = 8


def fixed_rate(rates: dict[str, float]) -> AcceptanceEstimator:
    """Every draft token of a request passes with its given rate (first and further alike)."""

    class Fixed(AcceptanceEstimator):
        def pass_chances(self, req_id: str, max_draft_tokens: int) -> list[float]:
            return [rates[req_id]] * max_draft_tokens

    return Fixed()


def make_policy(
    rates: dict[str, float], cost: FakeCost, mode: SpeculationMode = SpeculationMode.AUTO, max_k: int = 8
) -> SpeculationPolicy:
    return SpeculationPolicy(PolicySettings(mode, 4, max_k), cost_model=cost, acceptance=fixed_rate(rates))  # type: ignore[arg-type]


def base_for(requests: list[FakeRequest], room: int = 512) -> StepBase:
    return StepBase(len(requests), len(requests), 100 * len(requests), float(len(requests)), room)


def choose_for(policy: SpeculationPolicy, requests: list[FakeRequest]) -> dict[str, int]:
    return policy.choose(requests, base_for(requests))


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
        cost_model=FakeCost(per_token=0.006, free_tokens=1),
        acceptance=estimator,
    )  # type: ignore[arg-type]
    request = FakeRequest("r")
    for _ in range(20):  # a run of rejections: the estimate drops and k goes to 0
        estimator.observe("r", num_drafted=4, num_accepted=0)
    ks = [choose_for(policy, [request])["r"] for _ in range(PROBE_AFTER_STEPS)]
    assert ks[:-1] == [0] * (PROBE_AFTER_STEPS - 1) and ks[-1] == 1  # the probe
    for _ in range(12):  # the text turned repetitive: probes now get accepted
        estimator.observe("r", num_drafted=1, num_accepted=1)
    assert choose_for(policy, [request])["r"] > 1
    assert policy.num_probes == 1


def test_modes_and_bounds_are_respected() -> None:
    policy = make_policy(
        {"auto": 0.99, "off": 0.99, "fixed": 0.99, "short": 0.99, "nomatch": 0.99}, FakeCost(per_token=0.0001), max_k=6
    )
    requests = [
        FakeRequest("auto"),
        FakeRequest("off", speculation_mode=SpeculationMode.OFF),
        FakeRequest("fixed", speculation_mode=SpeculationMode.FIXED, requested_draft_tokens=2),
        FakeRequest("short", num_new_tokens_left=3),  # k + 1 may not pass max_new_tokens
        FakeRequest("nomatch", num_draftable=0),  # the drafter has nothing: drafting is free to skip
    ]
    assert choose_for(policy, requests) == {"auto": 6, "off": 0, "fixed": 2, "short": 2, "nomatch": 0}
    policy.settings = PolicySettings(SpeculationMode.OFF, 4, 6)
    assert choose_for(policy, requests) == {"auto": 0, "off": 0, "fixed": 2, "short": 0, "nomatch": 0}
    policy.settings = PolicySettings(SpeculationMode.FIXED, 3, 6)
    assert choose_for(policy, requests) == {"auto": 3, "off": 0, "fixed": 2, "short": 2, "nomatch": 3}


def test_step_budget_caps_the_drafts() -> None:
    policy = make_policy({"a": 0.99, "b": 0.99}, FakeCost(per_token=0.0))
    requests = [FakeRequest("a"), FakeRequest("b")]
    chosen = policy.choose(requests, base_for(requests, room=5))
    assert sum(chosen.values()) == 5


def test_chooser_finds_the_best_prefix_past_a_costly_first_token() -> None:
    # The first draft token costs a jump (a kernel switch), later ones are nearly free: one token
    # alone loses, four win. A chooser that stopped at the first loss would never speculate.
    times = [0.0, 0.030, 0.040, 0.0405, 0.041, 0.0415, 0.042]
    base = StepBase(1, 1, 100, 1.0, 100)
    choice = choose([Candidate("r", [0.7] * 5, 1.0, 5)], base, times, margin=0.0)
    assert choice.draft_tokens["r"] == 5 and choice.goodput > choice.plain_goodput


@pytest.mark.parametrize("noise", [0.0, 0.02])
def test_cost_model_recovers_a_known_step_cost(noise: float) -> None:
    rng = np.random.default_rng(0)

    def true_cost(shape: StepShape) -> float:
        return 0.03 + 0.0004 * shape.num_tokens + 0.0015 * max(0, shape.num_tokens - 8) + 0.0005 * shape.num_seqs

    model = StepCostModel(refit_every=10)
    shapes = [StepShape(b * q, b, b * 300) for b in (1, 2, 4, 8, 16) for q in (1, 2, 4, 8)]
    model.warm([(s, true_cost(s) * (1 + noise * rng.standard_normal())) for s in shapes])
    for shape in shapes:
        assert model.predict(shape) == pytest.approx(true_cost(shape), rel=0.08 + 2 * noise)
    for _ in range(50):  # online samples refit it; prediction error is tracked
        shape = shapes[int(rng.integers(len(shapes)))]
        model.observe(shape, true_cost(shape))
    assert model.relative_error < 0.1 + 2 * noise
    times = model.step_times(4, 1200, 40)
    assert all(b >= a - 1e-12 for a, b in pairwise(times[1:]))  # never cheaper with more tokens


def test_bursty_acceptance_gets_a_first_rate_and_a_position_curve() -> None:
    estimator = AcceptanceEstimator(8)
    for _ in range(30):  # copying: a draft is either right all the way or wrong at once
        estimator.observe("copy", num_drafted=8, num_accepted=8)
        estimator.observe("copy", num_drafted=8, num_accepted=0)
    chances = estimator.pass_chances("copy", 8)
    assert 0.4 < chances[0] < 0.6
    assert all(c > 0.9 for c in chances[1:])  # the eighth token, given the seventh passed, too
    assert estimator.server_rest_rate > 0.9
    # A new request starts from the server-wide rate; its own evidence then moves it.
    assert estimator.first_rate("new request") == estimator.server_first_rate
    for _ in range(10):
        estimator.observe("new request", num_drafted=4, num_accepted=0)
    assert estimator.first_rate("new request") < 0.2 < estimator.server_first_rate
