"""Comparing sampled outcomes, for the statistical tests of speculative sampling."""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable

import torch

from engine.drafters.base import Draft, DraftRequest

Propose = Callable[[list[DraftRequest]], list[Draft]]


def total_variation(a: Counter[tuple[int, ...]], b: Counter[tuple[int, ...]]) -> float:
    """Half the L1 distance between two empirical distributions."""
    n_a, n_b = sum(a.values()), sum(b.values())
    return 0.5 * sum(abs(a[key] / n_a - b[key] / n_b) for key in a.keys() | b.keys())


def claiming_uniform_q(propose: Propose) -> Propose:
    """A drafter's propose whose drafts claim q is uniform (wrong): verification then accepts
    whatever the target's top-k holds, which a test of the output distribution must catch."""

    def wrapped(requests: list[DraftRequest]) -> list[Draft]:
        return [
            Draft(d.token_ids, None if d.probs is None else torch.full_like(d.probs, 1 / d.probs.shape[-1]))
            for d in propose(requests)
        ]

    return wrapped
