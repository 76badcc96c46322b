"""The real pair, Qwen2.5-Coder 1.5B with 0.5B drafting (1.6 GB: not in CI). These tests run when
both models are in the goodspeed cache (`goodspeed models pull qwen2.5-coder-1.5b`, and the 0.5b)."""

from __future__ import annotations

import pytest

from bench.workloads import completion_workload, editing_workload
from engine.config import EngineConfig
from engine.drafters.draft_model import DraftModelMismatchError
from engine.fetch import is_cached, model_dir
from engine.offline import Job, run_alone
from engine.worker import build_runner
from server.tokenizer import TextTokenizer

TARGET, DRAFT = "qwen2.5-coder-1.5b", "qwen2.5-coder-0.5b"

pytestmark = [
    pytest.mark.qwen,
    pytest.mark.slow,
    pytest.mark.skipif(not (is_cached(TARGET) and is_cached(DRAFT)), reason="the Qwen2.5-Coder pair is not cached"),
]


def test_greedy_output_with_the_0_5b_drafting_equals_plain_in_float32() -> None:
    config = EngineConfig(model=TARGET, drafters=("model",), draft_model=DRAFT, kv_cache_tokens=4096, dtype="float32")
    runner, ready = build_runner(config, show_progress=False)
    tokenizer = TextTokenizer(ready.model_path)
    items = completion_workload(2) + editing_workload(2)
    num_drafted = num_accepted = 0
    for i, item in enumerate(items):
        ids = item.token_ids(tokenizer)
        plain = run_alone(runner, Job(f"plain-{i}", ids, 32), ready.eos_token_ids)
        drafted = run_alone(runner, Job(f"draft-{i}", ids, 32, num_draft_tokens=3), ready.eos_token_ids)
        assert drafted.output_ids == plain.output_ids, i
        num_drafted, num_accepted = num_drafted + drafted.num_drafted, num_accepted + drafted.num_accepted
    assert num_accepted > 0.3 * num_drafted  # the 0.5B agrees with the 1.5B often


def test_a_draft_model_of_another_family_is_refused(smollm2_path: str) -> None:
    config = EngineConfig(model=str(model_dir(TARGET)), drafters=("model",), draft_model=smollm2_path)
    with pytest.raises(DraftModelMismatchError, match="49152 entries"):
        build_runner(config, show_progress=False)
