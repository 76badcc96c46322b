"""The preallocated KV cache and the allocator of its token rows.

Each request owns one contiguous region of rows, reserved for its prompt plus its maximum new
tokens, so its keys and values are a view, never a gather. Rolling back rejected draft tokens is
a change of the request's length: the rows are simply overwritten by the next step.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

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


def kv_dtype(model_dtype: torch.dtype, device: torch.device) -> torch.dtype:
    """float32 on the CPU: there a bfloat16 attention product costs tens of microseconds however
    small it is (oneDNN), and a decode step runs two per sequence and layer. A bfloat16 cache made
    bfloat16 decoding 1.6-1.8x slower at batch 16 over short prompts, for 1.4x faster attention at
    7,680 tokens (docs/decode-profile.md)."""
    return torch.float32 if device.type == "cpu" else model_dtype


class KVCache:
    """K and V for every layer (float32 on the CPU, see kv_dtype): [layers, Hkv, capacity, D],
    head-major so a region is a strided view.

    On the CPU K is stored transposed ([layers, Hkv, D, capacity]; `k` is a view that hides it), so
    attention's q . K^T is a product of row-major operands: MKL runs the other layout on one thread in
    float32 and far from bandwidth in bfloat16 (one attention at 7,680 tokens 2.8x slower there,
    docs/decode-profile.md).
    On CUDA, SDPA wants D innermost.
    """

    def __init__(self, spec: ModelSpec, capacity_tokens: int, dtype: torch.dtype, device: torch.device) -> None:
        if capacity_tokens <= 0:
            raise ValueError(f"KV cache capacity must be positive, got {capacity_tokens}")
        layers_heads = (spec.num_layers, spec.num_kv_heads)
        self.dtype = dtype = kv_dtype(dtype, device)
        # empty, not zeros: rows are always written before they are read.
        if device.type == "cpu":
            k_t = torch.empty((*layers_heads, spec.head_dim, capacity_tokens), dtype=dtype, device=device)
            self.k = k_t.transpose(2, 3)
        else:
            self.k = torch.empty((*layers_heads, capacity_tokens, spec.head_dim), dtype=dtype, device=device)
        self.v = torch.empty((*layers_heads, capacity_tokens, spec.head_dim), dtype=dtype, device=device)
        self.capacity_tokens = capacity_tokens
        # Each layer's views, made once: a step would otherwise index and transpose them per layer.
        # k_t_layers is K as the CPU stores it ([Hkv, D, capacity]), what the CPU kernels read.
        self.k_layers, self.v_layers = list(self.k.unbind(0)), list(self.v.unbind(0))
        self.k_t_layers = [k.transpose(1, 2) for k in self.k_layers]

    def write(
        self, layer: int, slot_ids: torch.Tensor, k_new: torch.Tensor, v_new: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        # slot_ids: [T]; k_new, v_new: [T, Hkv, D]. Returns this layer's [Hkv, capacity, D] caches.
        k_layer, v_layer = self.k_layers[layer], self.v_layers[layer]
        k_layer.index_copy_(1, slot_ids, k_new.transpose(0, 1).to(self.dtype))
        v_layer.index_copy_(1, slot_ids, v_new.transpose(0, 1).to(self.dtype))
        return k_layer, v_layer

    def move(self, src_start: int, dst_start: int, num_tokens: int) -> None:
        """Copies rows down to a lower start (compaction); regions may overlap."""
        src = slice(src_start, src_start + num_tokens)
        dst = slice(dst_start, dst_start + num_tokens)
        self.k[:, :, dst] = self.k[:, :, src].clone()
        self.v[:, :, dst] = self.v[:, :, src].clone()


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
