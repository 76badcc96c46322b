"""Speculation changes nothing in the output, on the real SmolLM2 in float32.

(a) greedy: 12 HumanEval prompts x 64 new tokens, speculative output token-for-token equal to
    plain output, one request at a time and as one mixed continuous batch of 8;
(c) seeded sampling: the same seed gives the same output, alone, in a batch, and with the
    n-gram drafter on (randomness is keyed by token position, see engine/sampling.py).
"""

from __future__ import annotations

import pytest

from bench.workloads import completion_workload, editing_workload
from engine.config import EngineConfig
from engine.offline import Job, run_alone, run_jobs
from engine.protocol import FinishReason, SamplingParams
from engine.runner import ModelRunner
from engine.worker import build_runner
from server.tokenizer import TextTokenizer

pytestmark = [pytest.mark.model, pytest.mark.slow]

MAX_NEW = 64


@pytest.fixture(scope="module")
def engine(smollm2_path: str) -> tuple[ModelRunner, list[int]]:
    config = EngineConfig(model=smollm2_path, dtype="float32", kv_cache_tokens=16384, max_draft_tokens=8)
    runner, ready = build_runner(config, show_progress=False)
    return runner, ready.eos_token_ids


@pytest.fixture(scope="module")
def prompts(smollm2_path: str) -> list[list[int]]:
    tokenizer = TextTokenizer(smollm2_path)
    items = completion_workload(6) + editing_workload(6)
    return [item.token_ids(tokenizer) for item in items]


@pytest.fixture(scope="module")
def plain_outputs(engine: tuple[ModelRunner, list[int]], prompts: list[list[int]]) -> list[list[int]]:
    runner, eos = engine
    return [run_alone(runner, Job(f"plain-{i}", ids, MAX_NEW), eos).output_ids for i, ids in enumerate(prompts)]


def test_greedy_speculation_equals_plain_one_at_a_time(
    engine: tuple[ModelRunner, list[int]], prompts: list[list[int]], plain_outputs: list[list[int]]
) -> None:
    runner, eos = engine
    num_accepted = 0
    for i, ids in enumerate(prompts):
        job = run_alone(runner, Job(f"spec-{i}", ids, MAX_NEW, num_draft_tokens=(2, 4, 8)[i % 3]), eos)
        assert job.output_ids == plain_outputs[i], f"prompt {i} diverged"
        num_accepted += job.num_accepted
    assert num_accepted > 120, "the drafter should have been exercised on these prompts"
    assert not runner.seqs and runner.allocator.num_used_tokens == 0


def test_greedy_speculation_equals_plain_in_a_mixed_batch(
    engine: tuple[ModelRunner, list[int]], prompts: list[list[int]], plain_outputs: list[list[int]]
) -> None:
    """8 requests joining one per step (prefills share steps with decodes), some prefilled in
    chunks of 16, with k = 0, 2, 4 or 8: each output equals its plain single-request output."""
    runner, eos = engine
    picks = [0, 2, 4, 5, 6, 8, 10, 11]  # completion and editing prompts
    jobs = [
        Job(f"mix-{i}", prompts[i], MAX_NEW, num_draft_tokens=(0, 2, 4, 8)[n % 4], prefill_chunk=(16, 1 << 30)[n % 2])
        for n, i in enumerate(picks)
    ]
    run_jobs(runner, jobs, eos, join_every=1)
    for i, job in zip(picks, jobs, strict=True):
        assert job.output_ids == plain_outputs[i], f"prompt {i} diverged in the batch"
        assert job.finish_reason in (FinishReason.LENGTH, FinishReason.EOS)
    assert not runner.seqs and runner.allocator.num_used_tokens == 0


def test_same_seed_same_output(engine: tuple[ModelRunner, list[int]], prompts: list[list[int]]) -> None:
    runner, eos = engine
    params = SamplingParams(temperature=0.8, top_p=0.95, top_k=50, seed=42)
    ids = prompts[8]
    first = run_alone(runner, Job("seed-a", ids, 48, sampling=params), eos).output_ids
    again = run_alone(runner, Job("seed-b", ids, 48, sampling=params), eos).output_ids
    speculative = run_alone(runner, Job("seed-c", ids, 48, num_draft_tokens=4, sampling=params), eos)
    batch = run_jobs(
        runner,
        [Job("seed-d", prompts[1], 48, sampling=SamplingParams(1.0, seed=7)), Job("seed-e", ids, 48, 2, params)],
        eos,
    )
    other_seed = SamplingParams(temperature=0.8, top_p=0.95, top_k=50, seed=43)
    different = run_alone(runner, Job("seed-f", ids, 48, sampling=other_seed), eos).output_ids
    assert again == first
    assert speculative.output_ids == first and speculative.num_accepted > 0
    assert batch[1].output_ids == first
    assert different != first
