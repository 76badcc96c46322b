"""The speculator's heads as the drafter runs them: MLPSpeculator.run_head's arithmetic, with the
products in the engine's few-rows kernel over bfloat16 weights on the CPU.

Drafting runs between two target forwards, so a head's weights come from memory each time: the
projection onto 4,097 classes alone is 9.4 MB in float32. Served as trained (nn.Linear, F.linear),
a head took 0.8-1.1 ms in the engine at batch 1 (Intel Xeon with AMX), of which 0.45-0.55 ms its
product (F.linear repacks a bfloat16 weight on every call): FIXED k = 3 drafting cost 2.9 ms a
step of 12, now 1.5. The kernel reads a bfloat16 weight at about the memory's speed; the small
operations are the fewest torch calls that compute the same (rms_norm with the bias after it).
(The forward after drafting still runs 0.6-0.9 ms slower than n-gram's at the same shape, most
likely as the heads' weights push the target's out of the cache.)

The drafts are proposals: verification decides what is emitted, so bfloat16 heads under a float32
target keep greedy output exact, and the sampled path draws from the distribution it reports.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from engine.model.linear import MAX_KERNEL_ROWS, Linear, kernel_fits
from engine.speculator.model import LN_EPS, MLPSpeculator, PickToken, chain_heads


class ServedSpeculator:
    """The trained heads, ready to draft with: run_head and propose_after_head_0 as MLPSpeculator's."""

    def __init__(self, model: MLPSpeculator, device: torch.device, dtype: torch.dtype) -> None:
        """dtype: the products' on a device without the kernel (the target's); with it, bfloat16."""
        config = model.config
        self.num_heads = config.num_heads
        self.width = config.width
        self.emb_scale = config.emb_weight / config.state_weight
        self.product_dtype = torch.bfloat16 if kernel_fits(torch.bfloat16, device) else dtype
        max_rows = MAX_KERNEL_ROWS if kernel_fits(self.product_dtype, device) else 0
        linears: dict[int, Linear] = {}  # by module: tied heads share one copy

        def linear(module: nn.Module) -> Linear:
            if id(module) not in linears:
                weight = module.get_parameter("weight").detach().to(device, self.product_dtype).contiguous()
                linears[id(module)] = Linear(weight, max_kernel_rows=max_rows)
            return linears[id(module)]

        def tensor(module: nn.Module, name: str) -> torch.Tensor:
            return module.get_parameter(name).detach().to(device, torch.float32)

        self.proj = [linear(m) for m in model.proj]
        self.head = [linear(m) for m in model.head]
        self.emb = [tensor(m, "weight") for m in model.emb]  # [C, width]: a few rows read a step
        self.norm_weight = [tensor(m, "weight") for m in model.ln]
        self.norm_bias = [tensor(m, "bias") for m in model.ln]
        self.is_input_scaled = model.ln0 is not None

    def run_head(self, i: int, state: torch.Tensor, token_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """state [B, emb_dim] (the target's hidden state, for head 0) or [B, width] (head i - 1's,
        float32); token_ids [B] -> the state head i + 1 reads and head i's logits [B, C], float32.
        The drafter calls it under inference mode; the weights need no gradient either way."""
        if i == 0 and self.is_input_scaled:
            state = F.rms_norm(state.float(), (state.shape[-1],), eps=LN_EPS) / math.sqrt(2)
        mixed = self.proj[i](state.to(self.product_dtype)).float() + self.emb_scale * self.emb[i][token_ids]
        normed = F.rms_norm(mixed, (self.width,), self.norm_weight[i], LN_EPS) + self.norm_bias[i]
        state = F.gelu(normed)
        return state, self.head[i](state.to(self.product_dtype)).float()

    def propose_after_head_0(
        self, state: torch.Tensor, logits: torch.Tensor, num_tokens: int, pick: PickToken
    ) -> tuple[torch.Tensor, torch.Tensor]:
        return chain_heads(self.run_head, self.num_heads, state, logits, num_tokens, pick)
