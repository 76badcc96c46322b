"""The draft-model drafter on a pair of tiny random qwen2 models (mechanics: exactness and the
draft cache's bookkeeping; the real Qwen2.5-Coder pair is in test_draft_model_qwen.py)."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import pytest
import torch

from engine.config import EngineConfig
from engine.drafters.base import DraftRequest
from engine.drafters.draft_model import DraftModelDrafter, DraftModelMismatchError
from engine.kv_cache import KVCache
from engine.model.transformer import ForwardBatch, SeqInput
from engine.offline import Job, run_alone, run_jobs
from engine.profile import profile_steps
from engine.protocol import FinishReason, NewRequest, ProfileShape, SamplingParams, ScheduledRequest, StepPlan
from engine.runner import ModelRunner
from engine.worker import build_runner
from tests.engine.distributions import claiming_uniform_q, total_variation
from tests.tiny_models import make_tiny_qwen2, perturb_model

MAX_NEW = 24


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    paths = {name: tmp_path_factory.mktemp(name) for name in ("target", "draft")}
    make_tiny_qwen2(paths["target"])
    perturb_model(paths["target"], paths["draft"], scale=0.1)  # about half of the drafts pass
    return paths


def make_runner(target: Path, draft: Path | None, kv_tokens: int = 2048) -> ModelRunner:
    config = EngineConfig(
        model=str(target),
        drafters=("model", "ngram") if draft else (),
        draft_model=str(draft or ""),
        kv_cache_tokens=kv_tokens,
        num_threads=1,
    )
    return build_runner(config, show_progress=False)[0]


def prompts() -> list[list[int]]:
    # Repeated patterns, so a draft that learned nothing still gets some tokens right by chance.
    return [[(7 * i + j) % 100 + 2 for j in range(5 + 3 * i)] for i in range(6)]


def drafter_of(runner: ModelRunner) -> DraftModelDrafter:
    drafter = runner.drafters["model"]
    assert isinstance(drafter, DraftModelDrafter)
    return drafter


def test_greedy_output_with_the_draft_model_equals_plain_alone_and_in_a_mixed_batch(models: dict[str, Path]) -> None:
    plain = make_runner(models["target"], None)
    expected = [run_alone(plain, Job(f"p{i}", ids, MAX_NEW), []).output_ids for i, ids in enumerate(prompts())]
    runner = make_runner(models["target"], models["draft"])
    for i, ids in enumerate(prompts()):
        job = run_alone(runner, Job(f"a{i}", ids, MAX_NEW, num_draft_tokens=(2, 4, 8)[i % 3]), [])
        assert job.output_ids == expected[i], i
    # Some requests draft with the model, some with n-gram lookup, some not at all, joining while
    # others decode, some prefilled in chunks.
    jobs = [
        Job(
            f"m{i}",
            ids,
            MAX_NEW,
            num_draft_tokens=(0, 1, 3, 5, 4, 2)[i],
            drafter=("model", "model", "ngram", "ngram", "ngram", "model")[i],
            prefill_chunk=(4, 1 << 30)[i % 2],
        )
        for i, ids in enumerate(prompts())
    ]
    run_jobs(runner, jobs, [], join_every=2)
    assert [job.output_ids for job in jobs] == expected
    for name in ("model", "ngram"):
        drafted = [job for job in jobs if job.drafter == name and job.num_draft_tokens]
        assert sum(job.num_drafted for job in drafted) > 0 and sum(job.num_accepted for job in drafted) > 0, name
    assert not runner.seqs and not drafter_of(runner).allocator.regions  # both caches free again


def test_a_draft_model_equal_to_the_target_has_every_draft_accepted(models: dict[str, Path]) -> None:
    # Every draft passes, so the draft cache must catch up on the last draft token and the bonus
    # token each step; a slip in that bookkeeping would show as rejections.
    runner = make_runner(models["target"], models["target"])
    jobs = [Job(f"s{i}", ids, MAX_NEW, num_draft_tokens=(1, 3, 6)[i % 3]) for i, ids in enumerate(prompts())]
    run_jobs(runner, jobs, [])
    assert all(job.num_drafted > 0 and job.num_accepted == job.num_drafted for job in jobs)


def test_the_draft_cache_holds_exactly_the_accepted_tokens_after_each_step(models: dict[str, Path]) -> None:
    # The request takes turns: the draft model, n-gram lookup, plain decoding. After each step the
    # draft cache holds only right rows, and the model's offer says how many tokens it must read.
    runner = make_runner(models["target"], models["draft"])
    drafter = drafter_of(runner)
    ids = prompts()[3]
    runner.step(StepPlan(0, [NewRequest("r", ids, 60, stop_token_ids=[])], [ScheduledRequest("r", 4)]))
    step_id, num_checked, num_rejected, unseen = 1, 0, 0, []
    turns = [("model", 3), ("model", 2), ("ngram", 3), ("", 0), ("model", 4)]
    while "r" in runner.seqs:
        name, k = turns[step_id % len(turns)]
        plan = StepPlan(step_id, scheduled=[ScheduledRequest("r", 4, num_draft_tokens=k, drafter=name)])
        output = runner.step(plan).outputs[0]
        num_rejected += output.num_drafted - output.num_accepted
        step_id += 1
        if "r" not in runner.seqs:
            break
        seq, draft_seq = runner.seqs["r"], drafter.seqs["r"]
        assert draft_seq.num_computed <= seq.num_computed_tokens
        if output.offers[0].num_tokens:  # past the prefill, room to draft: it says what it must read first
            assert output.offers[0].num_unseen == len(seq.token_ids) - draft_seq.num_computed >= 1
            unseen.append(output.offers[0].num_unseen)
        # The draft cache's rows must be what the draft model computes from the accepted tokens.
        n = draft_seq.num_computed
        fresh = KVCache(drafter.model.spec, n, torch.float32, torch.device("cpu"))
        drafter.model.forward(ForwardBatch.of([SeqInput(seq.token_ids[:n], 0, 0, 1)], drafter.model.device), fresh)
        rows = slice(draft_seq.region.start, draft_seq.region.start + n)
        torch.testing.assert_close(drafter.kv_cache.k_rows(rows), fresh.k_rows(slice(0, n)), atol=1e-5, rtol=1e-4)
        torch.testing.assert_close(drafter.kv_cache.v[:, :, rows], fresh.v, atol=1e-5, rtol=1e-4)
        num_checked += 1
    assert num_checked > 5
    assert num_rejected > 0  # the rollback was exercised
    assert max(unseen) > 2  # steps without the model left it tokens to catch up on


def test_the_draft_model_is_profiled_on_its_own_forwards(models: dict[str, Path]) -> None:
    runner = make_runner(models["target"], models["draft"])
    shapes = [ProfileShape(2, 1, 32), ProfileShape(1, 4, 16)]
    samples = profile_steps(runner, shapes, 1, "model")
    assert [(s.shape.num_seqs, s.shape.num_tokens, s.shape.num_context_tokens) for s in samples] == [
        (2, 2, 66),
        (1, 4, 20),
    ]
    assert all(s.step_s > 0 for s in samples) and not drafter_of(runner).allocator.regions
    with pytest.raises(ValueError, match="no drafter named 'ngram' that runs a model"):
        profile_steps(runner, shapes, 1, "ngram")


def test_sampled_requests_get_the_draft_distribution_and_stay_seeded(models: dict[str, Path]) -> None:
    runner = make_runner(models["target"], models["draft"])
    params = SamplingParams(temperature=0.9, top_k=20, seed=11)
    first = run_alone(runner, Job("x", prompts()[2], MAX_NEW, num_draft_tokens=3, sampling=params), [])
    again = run_jobs(
        runner,
        [
            Job("y", prompts()[2], MAX_NEW, num_draft_tokens=3, sampling=params),
            Job("z", prompts()[4], MAX_NEW, num_draft_tokens=2, sampling=SamplingParams(0.7, seed=3)),
        ],
        [],
    )[0]
    assert again.output_ids == first.output_ids and first.num_drafted > 0
    drafter = drafter_of(runner)
    drafter.add_request("q", prompts()[1], 64)
    request = DraftRequest("q", prompts()[1], 3, len(prompts()[1]), params)
    (draft,) = drafter.propose([request])
    assert draft.probs is not None and draft.probs.shape == (3, 128)
    torch.testing.assert_close(draft.probs.sum(dim=-1), torch.ones(3))
    assert all(draft.probs[j, token] > 0 for j, token in enumerate(draft.token_ids))
    assert int((draft.probs > 0).sum(dim=-1).max()) <= 20  # top-k applied to the draft too
    drafter.remove_request("q")


def test_aborting_a_request_frees_both_caches_and_drafting_time_is_its_own(models: dict[str, Path]) -> None:
    runner = make_runner(models["target"], models["draft"], kv_tokens=200)
    new = [NewRequest(name, prompts()[5], 60, stop_token_ids=[]) for name in ("a", "b")]
    runner.step(StepPlan(0, new, [ScheduledRequest("a", 64), ScheduledRequest("b", 64)]))
    decode = [ScheduledRequest(name, num_draft_tokens=3) for name in ("a", "b")]
    result = runner.step(StepPlan(1, scheduled=decode))
    assert all(o.finish_reason == FinishReason.NONE for o in result.outputs)
    assert 0 < result.timings.draft_s < result.timings.step_s  # the drafter's own time
    (run,) = result.draft_runs  # the first drafter, the model: its three forwards, both requests in each
    assert run.drafter == "model" and run.num_requests == 2 and run.seconds == result.timings.draft_s
    assert [(f.num_seqs, f.num_tokens) for f in run.forwards] == [(2, 2), (2, 2), (2, 2)]
    assert all(len(o.offers) == 2 and o.offers[0].num_tokens > 0 for o in result.outputs)  # model, ngram
    plain = runner.step(StepPlan(2, scheduled=[ScheduledRequest(name) for name in ("a", "b")]))
    assert plain.timings.draft_s == 0.0  # nothing to draft or prefill: the drafter did not run
    runner.step(StepPlan(3, finished_req_ids=["a", "b"]))
    assert not runner.allocator.regions and not drafter_of(runner).allocator.regions
    assert not drafter_of(runner).seqs


def test_a_draft_model_with_another_vocabulary_is_refused(models: dict[str, Path], tmp_path: Path) -> None:
    make_tiny_qwen2(tmp_path / "wide", vocab_size=130)
    with pytest.raises(DraftModelMismatchError, match="130 entries, the target's 128"):
        make_runner(models["target"], tmp_path / "wide")


def test_a_draft_model_with_another_tokenizer_is_refused(models: dict[str, Path], tmp_path: Path) -> None:
    target, draft = tmp_path / "target", tmp_path / "draft"
    for path, swapped in ((target, False), (draft, True)):
        make_tiny_qwen2(path)
        vocab = {f"t{i}": i for i in range(128)}
        if swapped:
            vocab["t5"], vocab["t6"] = 6, 5
        (path / "tokenizer.json").write_text(json.dumps({"model": {"vocab": vocab}, "added_tokens": []}))
    with pytest.raises(DraftModelMismatchError, match="tokenizer differs from the target's"):
        make_runner(target, draft)


def sampled_pairs(runner: ModelRunner, seeds: range, num_draft_tokens: int) -> Counter[tuple[int, ...]]:
    """(first, second) generated token of one prompt under many seeds: the first comes from the
    prefill, the second through verification of a one-token draft when num_draft_tokens > 0 (three
    tokens are generated, so that a draft fits: k + 1 may not pass max_new_tokens)."""
    jobs = [
        Job(f"s{seed}", prompts()[2], 3, num_draft_tokens, SamplingParams(temperature=1.0, top_k=4, seed=seed))
        for seed in seeds
    ]
    for start in range(0, len(jobs), 100):  # 100 x 14 KV rows fit the 2048 of make_runner
        run_jobs(runner, jobs[start : start + 100], [])
    assert all(len(job.output_ids) == 3 for job in jobs)
    assert (sum(job.num_drafted for job in jobs) > 0) == (num_draft_tokens > 0)
    return Counter(tuple(job.output_ids[:2]) for job in jobs)


@pytest.mark.slow
def test_sampled_output_keeps_the_target_distribution_with_a_real_draft_distribution(tmp_path: Path) -> None:
    """Rejection sampling with q != one-hot, end to end: over 3,000 seeds (fixed) the joint
    distribution of the first two tokens (16 outcomes: top-k 4 at each) with a draft model is the
    plain one within a total variation of 0.06; two plain estimates from 3,000 other seeds differ
    by 0.039, this one by 0.018. Telling verification that q is uniform, which makes it accept
    whatever the target's top 4 holds, moves it by 0.22, so the tolerance can tell."""
    target, draft = tmp_path / "target", tmp_path / "draft"
    make_tiny_qwen2(target, seed=0)
    perturb_model(target, draft, scale=0.3)
    seeds = range(3000)
    plain = sampled_pairs(make_runner(target, None), seeds, 0)
    runner = make_runner(target, draft)
    speculative = sampled_pairs(runner, seeds, 1)
    assert len(plain) <= 16 and total_variation(plain, speculative) < 0.06
    drafter = drafter_of(runner)
    drafter.propose = claiming_uniform_q(drafter.propose)  # type: ignore[method-assign]
    assert total_variation(plain, sampled_pairs(runner, seeds, 1)) > 0.15
