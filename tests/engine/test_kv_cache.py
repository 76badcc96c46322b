from __future__ import annotations

import pytest
import torch

from engine.kv_cache import K_PAGE_TOKENS, KVCache, KVCacheFullError, RegionAllocator
from engine.model.spec import ModelSpec

SPEC = ModelSpec(
    "llama",
    32,
    16,
    32,
    num_layers=2,
    num_heads=2,
    num_kv_heads=1,
    head_dim=4,
    rms_norm_eps=1e-5,
    max_position_embeddings=64,
    has_qkv_bias=False,
    tie_word_embeddings=True,
)


def test_first_fit_reuses_freed_rows() -> None:
    allocator = RegionAllocator(100)
    assert allocator.allocate("a", 30).start == 0
    assert allocator.allocate("b", 30).start == 30
    allocator.free("a")
    assert allocator.allocate("c", 20).start == 0
    assert allocator.num_free_tokens == 50


def test_full_cache_is_refused_with_the_numbers() -> None:
    allocator = RegionAllocator(100)
    allocator.allocate("a", 80)
    with pytest.raises(KVCacheFullError, match="needs 30 KV tokens but only 20 of 100 are free"):
        allocator.allocate("b", 30)


def test_fragmented_free_rows_are_compacted_and_data_moves_along() -> None:
    """Regions of 250 rows straddle the CPU's K pages; each row's K and V move with it."""
    cache = KVCache(SPEC, 1000, torch.float32, torch.device("cpu"))
    allocator = RegionAllocator(1000)
    for name in "abcd":
        allocator.allocate(name, 250, cache)  # a: 0-250, b: 250-500, c: 500-750, d: 750-1000
    c_rows = slice(500, 750)
    k_c = torch.randn(SPEC.num_layers, SPEC.num_kv_heads, 250, SPEC.head_dim)
    cache.set_k_rows(c_rows, k_c)
    cache.v[:, :, c_rows] = -k_c
    allocator.free("b")
    allocator.free("d")  # 500 rows free, but no 400 of them contiguous
    region = allocator.allocate("e", 400, cache)
    assert allocator.regions["a"].start == 0
    assert allocator.regions["c"].start == 250
    assert region.start == 500
    assert torch.equal(cache.k_rows(slice(250, 500)), k_c)
    assert torch.equal(cache.v[:, :, 250:500], -k_c)


def test_cpu_keys_and_values_are_float32_and_keys_are_stored_paged_and_transposed() -> None:
    """On the CPU a bfloat16 model's cache is float32 (kv_dtype); attention reads K a page at a
    time as [Hkv, pages, D, K_PAGE_TOKENS]; what `write` puts in reads back through `k_rows`, and
    `k_t_span` gives the loop row-major [Hkv, D, n] across pages."""
    cache = KVCache(SPEC, 600, torch.bfloat16, torch.device("cpu"))
    assert cache.dtype == cache.k_store.dtype == cache.v.dtype == torch.float32
    num_pages = -(-600 // K_PAGE_TOKENS)
    assert cache.k_t_layers[1].shape == (SPEC.num_kv_heads, num_pages, SPEC.head_dim, K_PAGE_TOKENS)
    slot_ids = torch.tensor([2, 255, 256, 599])  # on pages apart, and either side of a page's end
    k_new = torch.randn(4, SPEC.num_kv_heads, SPEC.head_dim).to(torch.bfloat16)
    v_new = torch.randn(4, SPEC.num_kv_heads, SPEC.head_dim).to(torch.bfloat16)
    cache.write(1, slot_ids, k_new, v_new)
    for i, slot in enumerate(slot_ids.tolist()):
        page, offset = divmod(slot, K_PAGE_TOKENS)
        assert torch.equal(cache.k_t_layers[1][:, page, :, offset], k_new[i].float())
        assert torch.equal(cache.k_rows(slice(slot, slot + 1))[1, :, 0], k_new[i].float())
    assert torch.equal(cache.v[1][:, slot_ids], v_new.transpose(0, 1).float())
    span = cache.k_t_span(1, slice(2, 600))
    assert span.shape == (SPEC.num_kv_heads, SPEC.head_dim, 598) and span.stride(-1) == 1
    assert torch.equal(span[:, :, [0, 253, 254, 597]], k_new.permute(1, 2, 0).float())
