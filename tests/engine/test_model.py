"""Our forward pass gives the transformers model's logits, for ragged batches of prefill,
decode and verify steps, on the real SmolLM2 and on small random qwen2 models."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from engine.kv_cache import KVCache, RegionAllocator
from engine.model.loader import load_transformer
from engine.model.transformer import ForwardBatch, SeqSlice, Transformer
from tests.tiny_models import make_tiny_qwen2

# float32 logits agree to ~1e-4 here (different summation order); 2e-3 leaves room for other CPUs.
ATOL = 2e-3
NUM_GROWN = 12  # tokens each sequence gains after its prompt (the growth steps below add up to it)


def reference_logits(hf_model, token_ids: list[int]) -> torch.Tensor:
    with torch.inference_mode():
        return hf_model(torch.tensor([token_ids])).logits[0].float()


def run_step(model: Transformer, cache: KVCache, chunks: list[tuple[int, int, list[int]]]) -> list[torch.Tensor]:
    """chunks: (kv_start, num_cached, new token ids) per sequence -> logits of every new token."""
    token_ids, positions, slot_ids, seqs = [], [], [], []
    for kv_start, num_cached, new_ids in chunks:
        seqs.append(SeqSlice(len(token_ids), len(new_ids), kv_start, num_cached))
        token_ids += new_ids
        positions += range(num_cached, num_cached + len(new_ids))
        slot_ids += range(kv_start + num_cached, kv_start + num_cached + len(new_ids))
    batch = ForwardBatch(
        torch.tensor(token_ids), torch.tensor(positions), torch.tensor(slot_ids), torch.arange(len(token_ids)), seqs
    )
    with torch.inference_mode():
        logits = model.forward(batch, cache).float()
    return list(logits.split([len(c[2]) for c in chunks]))


def ragged_sequences(vocab_size: int) -> list[list[int]]:
    gen = torch.Generator().manual_seed(0)
    prompts = [torch.randint(3, vocab_size, (n,), generator=gen).tolist() for n in (5, 17, 30)]
    return [p + torch.randint(3, vocab_size, (NUM_GROWN,), generator=gen).tolist() for p in prompts]


def check_ragged_batches(model: Transformer, hf_model, vocab_size: int, atol: float = ATOL) -> None:
    """Prefill three prompts of different lengths in one step, then grow them by steps of
    1 token (decode) and 1 + 3 tokens (verify), each step mixing sequences, and compare every
    logit row with transformers run on the whole sequence."""
    full = ragged_sequences(vocab_size)
    cache = KVCache(model.spec, 256, model.dtype, model.device)
    allocator = RegionAllocator(256)
    starts = [allocator.allocate(f"r{i}", len(seq)).start for i, seq in enumerate(full)]
    num_cached = [0, 0, 0]
    growth = [[len(seq) - NUM_GROWN for seq in full], [1, 4, 1], [4, 1, 4], [1, 1, 1], [4, 4, 4]]
    for step in growth:
        chunks = []
        for i, n in enumerate(step):
            chunks.append((starts[i], num_cached[i], full[i][num_cached[i] : num_cached[i] + n]))
        logits = run_step(model, cache, chunks)
        for i, n in enumerate(step):
            expected = reference_logits(hf_model, full[i][: num_cached[i] + n])[num_cached[i] :]
            torch.testing.assert_close(logits[i], expected, atol=atol, rtol=0)
            num_cached[i] += n


@pytest.mark.model
def test_smollm2_logits_match_transformers(smollm2_path: str) -> None:
    from transformers import AutoModelForCausalLM

    model = load_transformer(smollm2_path, torch.float32, torch.device("cpu"))
    hf_model = AutoModelForCausalLM.from_pretrained(smollm2_path, dtype=torch.float32)
    check_ragged_batches(model, hf_model, model.spec.vocab_size)


@pytest.mark.model
def test_smollm2_bfloat16_errs_no_more_than_transformers_bfloat16(smollm2_path: str) -> None:
    """The bfloat16 forward (weights, activations and KV cache in bfloat16) against transformers
    in float32: no further off than transformers' own bfloat16 model is, with a 1.5x margin for
    a different rounding order. A float32 step hidden somewhere would not fail this; a wrongly
    laid out or truncated bfloat16 KV would (logits off by whole units)."""
    from transformers import AutoModelForCausalLM

    model = load_transformer(smollm2_path, torch.bfloat16, torch.device("cpu"))
    hf_float32 = AutoModelForCausalLM.from_pretrained(smollm2_path, dtype=torch.float32)
    hf_bfloat16 = AutoModelForCausalLM.from_pretrained(smollm2_path, dtype=torch.bfloat16)
    hf_error = max(
        (reference_logits(hf_bfloat16, seq) - reference_logits(hf_float32, seq)).abs().max().item()
        for seq in ragged_sequences(model.spec.vocab_size)
    )
    assert 0 < hf_error < 2.0
    check_ragged_batches(model, hf_float32, model.spec.vocab_size, atol=1.5 * hf_error)


@pytest.mark.parametrize("tie_word_embeddings", [True, False], ids=["tied", "untied"])
def test_tiny_qwen2_logits_match_transformers(tmp_path: Path, tie_word_embeddings: bool) -> None:
    from transformers import AutoModelForCausalLM

    make_tiny_qwen2(
        tmp_path,
        seed=1,
        vocab_size=300,
        hidden_size=64,
        intermediate_size=96,
        max_position_embeddings=128,
        tie_word_embeddings=tie_word_embeddings,
        qkv_bias_std=0.5,
    )
    model = load_transformer(tmp_path, torch.float32, torch.device("cpu"))
    assert model.spec.has_qkv_bias
    assert model.spec.tie_word_embeddings == tie_word_embeddings
    hf_model = AutoModelForCausalLM.from_pretrained(tmp_path, dtype=torch.float32)
    check_ragged_batches(model, hf_model, model.spec.vocab_size)


def test_unsupported_family_is_refused(tmp_path: Path) -> None:
    from transformers import GPT2Config

    GPT2Config(n_layer=1, n_embd=32, n_head=2).save_pretrained(tmp_path)
    with pytest.raises(ValueError, match="model type 'gpt2' is not supported"):
        load_transformer(tmp_path, torch.float32, torch.device("cpu"))
