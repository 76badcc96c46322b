"""How long an engine step takes, as a function of its shape: fitted, not assumed.

T = f(N) + a B + b C / 1000 + v V + p P / 1000 + l L / 1000 + d D / 1000

N: query tokens in the step (1 per plain decode, 1 + k to verify k drafts, prefill chunks);
B: sequences; C: KV tokens attended, summed over sequences; V: sequences with more than one query
token (verifying or prefilling: they need a causal mask and reshuffled attention inputs); P:
query-key pairs scored (query tokens x KV tokens, summed over sequences) by sequences of up to 16
query tokens (decoding, verifying); L: the same for longer ones (prefill chunks); D: of P, the
pairs of each sequence's queries past its second (engine.protocol.SHARED_READ_QUERIES). f is
piecewise linear in N with knots at 1, 2, 4, 6, 8, 16, 17, 32, 33 and 64 (a "ramp" feature
per segment) and linear beyond: the cost of a matrix product is flat while it is memory-bound and
grows once it is compute-bound, and kernels change with the row count, so f is left free apart
from being non-decreasing. All slopes are kept >= 0, so more work never predicts less time. The
knot at 6: our product kernel takes rows in groups of 6, so on an AVX-512 EPYC a batch-1 step
over 1,024 tokens took 20.1 ms with 6 query tokens and 29.5 with 7 (14.6 with 1); with knots at
4 and 8 only, verifying 8 drafts at batch 1 was priced 12% under its time, and AUTO drafted 8
a step where a fixed 4 ran faster (docs/goodput-policy.md). The knots at 17 and 33: with AMX
the bfloat16 products take rows in tiles of 16, and a step of 17 rows took 2.2-3 ms more than
one of 16 (18.6 ms; 0.2 ms a row on either side; Intel Xeon). Linear from 16 to 32, the model
priced a first draft beside 15 decodes 2.5 ms (12%) under its time; with them, within 2%.
Elsewhere (float32) the two short segments fit 0.

Why V and P: on a 2-core CPU, timing 50 shapes (B 1-16, 1-9 query tokens, 100 and 400 context
tokens), a model in N, B and C alone priced a plain decode step of 16 sequences at 105-111 ms
against a measured 74-90, because it had to explain the verification steps' attention with N:
it made speculation under load look cheaper than it is. With V and P the same fit is within a
few percent there (mean error 6.5% against 7.2% over all shapes).

Why L apart from P: a pair costs a decoding or verifying sequence mostly its key's read, shared
by a few queries, and a prefill chunk its arithmetic (and where the CPU kernel is not built the
two attend by different code). With
one P, the start-up profile's prefill chunks set its price: at 7,680 tokens of context it
predicted verifying 4 drafts at batch 1 at 1.70x a plain step, and 8 drafts at 2.47x, against
1.24x and 1.68x measured, and AUTO drafted short there (1.87x plain against n-gram k = 4's 3.0x).

Why D: a key's read is shared by a sequence's queries, and the first two queries' arithmetic
hides under it; later ones' does not. With P alone, the start-up profile (mostly 512 tokens of
context) priced a second query at 7,680 tokens 2-3x its time and verifying 3 drafts 1.3-1.5x, in
both dtypes on an Intel Xeon, and AUTO there drafted a few n-gram tokens where self-speculation
k = 3 for every request ran 1.1x faster; with D (and long-context verifications of 2-8 requests
in the profile) within 0.7-1.3x and 0.95-1.1x (docs/long-context.md).

The model starts from a profile of synthetic steps run at start-up and is refitted online, by
least squares of relative errors (each step weighted by 1 / its time), on the latest steps.

A draft model's drafting time (SmartSpec's T_draft) is the same kind of thing: a few forward
passes of a smaller model. So it gets a StepCostModel of its own, fitted on its forwards: the
engine reports the shapes of a step's draft forwards and their total time, and as the model is
linear in its features, the sum of the forwards' feature rows is fitted against that total.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Mapping
from dataclasses import dataclass
from itertools import islice, pairwise
from types import MappingProxyType

import numpy as np

from engine.protocol import BatchShape

# 6: the product kernel takes rows 6 at a time; 17 and 33: with AMX it takes them in tiles of 16, and
# each tile of rows begun costs a pass over every weight (csrc/cpu_linear.cpp)
KNOTS = (1, 2, 4, 6, 8, 16, 17, 32, 33, 64)
RAMPS = tuple(f"tokens_{lo}_{hi}" for lo, hi in pairwise(KNOTS))
FEATURES = (
    "const",
    *RAMPS,
    "tokens_over_64",
    "seqs",
    "context_ktokens",
    "multi_token_seqs",
    "attention_kpairs",
    "long_query_kpairs",
    "deep_query_kpairs",
)
NUM_TOKEN_FEATURES = len(RAMPS) + 1
MIN_SECONDS = 1e-6  # a step's weight in the fit is 1 / its seconds; no step is timed shorter
# Features whose coefficient may have either sign; the rest are slopes, kept >= 0.
SIGNED = {"const"}


@dataclass(frozen=True, slots=True)
class DraftCosts:
    """The cost model's coefficients for what a draft token adds besides its share of f(N): seconds
    per unit of each feature (goodput.py turns them into seconds per draft token)."""

    per_context_token: float  # each draft token is one more KV token attended
    per_multi_token_seq: float  # the first draft token turns a decode into a verification
    per_attention_pair: float  # per query-key pair scored
    per_deep_query_pair: float = 0.0  # more per pair of a query past a sequence's SHARED_READ_QUERIES


def token_ramp_rows(token_counts: np.ndarray) -> np.ndarray:
    """[n] -> [n, NUM_TOKEN_FEATURES]: how far each count is through each knot segment, 0..1,
    then the tokens past the last knot."""
    lo, hi = np.array(KNOTS[:-1], dtype=float), np.array(KNOTS[1:], dtype=float)  # [segments]
    counts = token_counts.astype(float)[:, None]  # [n, 1]
    ramps = np.clip((counts - lo) / (hi - lo), 0.0, 1.0)  # [n, segments]
    return np.hstack([ramps, np.maximum(counts - KNOTS[-1], 0.0)])


def token_ramps(n: float) -> list[float]:
    """token_ramp_rows for one count, in plain Python: the chooser prices hundreds of small
    forwards per step, where numpy's per-call cost would dominate."""
    ramps = [min(max((n - lo) / (hi - lo), 0.0), 1.0) for lo, hi in pairwise(KNOTS)]
    return [*ramps, max(n - KNOTS[-1], 0.0)]


def other_features(shape: BatchShape) -> list[float]:
    return [
        shape.num_seqs,
        shape.num_context_tokens / 1000,
        shape.num_multi_token_seqs,
        shape.num_attention_pairs / 1000,
        shape.num_long_query_pairs / 1000,
        shape.num_deep_query_pairs / 1000,
    ]


def features(shape: BatchShape) -> list[float]:
    return [1.0, *token_ramps(shape.num_tokens), *other_features(shape)]


def nonnegative_lstsq(x: np.ndarray, y: np.ndarray, signed: np.ndarray) -> np.ndarray:
    """Least squares with the unsigned coefficients held >= 0 (drop the negatives, refit: an
    active-set loop that ends in at most len(coef) rounds)."""
    active = np.ones(x.shape[1], dtype=bool)
    coef = np.zeros(x.shape[1])
    for _ in range(x.shape[1]):
        coef = np.zeros(x.shape[1])
        coef[active] = np.linalg.lstsq(x[:, active], y, rcond=None)[0]
        negative = (coef < 0) & ~signed
        if not negative.any():
            break
        active &= ~negative
    return coef


class StepCostModel:
    """drift_window > 0: predictions are the fit's scaled by measured / fitted over the last
    drift_window observations (their geometric mean), for a drafter's forwards. The fit keeps the
    start-up profile, which a few dozen observations hardly move, so when the machine runs slower
    than at start-up the fit stays low: self-speculation's forwards at 1,024 tokens took 9-11%
    longer than predicted, which made 5 of them look cheaper than the plain steps they replace,
    and AUTO at 1,024 x 2 drafted with it and ran at 0.8x n-gram lookup's speed
    (docs/long-context.md). The target's own model sees every step and refits on them."""

    def __init__(
        self, window: int = 500, refit_every: int = 25, error_decay: float = 0.05, drift_window: int = 0
    ) -> None:
        self.profile: list[tuple[list[float], float]] = []  # kept: they cover shapes the traffic may not
        self.recent: deque[tuple[list[float], float]] = deque(maxlen=window)
        self.fit_coef = np.zeros(len(FEATURES))  # the least-squares fit
        self.drift_window = drift_window
        self.scale = 1.0  # what predictions multiply the fit by (1 without drift_window)
        self._use(np.zeros(len(FEATURES)))
        self.refit_every = refit_every
        self.error_decay = error_decay
        self.relative_error = 0.0  # EMA of |predicted - measured| / measured, before refitting on it
        self.num_samples = 0
        self._signed = np.array([name in SIGNED for name in FEATURES])

    @property
    def is_fitted(self) -> bool:
        return bool(self.coef.any())

    def warm(self, samples: list[tuple[BatchShape, float]]) -> None:
        self.profile = [(features(shape), seconds) for shape, seconds in samples]
        self.refit()

    def observe(self, shape: BatchShape, seconds: float) -> None:
        self._observe_row(features(shape), seconds)

    def observe_forwards(self, shapes: list[BatchShape], seconds: float) -> None:
        """Several forwards (a draft model's in one step) that took seconds in all."""
        if shapes:
            self._observe_row(np.sum([features(shape) for shape in shapes], axis=0).tolist(), seconds)

    def _observe_row(self, row: list[float], seconds: float) -> None:
        # one row: it both checks the prediction and joins the window
        if self.is_fitted and seconds > 0:
            error = abs(float(np.dot(self.coef, row)) - seconds) / seconds
            self.relative_error += self.error_decay * (error - self.relative_error)
        self.recent.append((row, seconds))
        self.num_samples += 1
        if self.num_samples % self.refit_every == 0:
            self.refit()
        elif self.drift_window:
            self._rescale()

    def _rescale(self) -> None:
        """scale: the geometric mean of measured / fitted over the latest drift_window rows (at
        least 3 of them, else 1)."""
        latest = islice(reversed(self.recent), self.drift_window)
        log_ratios = [
            np.log(seconds / fitted)
            for row, seconds in latest
            if seconds > 0 and (fitted := float(np.dot(self.fit_coef, row))) > 0
        ]
        self.scale = float(np.exp(np.mean(log_ratios))) if len(log_ratios) >= 3 else 1.0
        self._use(self.fit_coef * self.scale)

    def _use(self, coef: np.ndarray) -> None:
        self.coef = coef  # fit_coef * scale: what predictions use
        self._coef_list: list[float] = coef.tolist()  # for predict: plain floats are faster one at a time
        self._coefficients: Mapping[str, float] = MappingProxyType(
            {name: float(v) for name, v in zip(FEATURES, coef, strict=True)}
        )

    def refit(self) -> None:
        rows = self.profile + list(self.recent)
        if not rows:
            return
        x = np.array([r[0] for r in rows])
        y = np.array([r[1] for r in rows])
        # at least as many rows as features they use (a feature always 0, such as a drafter's
        # prefill pairs, is left at 0 by the fit)
        if len(rows) < np.count_nonzero(np.abs(x).sum(axis=0)):
            return
        # Relative errors, not absolute: unweighted, the long steps (verifying, prefilling) set
        # the fit and plain decode steps came out up to 47% over their time, which made drafting
        # look cheap beside them exactly where a draft barely pays.
        weights = 1.0 / np.maximum(y, MIN_SECONDS)
        self.fit_coef = nonnegative_lstsq(x * weights[:, None], y * weights, self._signed)
        if self.drift_window:
            self._rescale()
        else:
            self._use(self.fit_coef)

    def predict(self, shape: BatchShape) -> float:
        """Predicted seconds for a step of this shape (the chooser prices many plans at once with
        step_times; this is for checking one step, in the debug log and the tests)."""
        return sum(c * f for c, f in zip(self._coef_list, features(shape), strict=True))

    def predict_forwards(self, shapes: list[BatchShape]) -> float:
        """Predicted seconds for several forwards (a draft model's in one step)."""
        return sum(self.predict(shape) for shape in shapes)

    @property
    def fixed_s(self) -> float:
        """What any forward costs before its first sequence: the constant term (never below 0:
        the fit may make it negative, and a rebate for running a forward would be nonsense)."""
        return max(float(self.coef[0]), 0.0)

    def step_times(self, base: BatchShape, max_tokens: int) -> list[float]:
        """Predicted time of the base step with N = 0 .. max_tokens query tokens and its other
        features unchanged (entry 0 unused), so the chooser prices many token counts with one
        pass; what draft tokens add to the other features is in draft_costs."""
        c = self.coef
        fixed = c[0] + float(np.dot(c[1 + NUM_TOKEN_FEATURES :], other_features(base)))
        slopes = c[1 : 1 + NUM_TOKEN_FEATURES]
        # One product for every token count: the chooser asks for up to ~300 each step.
        times: list[float] = (fixed + token_ramp_rows(np.arange(max_tokens + 1)) @ slopes).tolist()
        return times

    def draft_costs(self) -> DraftCosts:
        _, context_ktokens, multi_token_seqs, attention_kpairs, _, deep_kpairs = self.coef[1 + NUM_TOKEN_FEATURES :]
        return DraftCosts(
            float(context_ktokens) / 1000,
            float(multi_token_seqs),
            float(attention_kpairs) / 1000,
            float(deep_kpairs) / 1000,
        )

    def coefficients(self) -> Mapping[str, float]:
        """Seconds per unit of each feature; one read-only mapping per fit, so readers can tell a refit."""
        return self._coefficients
