"""Chooses k for every decoding request of a step.

Per-request modes win: OFF means 0, FIXED means the request's own k. Requests that leave it to
the server get the server-wide mode. AUTO asks the goodput chooser, which weighs each request's
measured acceptance against the step's predicted cost; it only considers as many tokens as the
drafter can propose right now (the engine reports that after each step), so requests without a
proposal cost nothing. A request kept at k = 0 for a while although proposals exist is probed
with k = 1 now and then (at most one probe every few steps server-wide), so a stale low
estimate can recover when its text turns repetitive.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Protocol

import structlog

from api.speculation import SpeculationMode
from engine.protocol import BatchShape, Offer, max_draft_len
from server.policy.acceptance import AcceptanceEstimator
from server.policy.cost_model import StepCostModel
from server.policy.goodput import Candidate, Choice, StepBase, choose, max_tokens_needed, safe_rate
from server.policy.settings import PolicySettings, PolicyUpdate
from server.policy.snapshot import PolicySnapshot

PROBE_AFTER_STEPS = 32  # an AUTO request at k = 0 this long gets a probe
PROBE_SPACING_STEPS = 4  # no more than one probe per this many steps, server-wide

log = structlog.get_logger("goodspeed.policy")


class Decoding(Protocol):
    @property
    def req_id(self) -> str: ...
    @property
    def speculation_mode(self) -> int: ...
    @property
    def requested_draft_tokens(self) -> int: ...
    @property
    def num_new_tokens_left(self) -> int: ...
    @property
    def num_tokens(self) -> int: ...
    @property
    def offer(self) -> Offer: ...


@dataclass
class SpeculationPolicy:
    """Fed by one owner, the scheduler: it asks for k, and reports drafts, steps and ends.
    Everyone else reads `snapshot()`, which the control loop publishes after each step."""

    settings: PolicySettings
    engine_max_draft_tokens: int  # SetPolicy may lower max_draft_tokens, never raise it past this
    cost_model: StepCostModel = field(default_factory=StepCostModel)
    acceptance: AcceptanceEstimator = field(default_factory=AcceptanceEstimator)
    last_choice: Choice | None = None  # for observability
    steps_at_zero: dict[str, int] = field(default_factory=dict)
    steps_since_probe: int = 0
    num_probes: int = 0

    def choose(self, requests: Sequence[Decoding], base: StepBase | None = None) -> dict[str, int]:
        settings = self.settings
        chosen, auto = {}, []
        for request in requests:
            bound = max_draft_len(settings.max_draft_tokens, request.num_new_tokens_left)
            mode = request.speculation_mode or settings.mode
            if mode == SpeculationMode.OFF:
                chosen[request.req_id] = 0
            elif request.speculation_mode == SpeculationMode.FIXED:
                chosen[request.req_id] = min(request.requested_draft_tokens, bound)
            elif mode == SpeculationMode.FIXED or base is None or not self.cost_model.is_fitted:
                chosen[request.req_id] = min(settings.num_draft_tokens, bound)
            else:
                offer = request.offer
                chances = self.acceptance.pass_chances(request.req_id, offer.match_len, bound)
                max_k = max_draft_len(
                    settings.max_draft_tokens, request.num_new_tokens_left, num_offered=offer.num_tokens
                )
                auto.append(Candidate(request.req_id, [safe_rate(c) for c in chances], max_k, request.num_tokens))
        if auto and base is not None:
            chosen.update(self._choose_auto(auto, base))
        return chosen

    def _choose_auto(self, candidates: list[Candidate], base: StepBase) -> dict[str, int]:
        times = self.cost_model.step_times(base.shape, max_tokens_needed(base, candidates))
        choice = choose(candidates, base, times, self.cost_model.draft_costs())
        self.last_choice = choice
        chosen = dict(choice.draft_tokens)
        self.steps_since_probe += 1
        for c in candidates:
            if chosen[c.req_id] > 0:
                self.steps_at_zero[c.req_id] = 0
                continue
            waited = self.steps_at_zero.get(c.req_id, 0) + 1
            self.steps_at_zero[c.req_id] = waited
            if waited >= PROBE_AFTER_STEPS and self.steps_since_probe >= PROBE_SPACING_STEPS and c.max_draft_tokens:
                chosen[c.req_id] = 1
                self.steps_at_zero[c.req_id] = 0
                self.steps_since_probe = 0
                self.num_probes += 1
        if log.is_enabled_for(logging.DEBUG):
            log_choice(candidates, base, choice, chosen)
        return chosen

    def observe_draft(self, req_id: str, offer: Offer, num_drafted: int, num_accepted: int) -> None:
        """A decoding step verified num_drafted tokens, planned with offer, and accepted num_accepted."""
        self.acceptance.observe(req_id, offer.match_len, num_drafted, num_accepted)

    def observe_step(self, shape: BatchShape, seconds: float) -> None:
        if log.is_enabled_for(logging.DEBUG) and self.cost_model.is_fitted:
            predicted_ms = round(self.cost_model.predict(shape) * 1e3, 2)
            log.debug("step time", predicted_ms=predicted_ms, measured_ms=round(seconds * 1e3, 2))
        self.cost_model.observe(shape, seconds)

    def forget(self, req_id: str) -> None:
        self.acceptance.forget(req_id)
        self.steps_at_zero.pop(req_id, None)

    def warm(self, samples: Sequence[tuple[BatchShape, float]]) -> None:
        """Fits the step-cost model on timed synthetic steps, before the first request."""
        self.cost_model.warm(list(samples))

    def apply(self, update: PolicyUpdate) -> PolicySettings:
        """Changes the server-wide settings; InvalidArgumentError (naming the field) leaves them as they were."""
        self.settings = update.applied_to(self.settings).validated(self.engine_max_draft_tokens)
        return self.settings

    def snapshot(self) -> PolicySnapshot:
        acceptance, choice = self.acceptance, self.last_choice
        return PolicySnapshot(
            settings=self.settings,
            first_rate=acceptance.server_first_rate,
            continuation_rate=acceptance.server_rest_rate,
            position_rates=tuple(acceptance.position_rates()),
            first_token_rates=MappingProxyType(acceptance.first_token_rates()),
            goodput=choice.goodput if choice else 0.0,
            plain_goodput=choice.plain_goodput if choice else 0.0,
            cost_coefficients=self.cost_model.coefficients(),
            cost_model_error=self.cost_model.relative_error,
            num_probes=self.num_probes,
        )


def log_choice(candidates: Sequence[Candidate], base: StepBase, choice: Choice, chosen: dict[str, int]) -> None:
    """One debug line per AUTO step: what the chooser saw and what it chose, probes included (they
    are not in predicted_ms; the scheduler's token budget may still cut k). Req ids shortened."""
    log.debug(
        "auto choice",
        running=base.shape.num_seqs,
        waiting=base.num_waiting,
        first_pass_chance={c.req_id[:8]: round(c.pass_chances[0], 2) for c in candidates if c.max_draft_tokens},
        max_k={c.req_id[:8]: c.max_draft_tokens for c in candidates if c.max_draft_tokens},
        chosen_k={req_id[:8]: k for req_id, k in chosen.items() if k},
        probed=[req_id[:8] for req_id, k in chosen.items() if k and not choice.draft_tokens[req_id]],
        plain_ms=round(choice.plain_step_s * 1e3, 2),
        predicted_ms=round(choice.step_s * 1e3, 2),
    )
