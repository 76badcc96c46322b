"""The CPU attention kernel against the per-sequence loop it replaces, and the property that keeps
greedy speculation exact: a token's attention is the same computed alone or among drafts."""

from __future__ import annotations

import pytest
import torch

from engine.kv_cache import KVCache
from engine.model.cpu_attention import RaggedAttention, ragged_attention
from engine.model.spec import ModelSpec
from engine.model.transformer import AttentionWindow, SeqSlice, attend_each, causal_mask
from tests.engine.cpu_kernels import require_cpu_kernels

NUM_KV_HEADS, GROUPS, CAPACITY = 3, 3, 12_000


@pytest.fixture(scope="module")
def kernel() -> RaggedAttention:
    require_cpu_kernels()
    built = ragged_attention(64)
    assert built is not None
    return built


def cache(head_dim: int, seed: int = 0, dtype: torch.dtype = torch.float32) -> KVCache:
    """One layer's cache as the engine lays it out (K paged and transposed), random values that
    bfloat16 holds exactly (a bfloat16 model's, kv_dtype), whatever the cache's dtype."""
    spec = ModelSpec(
        "llama",
        32,
        16,
        32,
        num_layers=1,
        num_heads=NUM_KV_HEADS * GROUPS,
        num_kv_heads=NUM_KV_HEADS,
        head_dim=head_dim,
        rms_norm_eps=1e-5,
        max_position_embeddings=CAPACITY,
        has_qkv_bias=False,
        tie_word_embeddings=True,
    )
    kv_cache = KVCache(spec, CAPACITY, dtype, torch.device("cpu"))
    generator = torch.Generator().manual_seed(seed)
    kv_cache.k_store.copy_(torch.randn(kv_cache.k_store.shape, generator=generator).bfloat16())
    kv_cache.v.copy_(torch.randn(kv_cache.v.shape, generator=generator).bfloat16())
    return kv_cache


def ragged(query_counts: list[int], kv_counts: list[int]) -> list[SeqSlice]:
    """Sequences with these query and KV token counts, their regions apart in the cache."""
    seqs, query_start, kv_start = [], 0, 5
    for num_query, num_kv in zip(query_counts, kv_counts, strict=True):
        seqs.append(SeqSlice(query_start, num_query, kv_start, num_kv - num_query))
        query_start += num_query
        kv_start += num_kv + 37
    return seqs


def kernel_attention(
    kernel: RaggedAttention,
    q: torch.Tensor,
    kv_cache: KVCache,
    seqs: list[SeqSlice],
    window: AttentionWindow | None = None,
) -> torch.Tensor:
    rows = torch.tensor([[s.query_start, s.num_query_tokens, s.kv_start, s.num_kv_tokens] for s in seqs])
    sinks, recent = (window.num_sink_tokens, window.num_recent_tokens) if window else (0, 0)
    return kernel(q, kv_cache.k_t_layers[0], kv_cache.v_layers[0], rows, sinks, recent)


def loop_attention(
    q: torch.Tensor, kv_cache: KVCache, seqs: list[SeqSlice], window: AttentionWindow | None = None
) -> torch.Tensor:
    """The per-sequence loop the kernel replaces, over the same cache."""
    out = torch.empty(q.shape[0], q.shape[1] * q.shape[2])
    masked = [(seq, causal_mask(seq, GROUPS, torch.float32, torch.device("cpu"))) for seq in seqs]
    attend_each(q, kv_cache, 0, masked, window, out)
    return out


@pytest.mark.parametrize("head_dim", [64, 128])
def test_a_mixed_step_matches_the_per_sequence_loop(kernel: RaggedAttention, head_dim: int) -> None:
    """Decodes, verifications of 1-8 drafts and lengths that are and are not multiples of the
    kernel's 16-key vectors, from 1 key to several chunks of keys (some rows of a verification
    ending in one chunk, some in the next)."""
    kv_cache = cache(head_dim)
    seqs = ragged([1, 1, 5, 9, 1, 2, 1, 6], [1, 17, 150, 1023, 2500, 64, 3000, 1027])
    q = torch.randn(seqs[-1].query_start + 6, NUM_KV_HEADS * GROUPS, head_dim) * head_dim**-0.5
    got = kernel_attention(kernel, q, kv_cache, seqs)
    torch.testing.assert_close(got, loop_attention(q, kv_cache, seqs), rtol=1e-5, atol=1e-5)


def test_prefill_chunks_match_the_per_sequence_loop(kernel: RaggedAttention) -> None:
    """Prefill chunks (the kernel attends them too): a prompt's first chunk, chunks after
    hundreds and thousands of cached tokens, beside a decode; causal within each chunk."""
    kv_cache = cache(64, seed=2)
    seqs = ragged([300, 1, 64, 17], [300, 40, 2100, 1040])
    q = torch.randn(seqs[-1].query_start + 17, NUM_KV_HEADS * GROUPS, 64) * 64**-0.5
    got = kernel_attention(kernel, q, kv_cache, seqs)
    torch.testing.assert_close(got, loop_attention(q, kv_cache, seqs), rtol=1e-5, atol=1e-5)


def test_a_window_reads_the_sinks_and_recent_keys_in_place(kernel: RaggedAttention) -> None:
    kv_cache = cache(64, seed=1)
    window = AttentionWindow(num_sink_tokens=4, num_recent_tokens=60)
    seqs = ragged([1, 1, 1], [30, 64, 700])  # shorter than the window, exactly it, longer
    q = torch.randn(3, NUM_KV_HEADS * GROUPS, 64) * 0.125
    got = kernel_attention(kernel, q, kv_cache, seqs, window)
    torch.testing.assert_close(got, loop_attention(q, kv_cache, seqs, window), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("num_kv", [16, 300, 1022, 2047, 4097])  # 1022 and 2047: drafts cross a chunk's end
def test_a_token_attends_bit_identically_alone_and_among_drafts(kernel: RaggedAttention, num_kv: int) -> None:
    """Plain decoding attends token t over keys 0..t; verification attends the same token as one
    of 1 + k query tokens over more keys, masked. In float32 the outputs must be equal, bit for
    bit, so greedy speculation reproduces plain decoding."""
    kv_cache = cache(64, seed=2)
    num_drafts = 4
    q_verify = torch.randn(1 + num_drafts, NUM_KV_HEADS * GROUPS, 64) * 0.125
    verified = kernel_attention(kernel, q_verify, kv_cache, ragged([1 + num_drafts], [num_kv + num_drafts]))
    for i in range(1 + num_drafts):  # token i of the verification is the decode over num_kv + i keys
        alone = kernel_attention(kernel, q_verify[i : i + 1].contiguous(), kv_cache, ragged([1], [num_kv + i]))
        assert torch.equal(alone[0], verified[i]), f"query token {i} differs"


def test_a_step_is_bit_identical_whatever_the_threads(kernel: RaggedAttention) -> None:
    """Work items go to threads by cost (a verifying sequence's items spread over threads beside a
    decoding one's): which thread runs an item must not change any output bit, nor drop an item."""
    kv_cache = cache(64, seed=3)
    seqs = ragged([9, 1, 1, 5], [2500, 2500, 40, 1100])
    q = torch.randn(16, NUM_KV_HEADS * GROUPS, 64) * 0.125
    threads = torch.get_num_threads()
    try:
        outputs = []
        for num_threads in (1, 2, 3):
            torch.set_num_threads(num_threads)
            outputs.append(kernel_attention(kernel, q, kv_cache, seqs))
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(outputs[0], outputs[1]) and torch.equal(outputs[0], outputs[2])
    torch.testing.assert_close(outputs[0], loop_attention(q, kv_cache, seqs), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("head_dim", [64, 128])
def test_a_bfloat16_cache_attends_as_a_float32_one_holding_the_same_values(
    kernel: RaggedAttention, head_dim: int
) -> None:
    """A bfloat16 model's cache is bfloat16 on the CPU: the kernel widens each value as it reads it
    and computes in float32, so it gives, bit for bit, what the float32 cache of the same values
    gives; so does the per-sequence loop (prefill chunks), which widens the rows it reads."""
    halves, floats = cache(head_dim, seed=4, dtype=torch.bfloat16), cache(head_dim, seed=4)
    assert halves.dtype == torch.bfloat16 and floats.dtype == torch.float32
    seqs = ragged([1, 5, 1, 3], [40, 1030, 2600, 17])  # vector tails, chunks, a part page
    q = torch.randn(10, NUM_KV_HEADS * GROUPS, head_dim) * head_dim**-0.5
    assert torch.equal(kernel_attention(kernel, q, halves, seqs), kernel_attention(kernel, q, floats, seqs))
    assert torch.equal(loop_attention(q, halves, seqs), loop_attention(q, floats, seqs))
    window = AttentionWindow(num_sink_tokens=4, num_recent_tokens=60)
    one = ragged([1], [700])
    assert torch.equal(
        kernel_attention(kernel, q[:1], halves, one, window), kernel_attention(kernel, q[:1], floats, one, window)
    )
