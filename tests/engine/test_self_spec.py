"""Self-speculation (the target drafting over a sink + window view of its own KV) on a tiny random
qwen2 (mechanics: exactness, the window, the profile); the real default model at 2K+ context is in
test_self_spec_smollm.py."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import pytest
import torch

from engine.config import EngineConfig
from engine.drafters.base import DraftRequest
from engine.drafters.self_spec import SelfSpecDrafter
from engine.model.transformer import AttentionWindow, ForwardBatch, SeqInput, SeqSlice
from engine.offline import Job, run_alone, run_jobs
from engine.profile import profile_steps
from engine.protocol import NewRequest, ProfileShape, SamplingParams, ScheduledRequest, StepPlan
from engine.runner import ModelRunner
from engine.worker import build_runner
from tests.engine.distributions import claiming_uniform_q, total_variation
from tests.tiny_models import make_tiny_qwen2

MAX_NEW = 24


@pytest.fixture(scope="module")
def model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("target")
    make_tiny_qwen2(path)
    return path


def make_runner(model: Path, drafters: tuple[str, ...], sinks: int = 2, window: int = 6) -> ModelRunner:
    config = EngineConfig(
        model=str(model),
        drafters=drafters,
        kv_cache_tokens=2048,
        num_threads=1,
        self_spec_sink_tokens=sinks,
        self_spec_window_tokens=window,
    )
    return build_runner(config, show_progress=False)[0]


def prompts() -> list[list[int]]:
    # Longer than the tiny window (2 + 6), so it slides during every request.
    return [[(7 * i + j) % 100 + 2 for j in range(12 + 5 * i)] for i in range(6)]


def drafter_of(runner: ModelRunner) -> SelfSpecDrafter:
    drafter = runner.drafters["self"]
    assert isinstance(drafter, SelfSpecDrafter)
    return drafter


def test_greedy_output_with_self_speculation_equals_plain_alone_and_in_a_mixed_batch(model: Path) -> None:
    plain = make_runner(model, ())
    expected = [run_alone(plain, Job(f"p{i}", ids, MAX_NEW), []).output_ids for i, ids in enumerate(prompts())]
    runner = make_runner(model, ("self", "ngram"))
    for i, ids in enumerate(prompts()):
        job = run_alone(runner, Job(f"a{i}", ids, MAX_NEW, num_draft_tokens=(2, 4, 8)[i % 3]), [])
        assert job.output_ids == expected[i], i
        assert job.num_drafted > 0
    jobs = [
        Job(
            f"m{i}",
            ids,
            MAX_NEW,
            num_draft_tokens=(0, 1, 3, 5, 4, 2)[i],
            drafter=("self", "self", "ngram", "ngram", "self", "self")[i],
            prefill_chunk=(4, 1 << 30)[i % 2],
        )
        for i, ids in enumerate(prompts())
    ]
    run_jobs(runner, jobs, [], join_every=2)
    assert [job.output_ids for job in jobs] == expected
    drafted = [job for job in jobs if job.drafter == "self" and job.num_draft_tokens]
    assert sum(job.num_drafted for job in drafted) > sum(job.num_accepted for job in drafted) > 0
    assert not runner.seqs and not runner.allocator.regions


def test_a_window_holding_the_whole_context_drafts_what_the_target_says(model: Path) -> None:
    # With every token in view the draft forward is the target's own decode step: all pass.
    runner = make_runner(model, ("self",), sinks=4, window=1020)
    jobs = [Job(f"s{i}", ids, MAX_NEW, num_draft_tokens=(1, 3, 6)[i % 3]) for i, ids in enumerate(prompts())]
    run_jobs(runner, jobs, [])
    assert all(job.num_drafted > 0 and job.num_accepted == job.num_drafted for job in jobs)


def test_the_window_keeps_the_sinks_and_slides_with_the_sequence() -> None:
    window = AttentionWindow(num_sink_tokens=2, num_recent_tokens=3)
    assert window.kv_rows(SeqSlice(0, 1, 100, 4)) == [slice(100, 105)]  # 5 tokens: all in view
    assert window.kv_rows(SeqSlice(0, 1, 100, 5)) == [slice(100, 102), slice(103, 106)]
    assert window.kv_rows(SeqSlice(0, 1, 100, 9)) == [slice(100, 102), slice(107, 110)]
    with pytest.raises(ValueError, match="num_recent_tokens >= 1"):
        AttentionWindow(2, 0)


def test_a_draft_reads_only_the_sinks_and_the_window_of_the_target_cache(model: Path) -> None:
    runner = make_runner(model, ("self",), sinks=2, window=6)
    drafter, ids = drafter_of(runner), prompts()[3]  # 27 tokens
    runner.step(StepPlan(0, [NewRequest("r", ids, 40, stop_token_ids=[])], [ScheduledRequest("r", 64)]))
    seq = runner.seqs["r"]
    num_cached, start = seq.num_computed_tokens, seq.kv_start  # 27 cached; the draft feeds token 28
    drafter.propose([DraftRequest("r", seq.token_ids, 2, len(seq.token_ids), kv_start=start)])
    assert [f.num_context_tokens for f in drafter.take_forwards()] == [8, 8]  # the window, not 28 and 29
    batch = ForwardBatch.of([SeqInput(seq.token_ids[-1:], start, num_cached, 1)], drafter.model.device, drafter.window)

    def draft_logits() -> torch.Tensor:
        return drafter.model.forward(batch, drafter.kv_cache)

    before = draft_logits()
    kv_cache, v = drafter.kv_cache, drafter.kv_cache.v
    out_of_view = slice(start + 2, start + num_cached + 1 - 6)  # rows 2 .. 21
    kv_cache.set_k_rows(out_of_view, torch.randn_like(v[:, :, out_of_view]))
    v[:, :, out_of_view] = 0.0
    torch.testing.assert_close(draft_logits(), before)
    for row in (start + 1, start + num_cached - 5, start + num_cached - 1):  # a sink, the window's ends
        v[:, :, row] += 1.0
        assert not torch.allclose(draft_logits(), before), row
        v[:, :, row] -= 1.0


def test_sampled_requests_draw_from_the_windowed_distribution_and_stay_seeded(model: Path) -> None:
    runner = make_runner(model, ("self",))
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
    ids = prompts()[1]
    runner.step(StepPlan(0, [NewRequest("q", ids, 40, stop_token_ids=[])], [ScheduledRequest("q", 64)]))
    seq = runner.seqs["q"]
    request = DraftRequest("q", seq.token_ids, 3, len(seq.token_ids), params, seq.kv_start)
    (draft,) = drafter_of(runner).propose([request])
    assert draft.probs is not None and draft.probs.shape == (3, 128)
    torch.testing.assert_close(draft.probs.sum(dim=-1), torch.ones(3))
    assert all(draft.probs[j, token] > 0 for j, token in enumerate(draft.token_ids))
    assert int((draft.probs > 0).sum(dim=-1).max()) <= 20  # top-k applied to the draft too


def sampled_pairs(runner: ModelRunner, seeds: range, num_draft_tokens: int) -> Counter[tuple[int, ...]]:
    """(first, second) generated token of a prompt longer than the window, under many seeds: the
    second comes through verification of a one-token windowed draft when num_draft_tokens > 0."""
    params = [SamplingParams(temperature=1.0, top_k=4, seed=seed) for seed in seeds]
    jobs = [Job(f"s{p.seed}", prompts()[2], 3, num_draft_tokens, p, drafter="self") for p in params]
    for start in range(0, len(jobs), 80):  # 80 x 25 KV rows fit the 2048 of make_runner
        run_jobs(runner, jobs[start : start + 80], [])
    assert (sum(job.num_drafted for job in jobs) > 0) == (num_draft_tokens > 0)
    return Counter(tuple(job.output_ids[:2]) for job in jobs)


@pytest.mark.slow
def test_sampled_output_keeps_the_target_distribution_with_windowed_drafts(model: Path) -> None:
    """Rejection sampling with the window's own q, end to end: over 4,000 fixed seeds the joint
    distribution of the first two tokens (top-k 4 at each, 16 outcomes) with self-speculation over
    a 2 + 6 window of a 22-token prompt (2 in 3 drafts pass) is the plain one within a total
    variation of 0.07. Measured: this one 0.043, with 4,000 other seeds 0.049; two plain estimates
    from disjoint seeds differ by 0.032. Telling verification q is uniform moves it by 0.22."""
    seeds = range(4000)
    runner = make_runner(model, ("self",))
    plain = sampled_pairs(runner, seeds, 0)
    assert len(plain) <= 16 and total_variation(plain, sampled_pairs(runner, seeds, 1)) < 0.07
    drafter = drafter_of(runner)
    drafter.propose = claiming_uniform_q(drafter.propose)  # type: ignore[method-assign]
    assert total_variation(plain, sampled_pairs(runner, seeds, 1)) > 0.15


def test_self_speculation_is_profiled_on_windowed_one_token_forwards(model: Path) -> None:
    runner = make_runner(model, ("ngram", "self"), sinks=2, window=30)
    shapes = [ProfileShape(2, 1, 64), ProfileShape(1, 4, 16), ProfileShape(3, 1, 8), ProfileShape(2, 2, 16)]
    samples = profile_steps(runner, shapes, 1, "self")
    # each shape's tokens as one-token sequences, attending to the whole window of 32 (it drafts
    # only for requests longer than that), no more of them than the largest batch (3): one draft
    # forward has a token per request
    assert [(s.shape.num_seqs, s.shape.num_tokens, s.shape.num_context_tokens) for s in samples] == [
        (2, 2, 64),
        (3, 3, 96),
    ]
    assert all(s.step_s > 0 for s in samples) and not runner.allocator.regions
    with pytest.raises(ValueError, match="no drafter named 'ngram' that runs a model"):
        profile_steps(runner, shapes, 1, "ngram")


def test_the_self_profile_times_the_copy_of_a_long_contexts_window(
    model: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Any context is profiled as one that just overflows the window: sinks and recent rows are
    # gathered into one block, as at 8K tokens.
    runner = make_runner(model, ("self",), sinks=2, window=30)
    blocks: list[int] = []
    kv_rows = AttentionWindow.kv_rows

    def spy(window: AttentionWindow, seq: SeqSlice) -> list[slice]:
        rows = kv_rows(window, seq)
        blocks.append(len(rows))
        return rows

    monkeypatch.setattr(AttentionWindow, "kv_rows", spy)
    profile_steps(runner, [ProfileShape(1, 1, 500), ProfileShape(2, 1, 8)], 1, "self")
    assert set(blocks) == {2}


def test_the_self_drafter_offers_its_window_once_the_context_outgrows_it(model: Path) -> None:
    runner = make_runner(model, ("ngram", "self"), sinks=2, window=6)
    new = [NewRequest("short", prompts()[0][:6], 30, stop_token_ids=[]), NewRequest("long", prompts()[0], 30)]
    result = runner.step(StepPlan(0, new, [ScheduledRequest("short", 64), ScheduledRequest("long", 64)]))
    short, long = (output.offers[1] for output in result.outputs)
    assert short.num_tokens == 0  # 7 tokens: the 2 + 6 window holds them all, a draft saves nothing
    assert long.num_tokens > 0 and long.num_unseen == 1 and long.max_kv_tokens == 8


def test_bad_window_settings_are_refused() -> None:
    with pytest.raises(ValueError, match="self_spec_window_tokens >= 1"):
        EngineConfig(self_spec_window_tokens=0)
    with pytest.raises(ValueError, match="self_spec_sink_tokens >= 0"):
        EngineConfig(self_spec_sink_tokens=-1)
