"""How much drafts really add to a step, against what the cost model says: measured, for the
operator and for the next tuning of the chooser.

The cost model is one least-squares fit over all steps, and near the optimum a plan's goodput is
flat in its last draft tokens, so a systematic error in the price of drafts decides how many are
taken. Its sign depends on the regime: with --log-level debug, at 20-30 running requests on code
completion the steps AUTO drafted in ran 10-25% more over their plain prediction than predicted;
at 1-8 running requests on code editing they ran 40% less. The chooser also picks the plans the
model happens to price low, which biases the error upwards. So the factor is measured: after
each AUTO step that drafted, what it took beyond its plain prediction (corrected by how far
plain steps run over theirs) over what the model said drafts would add. Decayed; the first draft
step seeds a prior worth PRIOR_STEPS steps like it, which decays like them.

The chooser does not use it: it takes the model's price as it is. Weighing drafts by this ratio,
or by a constant 1.25 with a 3% margin, was slower under load (docs/goodput-policy.md).
"""

from __future__ import annotations

from dataclasses import dataclass

PRIOR_FACTOR = 1.0  # until drafts are measured, the model's price is taken as right
PRIOR_STEPS = 20.0  # the prior is worth this many draft steps
DECAY = 0.99  # per draft step: about the last 100 dominate
PLAIN_DECAY = 0.99  # per plain step
MIN_FACTOR, MAX_FACTOR = 0.5, 2.0  # one bad stretch must not turn drafting off or on for good
OUTLIER = 4.0  # a step's measured extra is clipped to its predicted extra +- this many times it (a stall)


@dataclass(slots=True)
class DraftCostFactor:
    plain_measured_s: float = 0.0  # decayed sums over plain AUTO steps
    plain_predicted_s: float = 0.0
    extra_measured_s: float = 0.0  # decayed sums over drafting AUTO steps
    extra_predicted_s: float = 0.0

    @property
    def plain_ratio(self) -> float:
        """Measured over predicted time of plain steps: the model's bias where nothing drafts."""
        return self.plain_measured_s / self.plain_predicted_s if self.plain_predicted_s > 0 else 1.0

    @property
    def value(self) -> float:
        if self.extra_predicted_s <= 0:
            return PRIOR_FACTOR
        return min(max(self.extra_measured_s / self.extra_predicted_s, MIN_FACTOR), MAX_FACTOR)

    def observe(self, plain_predicted_s: float, predicted_s: float, measured_s: float) -> None:
        """An AUTO step as chosen: its predicted time with k = 0 for all and with the chosen k,
        and its measured time."""
        if predicted_s <= plain_predicted_s:
            self.plain_measured_s = PLAIN_DECAY * self.plain_measured_s + measured_s
            self.plain_predicted_s = PLAIN_DECAY * self.plain_predicted_s + plain_predicted_s
            return
        extra_predicted_s = predicted_s - plain_predicted_s
        if self.extra_predicted_s <= 0:
            self.extra_measured_s = PRIOR_STEPS * PRIOR_FACTOR * extra_predicted_s
            self.extra_predicted_s = PRIOR_STEPS * extra_predicted_s
        extra_measured_s = measured_s - plain_predicted_s * self.plain_ratio
        extra_measured_s = min(
            max(extra_measured_s, (1 - OUTLIER) * extra_predicted_s), (1 + OUTLIER) * extra_predicted_s
        )
        self.extra_measured_s = DECAY * self.extra_measured_s + extra_measured_s
        self.extra_predicted_s = DECAY * self.extra_predicted_s + extra_predicted_s
