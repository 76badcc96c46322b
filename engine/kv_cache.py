"""The preallocated KV cache and the allocator of its token rows.

Each request owns one contiguous region of rows, reserved for its prompt plus its maximum new
tokens, so its keys and values are a view, never a gather. Rolling back rejected draft tokens is
a change of the request's length: the rows are simply overwritten by the next step.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from engine.model.cpu_attention import ragged_attention
from engine.model.spec import ModelSpec


class KVCacheFullError(RuntimeError):
    """More rows were asked for than the cache has free."""


@dataclass(slots=True)
class Region:
    start: int
    num_tokens: int

    @property
    def end(self) -> int:
        return self.start + self.num_tokens


def kv_dtype(model_dtype: torch.dtype, device: torch.device, head_dim: int) -> torch.dtype:
    """The model's dtype on CUDA. On the CPU float32, but bfloat16 for a bfloat16 model whose
    attention the CPU kernel runs (engine/model/cpu_attention.py): it reads the cache at half the
    bytes and widens each value as it reads it, where torch's bfloat16 products cost tens of
    microseconds however small (oneDNN; a bfloat16 cache on them made decoding 1.6-1.8x slower at
    batch 16, docs/decode-profile.md). Either way attention computes in float32, and a bfloat16
    model's rotated K and V are bfloat16 values already, so the cache holds them exactly."""
    if device.type != "cpu":
        return model_dtype
    if model_dtype == torch.bfloat16 and ragged_attention(head_dim) is not None:
        return torch.bfloat16
    return torch.float32


# On the CPU, K is stored transposed a page of this many tokens at a time (see KVCache): the
# attention kernel's keys per pass (csrc/cpu_attention.cpp kKeysPerPass).
K_PAGE_TOKENS = 32


class KVCache:
    """K and V for every layer (kv_dtype says in which dtype). V is [layers, Hkv, capacity, D],
    head-major so that a region is a strided view.

    On the CPU K is stored transposed, a page of K_PAGE_TOKENS tokens at a time:
    [layers, Hkv, pages, D, K_PAGE_TOKENS]. Transposed, q . K^T is a product of row-major operands
    (MKL runs the other layout on one thread in float32). Paged, the attention kernel's pass over a
    page's keys reads one contiguous 8 KB block (head_dim 64) in order, and a region's pages follow
    one another; stored whole, the pass read a few lines from each of D rows 256 KB apart, which
    the hardware prefetcher does not follow (bfloat16: 1.00-1.04x at batch 1 over 125 tokens,
    1.16-1.24x over 4,000, 1.19x at batch 8 over 1,000; docs/decode-profile.md). On CUDA, K is
    [layers, Hkv, capacity, D], as SDPA wants it.

    Read and write K's rows through `k_rows`, `set_k_rows` and `k_t_span`: on the CPU there is no view of it.
    """

    def __init__(self, spec: ModelSpec, capacity_tokens: int, dtype: torch.dtype, device: torch.device) -> None:
        if capacity_tokens <= 0:
            raise ValueError(f"KV cache capacity must be positive, got {capacity_tokens}")
        layers_heads = (spec.num_layers, spec.num_kv_heads)
        self.dtype = dtype = kv_dtype(dtype, device, spec.head_dim)
        self.is_paged = device.type == "cpu"
        # what attention computes in: float32 on the CPU, whatever the cache holds
        self.compute_dtype = torch.float32 if self.is_paged else dtype
        # empty, not zeros: rows are always written before they are read.
        self.page_tokens = page = K_PAGE_TOKENS
        if self.is_paged:
            k_shape: tuple[int, ...] = (*layers_heads, -(-capacity_tokens // page), spec.head_dim, page)
        else:
            k_shape = (*layers_heads, capacity_tokens, spec.head_dim)
        self.k_store = torch.empty(k_shape, dtype=dtype, device=device)
        self.v = torch.empty((*layers_heads, capacity_tokens, spec.head_dim), dtype=dtype, device=device)
        self.capacity_tokens = capacity_tokens
        # Each layer's views, made once: a step would otherwise index them per layer. On the CPU
        # k_t_layers ([Hkv, pages, D, K_PAGE_TOKENS]) is what the kernels read.
        self.k_t_layers, self.v_layers = list(self.k_store.unbind(0)), list(self.v.unbind(0))

    def k_t_span(self, layer: int, rows: slice) -> torch.Tensor:
        """One layer's K rows transposed, [Hkv, D, n], to read (on the CPU row-major: a copy, or a
        view within one page)."""
        return self._k_t_rows(self.k_t_layers[layer], rows)

    def k_rows(self, rows: slice) -> torch.Tensor:
        """Every layer's K rows, [layers, Hkv, n, D], to read (a copy or a view)."""
        return self._k_t_rows(self.k_store, rows).transpose(-1, -2)

    def set_k_rows(self, rows: slice, k: torch.Tensor) -> None:
        """Writes every layer's K rows from k [layers, Hkv, n, D]."""
        if not self.is_paged:
            self.k_store[:, :, rows] = k
            return
        slot_ids = torch.arange(rows.start, rows.stop, device=k.device)
        pages, offsets = slot_ids // self.page_tokens, slot_ids % self.page_tokens
        # indices on two dims a slice apart put their own dim first: [n, layers, Hkv, D]
        self.k_store[:, :, pages, :, offsets] = k.permute(2, 0, 1, 3).to(self.dtype)

    def write(self, layer: int, slot_ids: torch.Tensor, k_new: torch.Tensor, v_new: torch.Tensor) -> None:
        # slot_ids: [T]; k_new, v_new: [T, Hkv, D]
        k_layer, v_layer = self.k_t_layers[layer], self.v_layers[layer]
        if self.is_paged:
            k_layer[:, slot_ids // self.page_tokens, :, slot_ids % self.page_tokens] = k_new.to(self.dtype)
        else:
            k_layer.index_copy_(1, slot_ids, k_new.transpose(0, 1).to(self.dtype))
        v_layer.index_copy_(1, slot_ids, v_new.transpose(0, 1).to(self.dtype))

    def move(self, src_start: int, dst_start: int, num_tokens: int) -> None:
        """Copies rows down to a lower start (compaction); regions may overlap."""
        src = slice(src_start, src_start + num_tokens)
        dst = slice(dst_start, dst_start + num_tokens)
        self.set_k_rows(dst, self.k_rows(src).clone())
        self.v[:, :, dst] = self.v[:, :, src].clone()

    def _k_t_rows(self, k: torch.Tensor, rows: slice) -> torch.Tensor:
        # k: the store of one layer or all, [..., capacity, D] or paged [..., pages, D, K_PAGE_TOKENS]
        if not self.is_paged:
            return k[..., rows, :].transpose(-1, -2)
        first_page = rows.start // self.page_tokens
        last_page = max(first_page, (rows.stop - 1) // self.page_tokens) + 1
        spanned = k[..., first_page:last_page, :, :].transpose(-3, -2).flatten(-2, -1)  # [..., D, pages * P]
        offset = rows.start - first_page * self.page_tokens
        return spanned[..., offset : offset + rows.stop - rows.start]


class RegionAllocator:
    """First-fit allocation of contiguous rows; compacts when the free rows are fragmented."""

    def __init__(self, capacity_tokens: int) -> None:
        self.capacity_tokens = capacity_tokens
        self.regions: dict[str, Region] = {}

    @property
    def num_used_tokens(self) -> int:
        return sum(r.num_tokens for r in self.regions.values())

    @property
    def num_free_tokens(self) -> int:
        return self.capacity_tokens - self.num_used_tokens

    def allocate(self, req_id: str, num_tokens: int, cache: KVCache | None = None) -> Region:
        if req_id in self.regions:
            raise ValueError(f"request {req_id!r} already has a KV region")
        if num_tokens <= 0:
            raise ValueError(f"a KV region needs at least one token, got {num_tokens}")
        if num_tokens > self.num_free_tokens:
            raise KVCacheFullError(
                f"request {req_id!r} needs {num_tokens} KV tokens but only {self.num_free_tokens} "
                f"of {self.capacity_tokens} are free"
            )
        start = self._first_fit(num_tokens)
        if start is None:
            start = self._compact(cache)
        region = Region(start, num_tokens)
        self.regions[req_id] = region
        return region

    def free(self, req_id: str) -> None:
        self.regions.pop(req_id, None)

    def _first_fit(self, num_tokens: int) -> int | None:
        cursor = 0
        for region in sorted(self.regions.values(), key=lambda r: r.start):
            if region.start - cursor >= num_tokens:
                return cursor
            cursor = region.end
        return cursor if self.capacity_tokens - cursor >= num_tokens else None

    def _compact(self, cache: KVCache | None) -> int:
        """Slides every region down to close the gaps; returns the start of the free tail."""
        cursor = 0
        for region in sorted(self.regions.values(), key=lambda r: r.start):
            if region.start != cursor:
                if cache is not None:
                    cache.move(region.start, cursor, region.num_tokens)
                region.start = cursor
            cursor = region.end
        return cursor
