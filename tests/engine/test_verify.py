"""Verification keeps the target distribution exactly.

On a toy vocabulary (5 tokens, a bigram target), many seeded speculative generations of three
tokens are compared with the exact distribution of three-token sequences: a chi-square test at
p = 0.001 over the 125 sequences, and a total-variation distance below 0.05 (sampling noise
alone gives about 0.03 at 20000 draws). The seeds are fixed, so the test is deterministic.
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Callable

import pytest
import torch

from engine.protocol import SamplingParams
from engine.sampling import logits_to_probs, position_noise, sample
from engine.verify import accept_matching, rejection_sample, verify_sampled

VOCAB = 5
LENGTH = 3
NUM_TRIALS = 20_000

DraftFn = Callable[[int, int, int], tuple[list[int], torch.Tensor | None]]


def bigram_table(seed: int) -> torch.Tensor:
    table = torch.rand(VOCAB, VOCAB, generator=torch.Generator().manual_seed(seed)) + 0.05
    return table / table.sum(-1, keepdim=True)


TARGET = bigram_table(0)
DRAFT = bigram_table(1)


def speculative_generate(seed: int, num_draft: int, draft_fn: DraftFn, params: SamplingParams) -> tuple[int, ...]:
    tokens = [0]
    while len(tokens) <= LENGTH:
        draft_ids, draft_probs = draft_fn(tokens[-1], num_draft, seed * 1000 + len(tokens))
        context = [tokens[-1], *draft_ids]
        logits = torch.log(TARGET[context])  # [k + 1, V]
        tokens += verify_sampled(logits, draft_ids, draft_probs, params, first_position=len(tokens))
    return tuple(tokens[1 : LENGTH + 1])


def one_hot_draft(last: int, num_draft: int, seed: int) -> tuple[list[int], torch.Tensor | None]:
    """A deterministic drafter (like n-gram lookup): always proposes (last + 1) mod V, ..."""
    return [(last + i + 1) % VOCAB for i in range(num_draft)], None


def make_model_draft(params: SamplingParams) -> DraftFn:
    def model_draft(last: int, num_draft: int, seed: int) -> tuple[list[int], torch.Tensor | None]:
        gen = torch.Generator().manual_seed(seed)
        ids, rows = [], []
        for _ in range(num_draft):
            probs = logits_to_probs(torch.log(DRAFT[[last]]), params)[0]
            last = int(torch.multinomial(probs, 1, generator=gen))
            ids.append(last)
            rows.append(probs)
        return ids, torch.stack(rows)

    return model_draft


def exact_distribution(params: SamplingParams) -> dict[tuple[int, ...], float]:
    probs = logits_to_probs(torch.log(TARGET), params)  # [V, V]: row = previous token
    dist = {}
    for a in range(VOCAB):
        for b in range(VOCAB):
            for c in range(VOCAB):
                dist[(a, b, c)] = float(probs[0, a] * probs[a, b] * probs[b, c])
    return dist


def chi_square_critical(dof: int, z: float = 3.09) -> float:
    """Wilson-Hilferty approximation of the chi-square quantile; z = 3.09 is p = 0.001."""
    return dof * (1 - 2 / (9 * dof) + z * math.sqrt(2 / (9 * dof))) ** 3


def assert_matches(counts: Counter[tuple[int, ...]], expected: dict[tuple[int, ...], float]) -> None:
    cells = [seq for seq, p in expected.items() if p > 0]
    chi2 = sum((counts[seq] - NUM_TRIALS * expected[seq]) ** 2 / (NUM_TRIALS * expected[seq]) for seq in cells)
    assert sum(counts[seq] for seq in expected if expected[seq] == 0) == 0, "sampled an impossible sequence"
    tv = 0.5 * sum(abs(counts[seq] / NUM_TRIALS - p) for seq, p in expected.items())
    assert chi2 < chi_square_critical(len(cells) - 1), f"chi2={chi2:.1f} over {len(cells) - 1} dof"
    assert tv < 0.05, f"total variation {tv:.4f}"


def seeded(params: SamplingParams, seed: int) -> SamplingParams:
    return SamplingParams(params.temperature, params.top_p, params.top_k, seed)


CASES = {
    "plain": SamplingParams(temperature=1.0),
    "temperature-top-k": SamplingParams(temperature=0.7, top_k=3),
    "top-p": SamplingParams(temperature=1.3, top_p=0.8),
}


@pytest.mark.parametrize("params", CASES.values(), ids=CASES.keys())
@pytest.mark.parametrize("num_draft", [1, 3])
def test_one_hot_drafts_keep_target_distribution(params: SamplingParams, num_draft: int) -> None:
    counts = Counter(
        speculative_generate(seed, num_draft, one_hot_draft, seeded(params, seed)) for seed in range(NUM_TRIALS)
    )
    assert_matches(counts, exact_distribution(params))


@pytest.mark.parametrize("params", CASES.values(), ids=CASES.keys())
def test_model_drafts_keep_target_distribution(params: SamplingParams) -> None:
    draft_fn = make_model_draft(params)
    counts = Counter(speculative_generate(seed, 2, draft_fn, seeded(params, seed)) for seed in range(NUM_TRIALS))
    assert_matches(counts, exact_distribution(params))


def test_speculation_without_drafts_is_plain_sampling() -> None:
    params = SamplingParams(temperature=1.0)
    counts = Counter(
        speculative_generate(seed, 0, one_hot_draft, SamplingParams(1.0, seed=seed)) for seed in range(NUM_TRIALS)
    )
    assert_matches(counts, exact_distribution(params))


def test_accept_matching_counts_accepted_recovered_and_bonus() -> None:
    assert accept_matching([5, 6, 7], [5, 6, 7, 8]) == [5, 6, 7, 8]  # all accepted + bonus
    assert accept_matching([5, 6, 7], [5, 9, 7, 8]) == [5, 9]  # one accepted + recovered
    assert accept_matching([5], [4, 1]) == [4]  # rejected at once
    assert accept_matching([], [3]) == [3]  # plain decoding


def test_rejection_sample_accepts_everything_when_draft_equals_target() -> None:
    probs = torch.softmax(torch.randn(4, VOCAB, generator=torch.Generator().manual_seed(0)), -1)
    noise = position_noise(7, 0, 4, VOCAB, torch.device("cpu"))
    draft_ids = sample(probs[:3], noise[:3])
    emitted = rejection_sample(probs, probs[:3], draft_ids, noise)
    assert emitted[:3] == draft_ids.tolist() and len(emitted) == 4


def test_same_seed_same_noise_other_seed_other_noise() -> None:
    a = position_noise(123, 10, 3, 50, torch.device("cpu"))
    b = position_noise(123, 10, 3, 50, torch.device("cpu"))
    c = position_noise(124, 10, 3, 50, torch.device("cpu"))
    torch.testing.assert_close(a, b, rtol=0, atol=0)
    assert not torch.equal(a, c)
    # keyed by position: the noise of position 11 does not depend on where the block started
    torch.testing.assert_close(position_noise(123, 11, 1, 50, torch.device("cpu"))[0], a[1], rtol=0, atol=0)


def test_top_k_and_top_p_remove_tokens() -> None:
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]]))
    top_k = logits_to_probs(logits, SamplingParams(temperature=1.0, top_k=2))
    torch.testing.assert_close(top_k, torch.tensor([[0.625, 0.375, 0.0, 0.0]]))
    top_p = logits_to_probs(logits, SamplingParams(temperature=1.0, top_p=0.75))
    torch.testing.assert_close(top_p, torch.tensor([[0.625, 0.375, 0.0, 0.0]]))


@pytest.mark.parametrize("temperature", [1e-38, 1e-45, 1e-30, 1e-8])
def test_tiny_temperature_is_greedy_not_garbage(temperature: float) -> None:
    # Regression: logits / 1e-38 overflowed to inf, softmax gave NaN and sampling returned token 0.
    logits = torch.tensor([[1.0, 3.5, -2.0, 3.25, 0.0], [40.0, -40.0, 39.0, 0.0, 1.0]])
    params = SamplingParams(temperature=torch.tensor(temperature).item(), seed=1)
    probs = logits_to_probs(logits, params)
    assert torch.isfinite(probs).all()
    assert probs.argmax(-1).tolist() == [1, 0]
    assert probs.max(-1).values.tolist() == [1.0, 1.0]
    noise = position_noise(params.seed, 0, 2, logits.shape[-1], logits.device)
    assert sample(probs, noise).tolist() == [1, 0]


def test_tiny_temperature_splits_ties_evenly() -> None:
    probs = logits_to_probs(torch.tensor([[2.0, 5.0, 5.0, 1.0]]), SamplingParams(temperature=1e-38))
    assert probs.tolist() == [[0.0, 0.5, 0.5, 0.0]]
