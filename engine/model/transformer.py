"""Our forward pass for llama-family decoders (llama, qwen2) over a ragged batch.

One step carries requests with different numbers of query tokens: a prefill chunk, one decode
token, or 1 + k tokens to verify. The linear layers run once over all of the step's tokens
(flattened), so each weight is read once per step; attention runs per sequence against that
sequence's own region of the KV cache.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from engine.kv_cache import KVCache
from engine.model.cpu_attention import KernelSeqs, ragged_attention
from engine.model.layer_ops import FusedLayerOps, layer_ops, whole_layer_rows
from engine.model.spec import ModelSpec
from engine.model.weights import LayerWeights, ModelWeights
from engine.protocol import BatchShape


@dataclass(frozen=True, slots=True)
class SeqSlice:
    """Where one sequence's query tokens sit in the flat step and where its KV lives."""

    query_start: int  # index of its first token among the step's tokens
    num_query_tokens: int
    kv_start: int  # first cache row of its region
    num_cached_tokens: int  # tokens already in the cache before this step

    @property
    def num_kv_tokens(self) -> int:
        return self.num_cached_tokens + self.num_query_tokens


@dataclass(frozen=True, slots=True)
class SeqInput:
    """One sequence's part of a step, as a caller describes it."""

    token_ids: list[int]  # fed this step, at positions num_cached_tokens onwards
    kv_start: int
    num_cached_tokens: int
    num_logits: int  # logit rows wanted, for its last tokens


@dataclass(frozen=True, slots=True)
class AttentionWindow:
    """A StreamingLLM view of a sequence's KV: its first num_sink_tokens and its last
    num_recent_tokens (the query's own included); a sequence no longer than both sees all of it."""

    num_sink_tokens: int
    num_recent_tokens: int

    def __post_init__(self) -> None:
        if self.num_sink_tokens < 0 or self.num_recent_tokens < 1:
            raise ValueError(
                "an attention window needs num_sink_tokens >= 0 and num_recent_tokens >= 1, got "
                f"{self.num_sink_tokens} and {self.num_recent_tokens}"
            )

    @property
    def num_tokens(self) -> int:
        return self.num_sink_tokens + self.num_recent_tokens

    def kv_rows(self, seq: SeqSlice) -> list[slice]:
        """The cache rows a sequence's single query token attends to."""
        start, end = seq.kv_start, seq.kv_start + seq.num_kv_tokens
        if seq.num_kv_tokens <= self.num_tokens:
            return [slice(start, end)]
        return [slice(start, start + self.num_sink_tokens), slice(end - self.num_recent_tokens, end)]


@dataclass(frozen=True, slots=True)
class ForwardBatch:
    token_ids: torch.Tensor  # [T] int64
    positions: torch.Tensor  # [T] int64
    slot_ids: torch.Tensor  # [T] int64, cache rows the step's K/V are written to
    logit_rows: torch.Tensor  # [N] int64, which of the T tokens need logits
    seqs: list[SeqSlice]
    # attention of every sequence through this view (one query token each); None: the whole KV
    window: AttentionWindow | None = None

    @classmethod
    def of(cls, inputs: list[SeqInput], device: torch.device, window: AttentionWindow | None = None) -> ForwardBatch:
        """Flattens the sequences' tokens; a token at position p is written to cache row kv_start + p."""
        token_ids: list[int] = []
        positions: list[int] = []
        slot_ids: list[int] = []
        logit_rows: list[int] = []
        seqs = []
        for item in inputs:
            num_query, first = len(item.token_ids), item.num_cached_tokens
            seqs.append(SeqSlice(len(token_ids), num_query, item.kv_start, first))
            end_row = len(token_ids) + num_query
            logit_rows.extend(range(end_row - item.num_logits, end_row))
            token_ids.extend(item.token_ids)
            positions.extend(range(first, first + num_query))
            slot_ids.extend(range(item.kv_start + first, item.kv_start + first + num_query))

        def as_tensor(values: list[int]) -> torch.Tensor:
            return torch.tensor(values, dtype=torch.long, device=device)

        if window is not None and any(len(item.token_ids) != 1 for item in inputs):
            raise ValueError("a windowed forward feeds one token per sequence")
        ids, pos, slots, rows = (as_tensor(v) for v in (token_ids, positions, slot_ids, logit_rows))
        return cls(ids, pos, slots, rows, seqs, window)

    def shape(self) -> BatchShape:
        """What the forward's time depends on, for the control plane's cost models: with a window,
        the KV tokens each sequence attends to."""
        num_kv = [seq.num_kv_tokens for seq in self.seqs]
        if self.window is not None:
            num_kv = [min(n, self.window.num_tokens) for n in num_kv]
        return BatchShape.of([(seq.num_query_tokens, n) for seq, n in zip(self.seqs, num_kv, strict=True)])


def rope_tables(
    positions: torch.Tensor, inv_freq: torch.Tensor, scale: float, dtype: torch.dtype
) -> tuple[torch.Tensor, torch.Tensor]:
    # positions: [T] -> cos, sin: [T, 1, D/2], computed in float32 like transformers.
    freqs = positions.float()[:, None] * inv_freq[None, :]
    cos = (freqs.cos() * scale).to(dtype)
    sin = (freqs.sin() * scale).to(dtype)
    return cos[:, None, :], sin[:, None, :]


def causal_mask(seq: SeqSlice, num_groups: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor | None:
    """Additive mask [G * n, L] letting query i see keys up to its own position; None for n == 1."""
    n, num_kv = seq.num_query_tokens, seq.num_kv_tokens
    if n == 1:
        return None
    query_pos = torch.arange(n, device=device)[:, None] + seq.num_cached_tokens
    key_pos = torch.arange(num_kv, device=device)[None, :]
    mask = torch.zeros(n, num_kv, dtype=dtype, device=device).masked_fill(key_pos > query_pos, float("-inf"))
    return mask.repeat(num_groups, 1)


def attend(q: torch.Tensor, k_t: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None, out: torch.Tensor) -> None:
    """Grouped-query attention of one sequence, written into `out`.

    q: [n, H, D], already scaled; k_t: [Hkv, D, L] and v: [Hkv, L, D] (from the cache), all three in
    the dtype attention computes in;
    mask: [G * n, L] or None; out: [n, H * D]. The G query heads that share a KV head are folded
    into rows, so no K/V is repeated. A decode step (n = 1) needs no reshuffling at all.
    """
    n, num_heads, head_dim = q.shape
    num_kv_heads = k_t.shape[0]
    groups = num_heads // num_kv_heads
    if n == 1:
        qg = q.view(num_kv_heads, groups, head_dim)
    else:
        qg = q.view(n, num_kv_heads, groups, head_dim).permute(1, 2, 0, 3).reshape(num_kv_heads, groups * n, head_dim)
    if k_t.device.type == "cpu":
        # On the CPU attention computes in float32, where matmul-softmax-matmul beats SDPA's
        # kernels for short query blocks.
        scores = torch.bmm(qg, k_t)  # [Hkv, G*n, L]
        if mask is not None:
            scores += mask
        probs = torch.softmax(scores, dim=-1)
        if n == 1:
            torch.bmm(probs, v, out=out.view(num_kv_heads, groups, head_dim))
            return
        o = torch.bmm(probs, v)
    else:
        o = F.scaled_dot_product_attention(qg, k_t.transpose(1, 2), v, attn_mask=mask, scale=1.0)
    out.copy_(o.view(num_kv_heads, groups, n, head_dim).permute(2, 0, 1, 3).reshape(n, num_heads * head_dim))


def attend_each(
    q: torch.Tensor,
    kv_cache: KVCache,
    layer_idx: int,
    seqs: list[tuple[SeqSlice, torch.Tensor | None]],
    window: AttentionWindow | None,
    out: torch.Tensor,
) -> None:
    """Attention one sequence at a time (`attend`), for the sequences the CPU kernel does not take
    and wherever it is not built. q: [T, H, D]; seqs: each with its causal mask; writes their rows
    of out [T, H * D]."""
    v_cache = kv_cache.v_layers[layer_idx]
    for seq, mask in seqs:
        q_rows = slice(seq.query_start, seq.query_start + seq.num_query_tokens)
        kv_rows = [slice(seq.kv_start, seq.kv_start + seq.num_kv_tokens)] if window is None else window.kv_rows(seq)
        if len(kv_rows) == 1:
            k_t, v = kv_cache.k_t_span(layer_idx, kv_rows[0]), v_cache[:, kv_rows[0]]
        else:  # sinks and recent rows as one block: a copy of the window's rows, not a view
            k_t = torch.cat([kv_cache.k_t_span(layer_idx, rows) for rows in kv_rows], dim=2)
            v = torch.cat([v_cache[:, rows] for rows in kv_rows], dim=1)
        dtype = kv_cache.compute_dtype  # a bfloat16 cache on the CPU widens here
        attend(q[q_rows].to(dtype), k_t.to(dtype), v.to(dtype), mask, out[q_rows])


class Transformer:
    """Stateless apart from its weights: the KV cache is passed in by the caller."""

    def __init__(self, spec: ModelSpec, weights: ModelWeights) -> None:
        self.spec = spec
        self.weights = weights
        self.scale = spec.head_dim**-0.5
        on_cpu = weights.embed.device.type == "cpu"
        self.kernel = ragged_attention(spec.head_dim) if on_cpu else None
        self.ops = layer_ops(weights.embed.dtype, weights.embed.device)
        self.whole_layer_rows = 0
        self._refresh_whole_layer_rows()

    def _refresh_whole_layer_rows(self) -> None:
        # steps of up to this many tokens run a layer per call where the attention kernel takes them all
        self.whole_layer_rows = whole_layer_rows(self.ops, self.weights.layers) if self.kernel is not None else 0

    @property
    def has_kernel_products(self) -> bool:
        return all(product.blocks is not None for product in self.weights.products())

    @property
    def kernel_row_limit(self) -> int:
        """Up to how many rows products run in our kernel (set_kernel_rows; 0: none)."""
        return max((product.max_kernel_rows for product in self.weights.products()), default=0)

    def set_kernel_rows(self, max_rows: int, free_unused: bool = False) -> None:
        """Products of up to max_rows rows run in the few-rows kernel, the rest in oneDNN (row_limit.py
        times which is faster); with free_unused, a limit of 0 also frees the kernel's copies of
        the weights."""
        for product in self.weights.products():
            if max_rows == 0 and free_unused:
                product.free_kernel()
            else:
                product.set_kernel_rows(max_rows)
        self._refresh_whole_layer_rows()

    @property
    def dtype(self) -> torch.dtype:
        return self.weights.embed.dtype

    @property
    def device(self) -> torch.device:
        return self.weights.embed.device

    def forward(self, batch: ForwardBatch, kv_cache: KVCache) -> torch.Tensor:
        """Runs the step's tokens through the model; returns logits [N, vocab] for `logit_rows`."""
        return self.weights.lm_head(self.hidden_states(batch, kv_cache))

    def hidden_states(self, batch: ForwardBatch, kv_cache: KVCache) -> torch.Tensor:
        """Runs the step's tokens through the model; returns the final-norm hidden states [N, hidden]
        of `logit_rows` (what the output layer reads, and what an MLP speculator drafts from)."""
        spec, w = self.spec, self.weights
        x = w.embed[batch.token_ids]  # [T, hidden]
        cos, sin = rope_tables(batch.positions, w.inv_freq, w.rope_scale, x.dtype)
        groups = spec.num_heads // spec.num_kv_heads
        kernel_seqs = self._kernel_seqs(batch)
        looped = (
            []
            if kernel_seqs is not None
            else [(seq, causal_mask(seq, groups, kv_cache.compute_dtype, x.device)) for seq in batch.seqs]
        )
        ops, eps = self.ops, spec.rms_norm_eps
        if isinstance(ops, FusedLayerOps) and kernel_seqs is not None and len(x) <= self.whole_layer_rows:
            ops.decoder_layers(
                x, w.layers, eps, cos, sin, kv_cache, batch.slot_ids, spec.num_heads, self.scale, kernel_seqs
            )
            return ops.add_rms_norm(x[batch.logit_rows], None, w.final_norm, eps)
        mlp_out = None  # each layer's MLP output joins the residual stream in the next layer's norm
        for layer_idx, layer in enumerate(w.layers):
            h = ops.add_rms_norm(x, mlp_out, layer.input_norm, eps)
            attn_out = self._attention(layer_idx, layer, h, batch, kv_cache, cos, sin, kernel_seqs, looped)
            h = ops.add_rms_norm(x, attn_out, layer.post_norm, eps)
            mlp_out = layer.down(ops.silu_mul(layer.gate_up(h)))
        assert mlp_out is not None  # a model has layers
        x.add_(mlp_out)
        return ops.add_rms_norm(x[batch.logit_rows], None, w.final_norm, eps)

    def _kernel_seqs(self, batch: ForwardBatch) -> KernelSeqs | None:
        """The step's sequences as the CPU kernel reads them, all in one call per layer; None where
        there is no kernel and the per-sequence loop attends them (cpu_attention.py)."""
        if self.kernel is None:
            return None
        window = batch.window
        sinks, recent = (window.num_sink_tokens, window.num_recent_tokens) if window else (0, 0)
        seqs = torch.tensor([(s.query_start, s.num_query_tokens, s.kv_start, s.num_kv_tokens) for s in batch.seqs])
        return KernelSeqs(seqs, sinks, recent)

    def _attention(
        self,
        layer_idx: int,
        layer: LayerWeights,
        h: torch.Tensor,
        batch: ForwardBatch,
        kv_cache: KVCache,
        cos: torch.Tensor,
        sin: torch.Tensor,
        kernel_seqs: KernelSeqs | None,
        looped: list[tuple[SeqSlice, torch.Tensor | None]],
    ) -> torch.Tensor:
        # h: the input norm of the residual stream, [T, hidden]
        spec = self.spec
        num_tokens = h.shape[0]
        qkv = layer.qkv(h).view(num_tokens, -1, spec.head_dim)
        q = self.ops.rope_write_kv(qkv, cos, sin, kv_cache, layer_idx, batch.slot_ids, spec.num_heads, self.scale)
        if kernel_seqs is not None and self.kernel is not None:
            attn = self.kernel(
                q,
                kv_cache.k_t_layers[layer_idx],  # the cache's own paged layout
                kv_cache.v_layers[layer_idx],
                kernel_seqs.seqs,
                kernel_seqs.num_sink_tokens,
                kernel_seqs.num_recent_tokens,
            )
        else:
            attn = torch.empty(
                num_tokens, spec.num_heads * spec.head_dim, dtype=kv_cache.compute_dtype, device=h.device
            )
            attend_each(q, kv_cache, layer_idx, looped, batch.window, attn)
        return layer.o_proj(attn.to(h.dtype))
