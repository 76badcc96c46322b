"""The fused element-wise kernels against the torch operators they replace (engine/model/layer_ops.py):
the same values to within float32 rounding, the same rounding to bfloat16, and each row computed
alone as among other rows (what keeps greedy speculation exact); the whole-layer call against the
per-operator calls of the same kernels."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest
import torch
from transformers import AutoConfig

from engine.kv_cache import KVCache
from engine.model import loader
from engine.model.layer_ops import FusedLayerOps, LayerOps
from engine.model.linear import MAX_KERNEL_ROWS
from engine.model.loader import load_transformer
from engine.model.row_limit import (
    TIMED_ROW_COUNTS,
    best_limit,
    fit_kernel_row_limit,
    recall_limit,
    store_limit,
    stored_limit_path,
)
from engine.model.spec import ModelSpec
from engine.model.transformer import ForwardBatch, SeqInput, rope_tables
from tests.engine.cpu_kernels import require_cpu_kernels
from tests.tiny_models import make_tiny_qwen2

HIDDEN, INTERMEDIATE, NUM_HEADS, NUM_KV_HEADS, HEAD_DIM = 576, 1536, 9, 3, 64
SPEC = ModelSpec(
    model_type="llama",
    vocab_size=100,
    hidden_size=HIDDEN,
    intermediate_size=INTERMEDIATE,
    num_layers=2,
    num_heads=NUM_HEADS,
    num_kv_heads=NUM_KV_HEADS,
    head_dim=HEAD_DIM,
    rms_norm_eps=1e-5,
    max_position_embeddings=4096,
    has_qkv_bias=False,
    tie_word_embeddings=True,
)
DTYPES = [torch.float32, torch.bfloat16]


@pytest.fixture(scope="module", autouse=True)
def built() -> None:
    require_cpu_kernels()


def rand(*shape: int, dtype: torch.dtype, seed: int, scale: float = 1.0) -> torch.Tensor:
    return (torch.randn(*shape, generator=torch.Generator().manual_seed(seed)) * scale).to(dtype)


def assert_close(got: torch.Tensor, want: torch.Tensor, dtype: torch.dtype) -> None:
    """float32: a few float32 ulps. bfloat16: most values equal, the rest one bfloat16 step apart
    (a float32 sum in another order can land on the other side of a rounding boundary)."""
    assert got.dtype == want.dtype and got.shape == want.shape
    if dtype == torch.float32:
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
        return
    diff = (got.float() - want.float()).abs()
    step = want.float().abs().clamp_min(1e-3) * 2**-7
    assert bool((diff <= step).all()), f"off by more than one bfloat16 step: {float((diff / step).max()):.2f}"
    assert float((diff > 0).float().mean()) < 0.02


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("num_rows", [1, 5, 40])
def test_add_rms_norm_matches_torch(dtype: torch.dtype, num_rows: int) -> None:
    x, delta = rand(num_rows, HIDDEN, dtype=dtype, seed=0), rand(num_rows, HIDDEN, dtype=dtype, seed=1)
    weight = rand(HIDDEN, dtype=dtype, seed=2, scale=0.3) + 1
    x_torch, x_fused = x.clone(), x.clone()
    want = LayerOps().add_rms_norm(x_torch, delta, weight, 1e-5)
    got = FusedLayerOps().add_rms_norm(x_fused, delta, weight, 1e-5)
    assert torch.equal(x_fused, x_torch)  # the residual sum, in place, rounded alike
    assert_close(got, want, dtype)
    assert_close(
        FusedLayerOps().add_rms_norm(x.clone(), None, weight, 1e-5),
        LayerOps().add_rms_norm(x, None, weight, 1e-5),
        dtype,
    )


@pytest.mark.parametrize("dtype", DTYPES)
def test_silu_mul_matches_torch(dtype: torch.dtype) -> None:
    gate_up = rand(7, 2 * INTERMEDIATE, dtype=dtype, seed=3, scale=3.0)
    assert_close(FusedLayerOps().silu_mul(gate_up), LayerOps().silu_mul(gate_up), dtype)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("width", [20, 24, 37])
def test_widths_off_the_vector_width_match_torch(dtype: torch.dtype, width: int) -> None:
    """The kernels take a vector (8 or 16 floats) at a time: the values past the last whole
    vector come out as torch's, and a NaN stays one (its bits may differ: torch's own vector
    and scalar paths round a NaN to different bits)."""
    x, delta = rand(3, width, dtype=dtype, seed=9), rand(3, width, dtype=dtype, seed=10)
    x[1, -1] = float("nan")
    weight = rand(width, dtype=dtype, seed=11, scale=0.3) + 1
    x_torch, x_fused = x.clone(), x.clone()
    want = LayerOps().add_rms_norm(x_torch, delta, weight, 1e-5)
    got = FusedLayerOps().add_rms_norm(x_fused, delta, weight, 1e-5)
    assert bool(x_fused[1, -1].isnan()) and bool(got[1].isnan().all()) and bool(want[1].isnan().all())
    assert torch.equal(x_fused[[0, 2]], x_torch[[0, 2]])
    assert_close(got[[0, 2]], want[[0, 2]], dtype)
    gate_up = rand(3, 2 * width, dtype=dtype, seed=12, scale=3.0)
    assert_close(FusedLayerOps().silu_mul(gate_up), LayerOps().silu_mul(gate_up), dtype)


@pytest.mark.parametrize("dtype", DTYPES)
def test_rope_write_kv_matches_torch(dtype: torch.dtype) -> None:
    """q, and the K and V rows written to the cache (K in its paged, transposed layout), at
    scattered slots (on three pages) and positions; other rows untouched."""
    num_tokens = 6
    qkv = rand(num_tokens, NUM_HEADS + 2 * NUM_KV_HEADS, HEAD_DIM, dtype=dtype, seed=4)
    positions = torch.tensor([0, 1, 17, 300, 301, 4000])
    slot_ids = torch.tensor([3, 255, 256, 100, 601, 7])
    inv_freq = 1.0 / (100000.0 ** (torch.arange(0, HEAD_DIM, 2).float() / HEAD_DIM))
    cos, sin = rope_tables(positions, inv_freq, 1.0, dtype)
    caches = []
    for ops in (LayerOps(), FusedLayerOps()):
        cache = KVCache(SPEC, 640, dtype, torch.device("cpu"))
        cache.k_store.fill_(0.5)
        cache.v.fill_(0.5)
        q = ops.rope_write_kv(qkv, cos, sin, cache, 1, slot_ids, NUM_HEADS, HEAD_DIM**-0.5)
        caches.append((q, cache))
    (q_torch, torch_cache), (q_fused, fused_cache) = caches
    assert q_fused.dtype == torch.float32 and q_fused.shape == (num_tokens, NUM_HEADS, HEAD_DIM)
    # float32 products may be fused into one multiply-add here: equal to within rounding
    assert_close(q_fused, q_torch, dtype)
    assert_close(fused_cache.k_store, torch_cache.k_store, dtype)
    assert torch.equal(fused_cache.v, torch_cache.v)


def test_rows_are_computed_alike_alone_and_among_others() -> None:
    x = rand(9, HIDDEN, dtype=torch.float32, seed=5)
    delta = rand(9, HIDDEN, dtype=torch.float32, seed=6)
    weight = rand(HIDDEN, dtype=torch.float32, seed=7)
    ops = FusedLayerOps()
    together = ops.add_rms_norm(x.clone(), delta, weight, 1e-5)
    alone = ops.add_rms_norm(x[:1].clone(), delta[:1], weight, 1e-5)
    assert torch.equal(together[:1], alone)
    gate_up = rand(9, 2 * INTERMEDIATE, dtype=torch.float32, seed=8)
    assert torch.equal(ops.silu_mul(gate_up)[:1], ops.silu_mul(gate_up[:1].contiguous()))


def test_bad_shapes_are_refused() -> None:
    ops = FusedLayerOps()
    with pytest.raises(RuntimeError, match="weight"):
        ops.add_rms_norm(rand(2, HIDDEN, dtype=torch.float32, seed=0), None, torch.ones(HIDDEN + 1), 1e-5)
    with pytest.raises(RuntimeError, match="gate_up"):
        ops.silu_mul(torch.ones(2, 3))
    cache = KVCache(SPEC, 16, torch.float32, torch.device("cpu"))
    qkv = rand(1, NUM_HEADS + 2 * NUM_KV_HEADS, HEAD_DIM, dtype=torch.float32, seed=0)
    cos, sin = torch.ones(1, 1, HEAD_DIM // 2), torch.zeros(1, 1, HEAD_DIM // 2)
    with pytest.raises(RuntimeError, match="outside the cache"):
        ops.rope_write_kv(qkv, cos, sin, cache, 0, torch.tensor([16]), NUM_HEADS, 1.0)


@pytest.mark.parametrize("dtype", DTYPES)
def test_a_whole_layer_call_equals_the_per_operator_path(
    tmp_path: Path, dtype: torch.dtype, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A step the kernels take whole runs each layer in one C++ call: the same logits and cache
    contents, bit for bit, as the per-operator calls of the same kernels (a qwen2 with q/k/v biases
    and head_dim 64, decoding and verifying three sequences after prefilling them). The products
    get the kernel's whole limit rather than what the load-time timing finds on this CPU."""
    monkeypatch.setattr(loader, "fit_kernel_row_limit", lambda model: model.set_kernel_rows(MAX_KERNEL_ROWS))
    make_tiny_qwen2(
        tmp_path,
        seed=2,
        vocab_size=8192,
        hidden_size=256,
        intermediate_size=384,
        max_position_embeddings=256,
        qkv_bias_std=0.5,
    )
    model = load_transformer(tmp_path, dtype, torch.device("cpu"))
    rows = model.whole_layer_rows
    assert rows >= 1 and model.spec.head_dim == 64
    prompts = [[5 + i, 17, 200 + i, 33, 7] * (i + 2) for i in range(3)]
    step = [[11], [12, 13, 14][: max(1, rows - 2)], [15]][: max(1, min(3, rows))]
    results = []
    for whole in (rows, 0):
        model.whole_layer_rows = whole
        cache = KVCache(model.spec, 256, dtype, torch.device("cpu"))
        cache.k_store.zero_()  # rows never written compare too
        cache.v.zero_()
        inputs = [SeqInput(p, kv_start=80 * i, num_cached_tokens=0, num_logits=1) for i, p in enumerate(prompts)]
        with torch.inference_mode():
            model.forward(ForwardBatch.of(inputs, torch.device("cpu")), cache)  # prefill: per operator either way
            decode = [
                SeqInput(ids, kv_start=80 * i, num_cached_tokens=len(prompts[i]), num_logits=len(ids))
                for i, ids in enumerate(step)
            ]
            logits = model.forward(ForwardBatch.of(decode, torch.device("cpu")), cache)
        results.append((logits, cache))
    (whole_logits, whole_cache), (per_op_logits, per_op_cache) = results
    assert torch.equal(whole_logits, per_op_logits)
    assert torch.equal(whole_cache.k_store, per_op_cache.k_store) and torch.equal(whole_cache.v, per_op_cache.v)


def test_a_bfloat16_model_computes_the_same_over_its_bfloat16_cache_as_over_a_float32_one(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The cache holds a bfloat16 model's K and V at half the bytes and loses nothing: prefill
    (the per-sequence loop), then decoding and verifying (the kernels, whole layers) give the same
    logits, bit for bit, as over a float32 cache."""
    require_cpu_kernels()
    monkeypatch.setattr(loader, "fit_kernel_row_limit", lambda model: model.set_kernel_rows(MAX_KERNEL_ROWS))
    make_tiny_qwen2(
        tmp_path, seed=3, vocab_size=8192, hidden_size=256, intermediate_size=384, max_position_embeddings=512
    )
    model = load_transformer(tmp_path, torch.bfloat16, torch.device("cpu"))
    prompts = [[5 + i, 17, 200 + i, 33, 7] * (20 + 9 * i) for i in range(2)]  # 100 and 145 tokens
    step = [[11], [12, 13, 14]]
    logits = {}
    for cache_dtype in (torch.bfloat16, torch.float32):
        monkeypatch.setattr("engine.kv_cache.kv_dtype", lambda *_, dtype=cache_dtype: dtype)
        cache = KVCache(model.spec, 400, torch.bfloat16, torch.device("cpu"))
        assert cache.dtype == cache_dtype
        inputs = [SeqInput(p, kv_start=200 * i, num_cached_tokens=0, num_logits=1) for i, p in enumerate(prompts)]
        decode = [
            SeqInput(ids, kv_start=200 * i, num_cached_tokens=len(prompts[i]), num_logits=len(ids))
            for i, ids in enumerate(step)
        ]
        with torch.inference_mode():
            prefilled = model.forward(ForwardBatch.of(inputs, torch.device("cpu")), cache)
            logits[cache_dtype] = (prefilled, model.forward(ForwardBatch.of(decode, torch.device("cpu")), cache))
    assert all(torch.equal(a, b) for a, b in zip(logits[torch.bfloat16], logits[torch.float32], strict=True))


def test_the_row_limit_is_timed_on_whole_passes_and_kept_by_every_product(tmp_path: Path) -> None:
    make_tiny_qwen2(
        tmp_path, seed=3, vocab_size=8192, hidden_size=256, intermediate_size=384, max_position_embeddings=64
    )
    model = load_transformer(tmp_path, torch.float32, torch.device("cpu"))  # times the limit
    limit = fit_kernel_row_limit(model, repeats=3)  # and again, here
    assert limit in (0, *TIMED_ROW_COUNTS)
    assert {product.max_kernel_rows for product in model.weights.products()} == {limit}
    assert model.whole_layer_rows == limit
    assert all((product.blocks is None) == (limit == 0) for product in model.weights.products())


@pytest.mark.parametrize("limit", [0, 4])
def test_a_given_row_limit_is_kept_without_timing(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, limit: int) -> None:
    def no_timing(model: object) -> None:
        raise AssertionError("the limit was timed although one was given")

    monkeypatch.setattr(loader, "fit_kernel_row_limit", no_timing)
    make_tiny_qwen2(tmp_path, seed=3, vocab_size=8192, hidden_size=256, intermediate_size=384)
    model = load_transformer(tmp_path, torch.float32, torch.device("cpu"), kernel_row_limit=limit)
    assert model.kernel_row_limit == model.whole_layer_rows == limit
    assert all((product.blocks is None) == (limit == 0) for product in model.weights.products())


def test_a_stored_limit_is_recalled_and_a_damaged_one_is_not(tmp_path: Path) -> None:
    path = tmp_path / "row-limits" / "model.json"
    assert recall_limit(path) is None
    store_limit(path, 12)
    assert recall_limit(path) == 12 and [p.name for p in path.parent.iterdir()] == ["model.json"]
    counts = list(TIMED_ROW_COUNTS)
    damaged_or_stale = [
        "{",
        "[]",
        json.dumps({"max_kernel_rows": 12}),
        json.dumps({"max_kernel_rows": -1, "timed_row_counts": counts}),
        json.dumps({"max_kernel_rows": "12", "timed_row_counts": counts}),
        json.dumps({"max_kernel_rows": 12, "timed_row_counts": [1, 2, 4, 8, 12]}),  # chosen among others
        json.dumps({"max_kernel_rows": 12, "timed_row_counts": counts}),  # timed with fewer runs
    ]
    for damaged in damaged_or_stale:
        path.write_text(damaged)
        assert recall_limit(path) is None, damaged
    # one path per model shape, dtype and thread count; models of one shape share it
    small = ModelSpec("qwen2", 8192, 256, 384, 2, 4, 2, 64, 1e-6, 64, True, True)
    shapes = (small, dataclasses.replace(small, intermediate_size=512))
    paths = {stored_limit_path(s, d, t) for s in shapes for d in (torch.float32, torch.bfloat16) for t in (1, 2)}
    assert len(paths) == 8
    # two models of one shape at two paths, their weights drawn with other seeds
    specs = []
    for seed in (1, 2):
        make_tiny_qwen2(tmp_path / str(seed), seed=seed, vocab_size=8192, hidden_size=256, intermediate_size=384)
        specs.append(ModelSpec.from_hf_config(AutoConfig.from_pretrained(tmp_path / str(seed))))
    assert stored_limit_path(specs[0], torch.float32, 2) == stored_limit_path(specs[1], torch.float32, 2)


def test_the_limit_saves_the_most_time_over_the_timed_counts() -> None:
    # a near tie at one row, then large wins (bfloat16 on an AVX2-only CPU): not stopped at 1
    assert best_limit({0: 0.0, 1: -0.0005, 2: 0.015, 4: 0.05, 6: 0.04}) == 4
    assert best_limit({0: 0.0, 1: -0.002, 2: -0.004}) == 0  # oneDNN wins throughout
    assert best_limit({0: 0.0, 1: 0.003, 2: 0.003}) == 1  # the smaller of two that save as much
