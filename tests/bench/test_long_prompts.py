"""bench longctx's prefill-once runner: a restored prompt decodes exactly as a prefilled one (tiny model)."""

from __future__ import annotations

from pathlib import Path

import pytest

from bench.long_prompts import PrefilledRunner, cut_prompts
from engine.config import EngineConfig
from engine.offline import Job, run_jobs
from engine.protocol import NewRequest
from engine.worker import build_runner
from tests.tiny_models import make_tiny_qwen2


def test_a_restored_prompt_skips_its_prefill_and_decodes_as_a_prefilled_one(tmp_path: Path) -> None:
    make_tiny_qwen2(tmp_path)
    config = EngineConfig(model=str(tmp_path), drafters=("ngram",), kv_cache_tokens=1024, num_threads=1)
    runner = PrefilledRunner(build_runner(config, show_progress=False)[0])
    prompts = [[(5 * i + j) % 90 + 2 for j in range(40 + 7 * i)] for i in range(3)]
    plain = run_jobs(runner, [Job(f"plain-{i}", ids, 12) for i, ids in enumerate(prompts)], [])
    runner.is_saving = True
    run_jobs(runner, [Job(f"save-{i}", ids, 1, prefill_chunk=16) for i, ids in enumerate(prompts)], [])
    runner.is_saving = False
    assert [runner.num_prefilled_tokens(ids) for ids in prompts] == [39, 46, 53]
    runner.kv_cache.k_store.fill_(7.0)  # whatever was left in the cache must not matter: the rows are written back
    runner.kv_cache.v.fill_(7.0)
    runner.add_request(NewRequest("probe", prompts[1], 4))
    assert runner.seqs["probe"].num_computed_tokens == 46  # only the last prompt token is left to run
    runner.remove_request("probe")
    restored = run_jobs(runner, [Job(f"again-{i}", ids, 12, num_draft_tokens=3) for i, ids in enumerate(prompts)], [])
    assert [job.output_ids for job in restored] == [job.output_ids for job in plain]
    assert runner.num_prefilled_tokens(prompts[0][:-1]) == 0  # another prompt: nothing saved


def test_sources_too_short_for_a_context_are_named() -> None:
    with pytest.raises(ValueError, match="grpc/_channel.py"):
        cut_prompts([[1] * 10, [1] * 100], 50)
