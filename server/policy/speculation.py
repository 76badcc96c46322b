"""Chooses the drafter and k for every decoding request of a step.

Per-request modes win: OFF means 0, FIXED means the request's own k (and drafter, if it names
one). Requests that leave it to the server get the server-wide mode; FIXED without a drafter
uses the server's (by default the engine's first). AUTO asks the goodput chooser, which weighs
each request's measured acceptance with each drafter against the step's predicted cost, drafting
included; it only considers as many tokens as each drafter can propose right now (the engine
reports that after each step), so requests without a proposal cost nothing. A request kept at
k = 0 for a while although proposals exist is probed with k = 1 now and then (at most one probe
every few steps server-wide, its drafters in turn; a draft model in a step that runs it anyway,
or after a longer wait), so a stale low estimate can recover. A drafter that proposes without a
model needs no probes to be measured: the engine checks the offers it made but did not draft
against the tokens the target emitted, and those count as its drafts (engine.protocol.OfferOutcome).
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import NamedTuple, Protocol

import structlog

from api.speculation import SpeculationMode
from engine.protocol import BatchShape, DraftRun, Offer, max_draft_len
from server.policy.acceptance import INITIAL_RATE, AcceptanceEstimator
from server.policy.cost_model import StepCostModel
from server.policy.goodput import Candidate, Choice, Option, StepBase, choose, max_tokens_needed, safe_rate
from server.policy.settings import PolicySettings, PolicyUpdate
from server.policy.snapshot import DrafterSnapshot, PolicySnapshot

PROBE_AFTER_STEPS = 32  # an AUTO request at k = 0 this long gets a probe
PROBE_SPACING_STEPS = 4  # no more than one probe per this many steps, server-wide
ALONE_PROBE_AFTER_STEPS = 4 * PROBE_AFTER_STEPS  # ... a draft model's probe that runs its forward for it alone
DRIFT_WINDOW = 20  # a drafter's forwards over which its cost model's drift from its fit is measured
# Weight of the latest decode-only step in its batch size's mean goodput: about the last 10-20
# steps, enough to smooth one step's noise and few enough to follow a change of workload.
DECODE_GOODPUT_DECAY = 0.1

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
    def requested_drafter(self) -> str: ...
    @property
    def offers(self) -> Mapping[str, Offer]: ...


class Assignment(NamedTuple):
    """What a decoding request runs this step: k draft tokens from a drafter ("" when k is 0)."""

    drafter: str
    num_draft_tokens: int


NO_DRAFT = Assignment("", 0)


@dataclass
class SpeculationPolicy:
    """Fed by one owner, the scheduler: it asks for (drafter, k), and reports drafts, steps and
    ends. Everyone else reads `snapshot()`, which the control loop publishes after each step."""

    settings: PolicySettings
    engine_max_draft_tokens: int  # SetPolicy may lower max_draft_tokens, never raise it past this
    drafters: tuple[str, ...] = ("ngram",)  # the engine's, in order; the first serves FIXED by default
    model_drafters: tuple[str, ...] = ()  # those that run a model: priced by a step-cost model each
    prefill_drafters: tuple[str, ...] = ()  # of those, the ones that prefill with the target (a draft model)
    offer_model_drafters: tuple[str, ...] = ()  # of those, the ones that run a model to offer (the speculator)
    # per drafter: its acceptance before its first draft (INITIAL_RATE where it names none)
    prior_acceptance: Mapping[str, float] = field(default_factory=dict)
    cost_model: StepCostModel = field(default_factory=StepCostModel)
    draft_cost_models: dict[str, StepCostModel] = field(default_factory=dict)
    acceptance: dict[str, AcceptanceEstimator] = field(default_factory=dict)  # per drafter
    last_choice: Choice | None = None  # for observability
    steps_at_zero: dict[str, int] = field(default_factory=dict)
    probe_turn_of: dict[str, int] = field(default_factory=dict)  # per request: where its drafters' turns go on
    steps_off_models: dict[str, int] = field(default_factory=dict)  # per request, since it last ran a draft model
    steps_since_probe: int = 0
    num_probes: int = 0
    # recent chosen goodput of AUTO decode-only steps with nothing waiting, by their number of
    # decoding requests: what a second of decoding buys, the price of time while prompts wait
    decode_goodput: dict[int, float] = field(default_factory=dict)

    def __post_init__(self) -> None:
        for name in self.drafters:
            prior = self.prior_acceptance.get(name, INITIAL_RATE)
            self.acceptance.setdefault(name, AcceptanceEstimator(self.engine_max_draft_tokens, prior))
        for name in self.model_drafters:
            self.draft_cost_models.setdefault(name, StepCostModel(drift_window=DRIFT_WINDOW))

    def plans_with_offers(self, request: Decoding) -> bool:
        """Whether the request's steps are chosen from its offers: under OFF and FIXED they are not,
        so the engine's drafters need not work out what they would offer."""
        return bool(self.drafters) and (request.speculation_mode or self.settings.mode) == SpeculationMode.AUTO

    def sure_match_lens(self) -> dict[str, int]:
        """Per model-free drafter, the shortest match length from which its first draft token has
        passed, server-wide, at least as often as that of any drafter that runs a model to offer
        at its most confident, at every longer match length seen. The engine works out no such
        costly offer (the speculator's head 0) for a request a model-free drafter offers that much
        to: the speculator's offer would rarely win the step. A rule of thumb: a request whose own
        n-gram drafts keep failing loses the speculator's offer there too, and the speculator's
        buckets are learned only where n-gram lookup is not sure. Nothing is skipped until both
        have drafted. Skipping made AUTO about 1% faster in bfloat16 (docs/speculator.md), where
        head 0 had run on every step, most uselessly on code editing."""
        bars = [self.acceptance[name].first_token_rates().values() for name in self.offer_model_drafters]
        if not any(bars):
            return {}
        bar = max(max(rates, default=0.0) for rates in bars)
        sure = {}
        for name in self.drafters:
            if name in self.model_drafters:
                continue
            # match length 0 holds drafts planned without an offer (FIXED): no length to be sure from
            rates = {m: rate for m, rate in self.acceptance[name].first_token_rates().items() if m > 0}
            shortest = 0
            for match_len in sorted(rates, reverse=True):
                if rates[match_len] < bar:
                    break
                shortest = match_len
            if shortest:
                sure[name] = shortest
        return sure

    def choose(self, requests: Sequence[Decoding], base: StepBase | None = None) -> dict[str, Assignment]:
        settings = self.settings
        chosen, auto = {}, []
        for request in requests:
            bound = max_draft_len(settings.max_draft_tokens, request.num_new_tokens_left)
            mode = request.speculation_mode or settings.mode
            if mode == SpeculationMode.OFF or not self.drafters:
                chosen[request.req_id] = NO_DRAFT
            elif request.speculation_mode == SpeculationMode.FIXED:
                drafter = request.requested_drafter or self.fixed_drafter
                chosen[request.req_id] = Assignment(drafter, min(request.requested_draft_tokens, bound))
            elif mode == SpeculationMode.FIXED or base is None or not self.cost_model.is_fitted:
                chosen[request.req_id] = Assignment(self.fixed_drafter, min(settings.num_draft_tokens, bound))
            else:
                auto.append(self._candidate(request))
        if auto and base is not None:
            chosen.update(self._choose_auto(auto, base))
        return chosen

    def predict_step_s(self, shape: BatchShape) -> float | None:
        """The step-cost model's time for a target forward of this shape; None before it is fitted."""
        return self.cost_model.predict(shape) if self.cost_model.is_fitted else None

    @property
    def fixed_drafter(self) -> str:
        return self.settings.drafter or (self.drafters[0] if self.drafters else "")

    def _candidate(self, request: Decoding) -> Candidate:
        """Each drafter's offer for the request, as an option the chooser can price: those that
        run a model only once their cost model is fitted."""
        options = []
        for name in self.drafters:
            offer = request.offers.get(name, Offer())
            if name in self.draft_cost_models and not self.draft_cost_models[name].is_fitted:
                continue
            max_k = max_draft_len(
                self.settings.max_draft_tokens, request.num_new_tokens_left, num_offered=offer.num_tokens
            )
            chances = self.acceptance[name].pass_chances(request.req_id, offer.match_len, max(max_k, 1))
            options.append(
                Option(name, [safe_rate(c) for c in chances], max_k, max(offer.num_unseen, 1), offer.max_kv_tokens)
            )
        return Candidate(request.req_id, options, request.num_tokens)

    def _choose_auto(self, candidates: list[Candidate], base: StepBase) -> dict[str, Assignment]:
        times = self.cost_model.step_times(base.shape, max_tokens_needed(base, candidates))
        draft_models = {name: model for name, model in self.draft_cost_models.items() if model.is_fitted}
        num_decoding = round(base.num_generated)
        time_value = self._time_value(base, num_decoding)
        choice = choose(
            candidates, base, times, self.cost_model.draft_costs(), draft_models, time_value, self.prefill_drafters
        )
        self.last_choice = choice
        if not base.prefill_seqs and not time_value:  # what a decode-only step buys when time is not priced
            last = self.decode_goodput.get(num_decoding, choice.goodput)
            self.decode_goodput[num_decoding] = last + DECODE_GOODPUT_DECAY * (choice.goodput - last)
        chosen = {
            req_id: Assignment(choice.drafters[req_id], k) if k else NO_DRAFT
            for req_id, k in choice.draft_tokens.items()
        }
        self.steps_since_probe += 1
        # A probe should cost one draft token: a draft model's turn waits for a step that runs its
        # forward anyway (another request drafts with it, or it prefills), or for a long wait.
        running = set(choice.drafters.values()) | (set(self.prefill_drafters) if base.prefill_seqs else set())
        for c in candidates:
            self.steps_off_models[c.req_id] = self.steps_off_models.get(c.req_id, 0) + 1
            if chosen[c.req_id].num_draft_tokens > 0:
                self.steps_at_zero[c.req_id] = 0
                self._ran(c.req_id, chosen[c.req_id].drafter)
                continue
            waited = self.steps_at_zero.get(c.req_id, 0) + 1
            self.steps_at_zero[c.req_id] = waited
            if waited < PROBE_AFTER_STEPS or self.steps_since_probe < PROBE_SPACING_STEPS:
                continue
            # Drafters take turns. One whose probe would run a draft forward alone is passed over
            # until the request has long gone without a draft model, and the next one offering
            # probes instead: waiting on it held a request whose turn was self-speculation's from
            # ever probing n-gram lookup, and a fresh server never drafted at 7,680 tokens, where
            # n-gram k = 4 alone ran 1.87x plain.
            is_alone_due = self.steps_off_models[c.req_id] >= ALONE_PROBE_AFTER_STEPS
            offered = [o.drafter for o in c.options if o.max_draft_tokens]
            turn = self.probe_turn_of.get(c.req_id, 0)
            in_turn = [offered[(turn + i) % len(offered)] for i in range(len(offered))]
            drafter = next(
                (d for d in in_turn if d not in self.draft_cost_models or d in running or is_alone_due), None
            )
            if drafter is not None:
                chosen[c.req_id] = Assignment(drafter, 1)
                self._ran(c.req_id, drafter)
                self.probe_turn_of[c.req_id] = offered.index(drafter) + 1  # one passed over keeps its turn
                self.steps_at_zero[c.req_id] = 0
                self.steps_since_probe = 0
                self.num_probes += 1
        if log.is_enabled_for(logging.DEBUG):
            log_choice(candidates, base, choice, chosen, time_value)
        return chosen

    def _ran(self, req_id: str, drafter: str) -> None:
        if drafter in self.draft_cost_models:
            self.steps_off_models[req_id] = 0

    def _time_value(self, base: StepBase, num_decoding: int) -> float:
        """Tokens per second a second of this step must buy (0: none): while prompts wait, in
        every step, what decode-only steps buy with it. A second of drafts delays the requests
        waiting for their prompt to run (in this step's chunk, or in a later step that the prefill
        cap holds it back to) and those queued for a slot. Priced only in steps with a chunk, the
        steps between them drafted at any price, and 16 concurrent completions (a closed loop
        bound by prefill) ran at 0.83x OFF's throughput (docs/goodput-policy.md)."""
        if not (base.num_prefilling or base.num_waiting) or not num_decoding:
            return 0.0
        return self._decode_goodput_near(num_decoding)

    def _decode_goodput_near(self, num_decoding: int) -> float:
        """The recent goodput of decode-only steps with num_decoding requests, or with the nearest
        count seen (0 before any)."""
        if not self.decode_goodput:
            return 0.0
        nearest = min(self.decode_goodput, key=lambda n: (abs(n - num_decoding), n))
        return self.decode_goodput[nearest]

    def observe_draft(self, req_id: str, drafter: str, offer: Offer, num_drafted: int, num_accepted: int) -> None:
        """A decoding step verified num_drafted tokens from drafter, planned with its offer, and
        accepted num_accepted."""
        acceptance = self.acceptance.get(drafter)
        if acceptance is not None:
            acceptance.observe(req_id, offer.match_len, num_drafted, num_accepted)

    def observe_step(self, shape: BatchShape, seconds: float, draft_runs: Sequence[DraftRun] = ()) -> None:
        """A step of the target forward's shape took seconds; draft_runs: what each drafter did in
        it. A draft model's runs refit its own drafting-cost model and are taken off the step's
        time before the target's model sees it; a model-free drafter's time stays in the step."""
        for run in draft_runs:
            model = self.draft_cost_models.get(run.drafter)
            if model is not None and run.forwards:
                if log.is_enabled_for(logging.DEBUG) and model.is_fitted:
                    predicted_ms = round(model.predict_forwards(run.forwards) * 1e3, 2)
                    log.debug(
                        "draft time",
                        drafter=run.drafter,
                        predicted_ms=predicted_ms,
                        measured_ms=round(run.seconds * 1e3, 2),
                    )
                model.observe_forwards(run.forwards, run.seconds)
                seconds -= run.seconds
        if log.is_enabled_for(logging.DEBUG) and self.cost_model.is_fitted:
            predicted_ms = round(self.cost_model.predict(shape) * 1e3, 2)
            log.debug("step time", predicted_ms=predicted_ms, measured_ms=round(seconds * 1e3, 2))
        self.cost_model.observe(shape, seconds)

    def forget(self, req_id: str) -> None:
        for acceptance in self.acceptance.values():
            acceptance.forget(req_id)
        self.steps_at_zero.pop(req_id, None)
        self.probe_turn_of.pop(req_id, None)
        self.steps_off_models.pop(req_id, None)

    def warm(self, samples: Sequence[tuple[BatchShape, float]], drafter: str = "") -> None:
        """Fits the step-cost model (or with drafter, that drafter's) on timed synthetic forwards,
        before the first request."""
        model = self.draft_cost_models[drafter] if drafter else self.cost_model
        model.warm(list(samples))

    def apply(self, update: PolicyUpdate) -> PolicySettings:
        """Changes the server-wide settings; InvalidArgumentError (naming the field) leaves them as they were."""
        self.settings = update.applied_to(self.settings).validated(self.engine_max_draft_tokens, self.drafters)
        return self.settings

    def snapshot(self) -> PolicySnapshot:
        choice = self.last_choice
        acceptance = self.acceptance[self.drafters[0]] if self.drafters else AcceptanceEstimator()
        return PolicySnapshot(
            settings=self.settings,
            first_rate=acceptance.server_first_rate,
            continuation_rate=acceptance.server_rest_rate,
            position_rates=tuple(acceptance.position_rates()),
            first_token_rates=MappingProxyType(acceptance.first_token_rates()),
            drafters=MappingProxyType({name: self._drafter_snapshot(name) for name in self.drafters}),
            goodput=choice.goodput if choice else 0.0,
            plain_goodput=choice.plain_goodput if choice else 0.0,
            cost_coefficients=self.cost_model.coefficients(),
            cost_model_error=self.cost_model.relative_error,
            num_probes=self.num_probes,
        )

    def _drafter_snapshot(self, name: str) -> DrafterSnapshot:
        acceptance, cost_model = self.acceptance[name], self.draft_cost_models.get(name)
        return DrafterSnapshot(
            first_rate=acceptance.server_first_rate,
            continuation_rate=acceptance.server_rest_rate,
            first_token_rates=MappingProxyType(acceptance.first_token_rates()),
            cost_coefficients=cost_model.coefficients() if cost_model else MappingProxyType({}),
            cost_model_error=cost_model.relative_error if cost_model else 0.0,
        )


def log_choice(
    candidates: Sequence[Candidate], base: StepBase, choice: Choice, chosen: dict[str, Assignment], time_value: float
) -> None:
    """One debug line per AUTO step: what the chooser saw and what it chose, probes included (they
    are not in predicted_ms; the scheduler's token budget may still cut k). Req ids shortened."""
    log.debug(
        "auto choice",
        running=base.shape.num_seqs,
        waiting=base.num_waiting,
        first_pass_chance={
            f"{c.req_id[:8]}/{o.drafter}": round(o.pass_chances[0], 2)
            for c in candidates
            for o in c.options
            if o.max_draft_tokens
        },
        chosen={
            req_id[:8]: f"{a.drafter} k={a.num_draft_tokens}" for req_id, a in chosen.items() if a.num_draft_tokens
        },
        probed=[req_id[:8] for req_id, a in chosen.items() if a.num_draft_tokens and not choice.draft_tokens[req_id]],
        plain_ms=round(choice.plain_step_s * 1e3, 2),
        predicted_ms=round(choice.step_s * 1e3, 2),
        draft_ms=round(choice.draft_s * 1e3, 2),
        time_value=round(time_value, 1),  # tokens/s a second must buy (while prompts wait; else 0)
    )
