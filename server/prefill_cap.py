"""How much prompt a step may prefill beside decoding requests: bounded by time, not tokens.

A token budget does not bound a step's time: a prompt token at 8K tokens of context costs
several times one at the start. So while requests decode, the scheduler cuts prefill chunks to
what the step-cost model says keeps the step within `max_slowdown` times the decodes' own step
(their inter-token latency). The model is linear and fitted mostly on short steps; on long
prompts it under-prices exactly the steps this bounds. So the limit is corrected by what was
measured: the ratio of measured to predicted time, kept apart for decode-only steps and for steps
that also prefilled, turns a bound on measured times into one on predicted times.

The correction holds on average, not for every step, and near the end of an 8K prompt a single
prompt token costs more than a decode step. So the measured time a step took beyond the bound
(max_slowdown times the decodes' own step) is kept as an overrun, which steps without prefill
pay off; while there is one, no prompt runs beside the decodes. Over a long prefill the
decodes' mean step then stays within the bound, measured.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from engine.protocol import BatchShape

BIAS_DECAY = 0.1  # EMA weight of the latest step's measured / predicted time
MIN_OVERRUN_S = 1e-6  # less is the fit's rounding, not a step that ran over


@dataclass
class PrefillCap:
    max_slowdown: float  # 0: off, chunks fill the token budget
    decode_bias: float = 1.0  # measured / predicted time of decode-only steps
    prefill_bias: float = 1.0  # the same for steps that prefilled beside decodes
    overrun_s: float = 0.0  # measured time steps with prefill took beyond the bound, not yet paid off
    decode_s: float | None = None  # the last plan's decodes alone, by the model corrected by decode_bias

    def max_step_s(self, predict: Callable[[BatchShape], float | None], decode_shape: BatchShape) -> float | None:
        """The predicted time a step that prefills beside these decodes may take; None: no bound
        (the cap is off, or the cost model is not fitted yet)."""
        if self.max_slowdown <= 0:
            return None
        predicted_s = predict(decode_shape)
        if predicted_s is None:
            return None
        self.decode_s = predicted_s * self.decode_bias
        return self.bound_s(predicted_s)

    def bound_s(self, decode_s: float) -> float:
        """The predicted time a step may take that prefills beside decodes predicted to take decode_s."""
        return self.max_slowdown * decode_s * self.decode_bias / self.prefill_bias

    @property
    def is_overrun(self) -> bool:
        """Earlier steps with prefill ran over the bound: the next step should prefill nothing."""
        return self.overrun_s > MIN_OVERRUN_S

    def forgive(self) -> None:
        """Nothing decodes: there is no stream left to make the time up to."""
        self.overrun_s = 0.0

    def observe(self, predicted_s: float | None, measured_s: float, is_prefilling: bool, draft_s: float = 0.0) -> None:
        """A step with decodes, and prompt chunks beside them when is_prefilling, took measured_s;
        draft_s of it (predicted) verified the decodes' drafts. The bound is max_slowdown times
        the decodes' own step, their drafts included: a stream whose step yields more tokens may
        wait as much longer for it (the scheduler grows the chunk beside drafts to match). Counted
        as overrun, drafts stalled the prompt every other step: 16 requests arriving together
        under AUTO took about a third longer to all get their first token than with speculation
        off (6.0 s against 4.4 s, 3 runs each, float32)."""
        if predicted_s is None or predicted_s <= 0 or measured_s <= 0:
            return
        if self.max_slowdown > 0 and self.decode_s is not None:
            # A step that prefilled adds what it took beyond the bound (or takes off what it left);
            # one that did not pays off what a plain decode step leaves of the bound, however long
            # its drafts made it: an overrun always ends, so a waiting prompt never starves.
            allowance = self.max_slowdown * self.decode_s
            excess = (
                measured_s - self.max_slowdown * draft_s - allowance if is_prefilling else self.decode_s - allowance
            )
            self.overrun_s = max(0.0, self.overrun_s + excess)
        ratio = measured_s / predicted_s
        if is_prefilling:
            self.prefill_bias += BIAS_DECAY * (ratio - self.prefill_bias)
        else:
            self.decode_bias += BIAS_DECAY * (ratio - self.decode_bias)


def largest_within(upper: int, cost: Callable[[int], float], limit: float, minimum: int) -> int:
    """The largest n in [minimum, upper] with cost(n) <= limit, by bisection (cost grows with n);
    minimum when none is."""
    lo, hi = minimum, upper
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if cost(mid) <= limit:
            lo = mid
        else:
            hi = mid - 1
    return lo
