"""The MLP speculator (IBM, arXiv 2404.19124): small chained heads that guess the next few tokens
from the target's last hidden state, as in fms-extras `MLPSpeculator` and vLLM's port.

Head i takes the running state and the embedding of the token before the one it predicts (for
head 0, the token the target itself just produced from that hidden state):

    s = GELU(LN_i(Proj_i(s) + (emb_weight / state_weight) * Emb_i(token)))
    logits_i = Head_i(s)

The two weights keep the state's share of the magnitude about 50% by the last head; the layer
norm that follows absorbs the overall scale (fms-extras' comment). LN is RMS-style with a bias
(no mean subtracted), eps 1e-6. With tie_weights all heads share Emb, Head and LN, and heads 2..
share head 1's Proj (head 0's input width may differ); with scale_input the hidden state is first
normalised (no affine) and divided by sqrt 2.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

LN_EPS = 1e-6
PickToken = Callable[[int, torch.Tensor], torch.Tensor]  # (head, logits [B, vocab]) -> its tokens [B]
RunHead = Callable[[int, torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]]  # see run_head


@dataclass(frozen=True, slots=True)
class SpeculatorConfig:
    emb_dim: int  # the target's hidden size
    vocab_size: int
    num_heads: int  # n_predict: how many tokens it proposes at most
    inner_dim: int = 0  # 0: emb_dim
    tie_weights: bool = False
    scale_input: bool = False

    def __post_init__(self) -> None:
        for name in ("emb_dim", "vocab_size", "num_heads"):
            if getattr(self, name) < 1:
                raise ValueError(f"speculator {name} must be at least 1, got {getattr(self, name)}")
        if self.inner_dim < 0:
            raise ValueError(f"speculator inner_dim must be 0 (the hidden size) or positive, got {self.inner_dim}")

    @property
    def width(self) -> int:
        return self.inner_dim or self.emb_dim

    @property
    def state_weight(self) -> float:
        return math.pow(0.5, 0.5 / self.num_heads)

    @property
    def emb_weight(self) -> float:
        return math.sqrt((1 - self.state_weight**2) * (self.width / 2))


class RMSNormWithBias(nn.Module):
    """x / rms(x) * weight + bias (fms-extras' LayerNormParameterized with use_mean=False)."""

    def __init__(self, dim: int, is_affine: bool = True) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim)) if is_affine else None
        self.bias = nn.Parameter(torch.zeros(dim)) if is_affine else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + LN_EPS)
        if self.weight is not None and self.bias is not None:
            x = x * self.weight + self.bias
        return x


class MLPSpeculator(nn.Module):
    def __init__(self, config: SpeculatorConfig) -> None:
        super().__init__()
        self.config = config
        width, n = config.width, config.num_heads
        num_distinct = 1 if config.tie_weights else n
        embs = [nn.Embedding(config.vocab_size, width) for _ in range(num_distinct)]
        heads = [nn.Linear(width, config.vocab_size, bias=False) for _ in range(num_distinct)]
        norms = [RMSNormWithBias(width) for _ in range(num_distinct)]
        projs = [nn.Linear(config.emb_dim if i == 0 else width, width, bias=False) for i in range(min(n, 2))]
        if not config.tie_weights:
            projs += [nn.Linear(width, width, bias=False) for _ in range(2, n)]
        # Tied: the same module object at several indices, so its parameters are shared (and saved once).
        self.emb = nn.ModuleList(embs[min(i, num_distinct - 1)] for i in range(n))
        self.head = nn.ModuleList(heads[min(i, num_distinct - 1)] for i in range(n))
        self.ln = nn.ModuleList(norms[min(i, num_distinct - 1)] for i in range(n))
        self.proj = nn.ModuleList(projs[min(i, len(projs) - 1)] for i in range(n))
        self.ln0 = RMSNormWithBias(config.emb_dim, is_affine=False) if config.scale_input else None
        self.reset_parameters()

    def reset_parameters(self) -> None:
        std = 1 / math.sqrt(self.config.width)
        for module in self.modules():
            if isinstance(module, nn.Embedding | nn.Linear):
                nn.init.normal_(module.weight, 0.0, std)
            elif isinstance(module, RMSNormWithBias) and module.weight is not None and module.bias is not None:
                nn.init.ones_(module.weight)
                nn.init.zeros_(module.bias)

    def _input(self, state: torch.Tensor) -> torch.Tensor:
        if self.ln0 is None:
            return state
        normed: torch.Tensor = self.ln0(state)
        return normed / math.sqrt(2)

    def _head_state(self, i: int, state: torch.Tensor, token_ids: torch.Tensor) -> torch.Tensor:
        # state: [..., emb_dim or width]; token_ids: [...] -> [..., width]
        config = self.config
        mixed = self.proj[i](state) + (config.emb_weight / config.state_weight) * self.emb[i](token_ids)
        return nn.functional.gelu(self.ln[i](mixed))

    def forward(self, states: torch.Tensor, token_ids: torch.Tensor) -> torch.Tensor:
        """Teacher-forced logits for training. states: [B, N, emb_dim], the target's hidden states at
        N positions; token_ids: [B, N + num_heads - 1], token_ids[:, t] the token after position t.
        Head i at position t reads token_ids[:, t + i] and predicts the token after it, i.e. the
        token i + 2 places after position t. Returns [num_heads, B, N, vocab]."""
        n = states.shape[1]
        state = self._input(states)
        logits = []
        for i in range(self.config.num_heads):
            state = self._head_state(i, state, token_ids[:, i : i + n])
            logits.append(self.head[i](state))
        return torch.stack(logits)

    def run_head(self, i: int, state: torch.Tensor, token_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Head i at inference: state [B, emb_dim] (the target's hidden state, for head 0) or
        [B, width] (head i - 1's), token_ids [B] the token after it -> the state head i + 1 reads
        and head i's logits [B, vocab]."""
        state = self._head_state(i, self._input(state) if i == 0 else state, token_ids)
        return state, self.head[i](state)

    @torch.no_grad()
    def propose(
        self,
        states: torch.Tensor,
        token_ids: torch.Tensor,
        num_tokens: int,
        pick: PickToken,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Drafts num_tokens tokens per sequence, each head fed the token picked from the previous
        one. states: [B, emb_dim], the hidden state that produced token_ids: [B]; pick(i, logits
        [B, vocab]) -> [B] chooses head i's tokens (argmax, or a sample). Returns the drafted ids
        [B, num_tokens] and every head's logits [num_tokens, B, vocab]."""
        state, logits = self.run_head(0, states, token_ids)
        return self.propose_after_head_0(state, logits, num_tokens, pick)

    @torch.no_grad()
    def propose_after_head_0(
        self, state: torch.Tensor, logits: torch.Tensor, num_tokens: int, pick: PickToken
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """propose(), once head 0 has run (a drafter runs it early, to offer with its confidence):
        state [B, width] is what head 1 reads, logits [B, vocab] head 0's."""
        return chain_heads(self.run_head, self.config.num_heads, state, logits, num_tokens, pick)


def chain_heads(
    run_head: RunHead, num_heads: int, state: torch.Tensor, logits: torch.Tensor, num_tokens: int, pick: PickToken
) -> tuple[torch.Tensor, torch.Tensor]:
    """Heads 1..num_tokens - 1 after head 0 (its state and logits given), each fed the token
    picked from the one before -> the drafted ids [B, num_tokens] and every head's logits."""
    if not 1 <= num_tokens <= num_heads:
        raise ValueError(f"the speculator proposes 1 to {num_heads} tokens, got {num_tokens}")
    token = pick(0, logits)
    drafted, all_logits = [token], [logits]
    for i in range(1, num_tokens):
        state, head_logits = run_head(i, state, token)
        all_logits.append(head_logits)
        token = pick(i, head_logits)
        drafted.append(token)
    return torch.stack(drafted, dim=1), torch.stack(all_logits)
