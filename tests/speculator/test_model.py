"""The MLP speculator's architecture against a hand-computed reference on a tiny config."""

from __future__ import annotations

import math

import pytest
import torch

from engine.speculator.model import MLPSpeculator, SpeculatorConfig
from tests.speculator.tiny import random_speculator


def by_hand(spec: MLPSpeculator, state: list[float], tokens: list[int]) -> list[list[float]]:
    """Every head's logits for one position, in plain Python from the weights (fms-extras' formulas)."""
    c = spec.config
    state_weight = 0.5 ** (0.5 / c.num_heads)
    emb_weight = math.sqrt((1 - state_weight**2) * c.width / 2)
    if c.scale_input:
        rms = math.sqrt(sum(x * x for x in state) / len(state) + 1e-6)
        state = [x / rms / math.sqrt(2) for x in state]
    out = []
    for i, token in enumerate(tokens):
        proj, emb = spec.proj[i].weight.tolist(), spec.emb[i].weight[token].tolist()
        mixed = [sum(w * x for w, x in zip(row, state, strict=True)) for row in proj]
        mixed = [m + emb_weight / state_weight * e for m, e in zip(mixed, emb, strict=True)]
        rms = math.sqrt(sum(m * m for m in mixed) / len(mixed) + 1e-6)
        weight, bias = spec.ln[i].weight.tolist(), spec.ln[i].bias.tolist()
        normed = [m / rms * w + b for m, w, b in zip(mixed, weight, bias, strict=True)]
        state = [0.5 * x * (1 + math.erf(x / math.sqrt(2))) for x in normed]
        out.append([sum(w * x for w, x in zip(row, state, strict=True)) for row in spec.head[i].weight.tolist()])
    return out


@pytest.mark.parametrize("tie_weights,scale_input", [(False, False), (True, True)])
def test_each_head_matches_the_formulas_computed_by_hand(tie_weights: bool, scale_input: bool) -> None:
    config = SpeculatorConfig(
        emb_dim=3, vocab_size=7, num_heads=3, inner_dim=4, tie_weights=tie_weights, scale_input=scale_input
    )
    spec = random_speculator(config).double()
    states = torch.randn(2, 5, 3, dtype=torch.float64)  # [B, N, emb_dim]
    token_ids = torch.randint(0, 7, (2, 5 + 2))  # [B, N + heads - 1]
    logits = spec(states, token_ids)
    assert logits.shape == (3, 2, 5, 7)
    for b in range(2):
        for t in range(5):
            expected = by_hand(spec, states[b, t].tolist(), token_ids[b, t : t + 3].tolist())
            assert torch.allclose(logits[:, b, t], torch.tensor(expected, dtype=torch.float64), rtol=0, atol=1e-12)


def test_tied_weights_share_modules_but_the_first_projection() -> None:
    tied = MLPSpeculator(SpeculatorConfig(emb_dim=3, vocab_size=7, num_heads=4, inner_dim=5, tie_weights=True))
    assert tied.emb[0] is tied.emb[3] and tied.head[0] is tied.head[3] and tied.ln[0] is tied.ln[3]
    assert tied.proj[1] is tied.proj[3] and tied.proj[0] is not tied.proj[1]
    assert tied.proj[0].weight.shape == (5, 3) and tied.proj[1].weight.shape == (5, 5)
    untied = MLPSpeculator(SpeculatorConfig(emb_dim=3, vocab_size=7, num_heads=4, inner_dim=5))
    num_params = [sum(p.numel() for p in m.parameters()) for m in (tied, untied)]
    # untied: 4 x (emb 35 + head 35 + ln 10) + proj 15 + 3 x 25; tied: one of each, and two projections
    assert num_params == [35 + 35 + 10 + 15 + 25, 4 * 80 + 15 + 75]


def test_proposals_feed_each_head_the_token_picked_from_the_last() -> None:
    torch.manual_seed(1)
    spec = MLPSpeculator(SpeculatorConfig(emb_dim=4, vocab_size=11, num_heads=3)).double()
    states, first = torch.randn(2, 4, dtype=torch.float64), torch.tensor([3, 9])
    drafted, logits = spec.propose(states, first, 3, lambda i, head_logits: head_logits.argmax(-1))
    assert drafted.shape == (2, 3) and logits.shape == (3, 2, 11)
    # teacher forcing with the drafted tokens as the "true" next tokens gives the same logits
    forced = spec(states[:, None], torch.cat([first[:, None], drafted[:, :2]], dim=1))
    assert torch.allclose(forced[:, :, 0], logits)
    assert drafted.tolist() == logits.argmax(-1).T.tolist()
    with pytest.raises(ValueError, match="1 to 3 tokens"):
        spec.propose(states, first, 4, lambda i, head_logits: head_logits.argmax(-1))


def test_the_weights_keep_the_state_about_half_of_the_magnitude_by_the_last_head() -> None:
    config = SpeculatorConfig(emb_dim=8, vocab_size=5, num_heads=4, inner_dim=6)
    assert config.state_weight**config.num_heads == pytest.approx(0.5**0.5)  # the state's share of the variance: 1/2
    assert config.state_weight**2 + config.emb_weight**2 / (config.width / 2) == pytest.approx(1.0)
    assert SpeculatorConfig(emb_dim=8, vocab_size=5, num_heads=2).width == 8


@pytest.mark.parametrize(
    "kwargs,field",
    [
        ({"emb_dim": 0}, "emb_dim"),
        ({"vocab_size": 0}, "vocab_size"),
        ({"num_heads": 0}, "num_heads"),
        ({"inner_dim": -1}, "inner_dim"),
    ],
)
def test_bad_configs_name_the_field(kwargs: dict[str, int], field: str) -> None:
    with pytest.raises(ValueError, match=field):
        SpeculatorConfig(**({"emb_dim": 4, "vocab_size": 5, "num_heads": 2} | kwargs))
