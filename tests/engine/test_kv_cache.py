from __future__ import annotations

import pytest
import torch

from engine.kv_cache import KVCache, KVCacheFullError, RegionAllocator
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
    cache = KVCache(SPEC, 100, torch.float32, torch.device("cpu"))
    allocator = RegionAllocator(100)
    for name in "abcd":
        allocator.allocate(name, 25, cache)  # a: 0-25, b: 25-50, c: 50-75, d: 75-100
    cache.k[:, :, 50:75] = 7.0
    allocator.free("b")
    allocator.free("d")  # 50 rows free, but no 40 of them contiguous
    region = allocator.allocate("e", 40, cache)
    assert allocator.regions["a"].start == 0
    assert allocator.regions["c"].start == 25
    assert region.start == 50
    assert torch.all(cache.k[:, :, 25:50] == 7.0)


def test_cpu_keys_and_values_are_float32_and_keys_are_stored_transposed() -> None:
    """On the CPU a bfloat16 model's cache is float32 (kv_dtype) and attention reads K as
    [Hkv, D, L] (q . K^T as a product of row-major operands); what is written through `write`
    reads back through the [layers, Hkv, capacity, D] views."""
    cache = KVCache(SPEC, 10, torch.bfloat16, torch.device("cpu"))
    assert cache.dtype == cache.k.dtype == cache.v.dtype == torch.float32
    slot_ids = torch.tensor([2, 5, 6])
    k_new = torch.randn(3, SPEC.num_kv_heads, SPEC.head_dim).to(torch.bfloat16)
    v_new = torch.randn(3, SPEC.num_kv_heads, SPEC.head_dim).to(torch.bfloat16)
    k_layer, v_layer = cache.write(1, slot_ids, k_new, v_new)
    assert k_layer[:, 2:7].transpose(1, 2).stride(-1) == 1
    assert v_layer[:, 2:7].stride(-1) == 1
    assert torch.equal(cache.k[1][:, slot_ids], k_new.transpose(0, 1).float())
    assert torch.equal(cache.v[1][:, slot_ids], v_new.transpose(0, 1).float())
