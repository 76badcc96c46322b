"""The MLP speculator changes nothing in the output, on the real SmolLM2 in float32: an untrained one
(random heads: nearly every draft is rejected and rolled back) always, and the trained one of the
cache when `goodspeed speculator train` has made one (most drafts pass); alone, and in one
continuous batch with n-gram and plain requests."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from engine.catalog import DEFAULT_MODEL
from engine.config import EngineConfig
from engine.drafters.mlp import MLPDrafter
from engine.offline import Job, run_alone, run_jobs
from engine.runner import ModelRunner
from engine.speculator.location import MANIFEST, model_key
from engine.speculator.model import MLPSpeculator, SpeculatorConfig
from engine.speculator.store import TrainedSpeculator, load
from engine.worker import build_runner
from server.tokenizer import TextTokenizer

pytestmark = [pytest.mark.model, pytest.mark.slow]

MAX_NEW = 24
PROMPTS = (
    "def merge_sorted(a: list[int], b: list[int]) -> list[int]:\n",
    "class LRUCache:\n    def __init__(self, capacity: int) -> None:\n",
    "import json\n\n\ndef load_config(path):\n    with open(path) as f:\n",
)


def untrained(hidden_size: int) -> TrainedSpeculator:
    torch.manual_seed(0)
    return TrainedSpeculator(MLPSpeculator(SpeculatorConfig(hidden_size, 4097, num_heads=3)), torch.arange(4096))


def trained(root: Path) -> TrainedSpeculator:
    directory = root / model_key(DEFAULT_MODEL)
    if not (directory / MANIFEST).is_file():
        pytest.skip("no trained speculator for the default model in the cache (goodspeed speculator train)")
    return load(directory)


@pytest.fixture(scope="module")
def engine(smollm2_path: str) -> tuple[ModelRunner, list[int]]:
    config = EngineConfig(model=smollm2_path, dtype="float32", kv_cache_tokens=4096, drafters=("ngram",))
    runner, ready = build_runner(config, show_progress=False)
    return runner, ready.eos_token_ids


@pytest.fixture(scope="module")
def prompts(smollm2_path: str) -> list[list[int]]:
    tokenizer = TextTokenizer(smollm2_path)
    return [tokenizer.encode(text) for text in PROMPTS]


@pytest.fixture(scope="module")
def plain_outputs(engine: tuple[ModelRunner, list[int]], prompts: list[list[int]]) -> list[list[int]]:
    runner, eos = engine
    return [run_alone(runner, Job(f"plain-{i}", ids, MAX_NEW), eos).output_ids for i, ids in enumerate(prompts)]


@pytest.mark.parametrize("which", ["untrained", "trained"])
def test_greedy_output_with_the_speculator_equals_plain_alone_and_in_a_mixed_batch(
    which: str,
    engine: tuple[ModelRunner, list[int]],
    prompts: list[list[int]],
    plain_outputs: list[list[int]],
    trained_speculators: Path,
) -> None:
    runner, eos = engine
    speculator = untrained(runner.model.spec.hidden_size) if which == "untrained" else trained(trained_speculators)
    runner.drafters["mlp"] = MLPDrafter(speculator, runner.model.spec.vocab_size, runner.model.spec.hidden_size)
    try:
        drafted = accepted = 0
        for i, ids in enumerate(prompts):
            job = run_alone(
                runner, Job(f"{which}-{i}", ids, MAX_NEW, num_draft_tokens=(1, 2, 3)[i], drafter="mlp"), eos
            )
            assert job.output_ids == plain_outputs[i], f"prompt {i} diverged"
            drafted, accepted = drafted + job.num_drafted, accepted + job.num_accepted
        jobs = [
            Job("mlp", prompts[0], MAX_NEW, num_draft_tokens=3, drafter="mlp", prefill_chunk=5),
            Job("ngram", prompts[1], MAX_NEW, num_draft_tokens=4, drafter="ngram"),
            Job("plain", prompts[2], MAX_NEW),
        ]
        run_jobs(runner, jobs, eos, join_every=2)
        assert [job.output_ids for job in jobs] == plain_outputs
        assert drafted > 0 and jobs[0].num_drafted > 0
        if which == "trained":  # it has learned something: 17% of its drafts passed here, an untrained one's ~0
            assert accepted > drafted / 10, (accepted, drafted)
    finally:
        del runner.drafters["mlp"]
    assert not runner.seqs and runner.allocator.num_used_tokens == 0
