"""bench longctx's interference part: its mechanics on a tiny model (the figures come from the real one)."""

from __future__ import annotations

from pathlib import Path

from bench import prefill_latency
from bench.in_process import InProcessServer
from engine.config import EngineConfig
from engine.worker import build_runner
from server.tokenizer import TextTokenizer
from tests.tiny_models import make_tiny_qwen2


def test_each_run_is_compared_with_the_stream_alone_over_the_same_tokens(tmp_path: Path, smollm2_path: str) -> None:
    make_tiny_qwen2(tmp_path, max_position_embeddings=8192)  # the stream may run to the server's limit
    long_prompt = [(7 * j) % 90 + 2 for j in range(600)]
    config = EngineConfig(
        model=str(tmp_path), drafters=("ngram",), num_threads=1, kv_cache_tokens=prefill_latency.num_kv_tokens(600)
    )
    runner, ready = build_runner(config, show_progress=False)
    tokenizer = TextTokenizer(smollm2_path)  # detokenizes the tiny model's ids (its vocabulary is a prefix)
    profile = InProcessServer(runner, ready, tokenizer).profile()
    capped, off = prefill_latency.with_and_without_cap(runner, ready, tokenizer, profile, long_prompt, long_prompt)
    assert (capped["max_prefill_slowdown"], off["max_prefill_slowdown"]) == (2.0, 0.0)
    for run in (capped, off):
        during, alone = run["itl_during_prefill_ms"], run["itl_alone_same_tokens_ms"]
        assert during["count"] >= 1 and alone["count"] == during["count"]
        assert run["itl_ratio_mean"] == during["mean"] / alone["mean"] > 0
        assert run["itl_before_prefill_ms"]["count"] == prefill_latency.NUM_ALONE_TOKENS
    # uncapped, the prompt goes in the step budget's chunks: fewer of the stream's steps wait for it
    assert off["itl_during_prefill_ms"]["count"] <= capped["itl_during_prefill_ms"]["count"]
