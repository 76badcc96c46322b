"""Self-speculation changes nothing in the output, on the real SmolLM2 in float32 at 2K+ tokens of
context (the default window of 16 sinks + 496 recent tokens slides over all of it): alone, and in
one continuous batch with n-gram and plain requests."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

from engine.config import EngineConfig
from engine.offline import Job, run_alone, run_jobs
from engine.runner import ModelRunner
from engine.worker import build_runner
from server.tokenizer import TextTokenizer

pytestmark = [pytest.mark.model, pytest.mark.slow]

MAX_NEW = 32
NUM_PROMPT_TOKENS = (2050, 2150, 2250)
# Third-party source nobody here wrote (not the standard library, not HumanEval).
SOURCES = (("grpc", "_channel.py"), ("transformers", "modeling_utils.py"), ("torch", "_tensor.py"))


@pytest.fixture(scope="module")
def engine(smollm2_path: str) -> tuple[ModelRunner, list[int]]:
    config = EngineConfig(model=smollm2_path, dtype="float32", kv_cache_tokens=12288, drafters=("self", "ngram"))
    runner, ready = build_runner(config, show_progress=False)
    return runner, ready.eos_token_ids


@pytest.fixture(scope="module")
def prompts(smollm2_path: str) -> list[list[int]]:
    tokenizer = TextTokenizer(smollm2_path)
    cut = []
    for (package, name), num_tokens in zip(SOURCES, NUM_PROMPT_TOKENS, strict=True):
        spec = importlib.util.find_spec(package)
        assert spec is not None and spec.origin is not None, package
        ids = tokenizer.encode((Path(spec.origin).parent / name).read_text())
        assert len(ids) >= num_tokens, (package, name, len(ids))
        cut.append(ids[:num_tokens])
    return cut


@pytest.fixture(scope="module")
def plain_outputs(engine: tuple[ModelRunner, list[int]], prompts: list[list[int]]) -> list[list[int]]:
    runner, eos = engine
    return [run_alone(runner, Job(f"plain-{i}", ids, MAX_NEW), eos).output_ids for i, ids in enumerate(prompts)]


def test_greedy_self_speculation_equals_plain_at_long_context(
    engine: tuple[ModelRunner, list[int]], prompts: list[list[int]], plain_outputs: list[list[int]]
) -> None:
    runner, eos = engine
    num_drafted = num_accepted = 0
    for i, ids in enumerate(prompts[:2]):
        job = run_alone(runner, Job(f"self-{i}", ids, MAX_NEW, num_draft_tokens=(2, 4)[i], drafter="self"), eos)
        assert job.output_ids == plain_outputs[i], f"prompt {i} diverged"
        num_drafted += job.num_drafted
        num_accepted += job.num_accepted
    # drafts over the window are mostly right, and not all: the window changes what the model sees
    assert 0.3 * num_drafted < num_accepted, (num_accepted, num_drafted)


def test_greedy_self_speculation_equals_plain_in_a_mixed_batch_at_long_context(
    engine: tuple[ModelRunner, list[int]], prompts: list[list[int]], plain_outputs: list[list[int]]
) -> None:
    runner, eos = engine
    jobs = [
        Job("self", prompts[0], MAX_NEW, num_draft_tokens=4, drafter="self", prefill_chunk=512),
        Job("ngram", prompts[1], MAX_NEW, num_draft_tokens=4, drafter="ngram"),
        Job("plain", prompts[2], MAX_NEW, prefill_chunk=700),
    ]
    run_jobs(runner, jobs, eos, join_every=3)
    assert [job.output_ids for job in jobs] == plain_outputs
    assert jobs[0].num_accepted > 0
    assert not runner.seqs and runner.allocator.num_used_tokens == 0
