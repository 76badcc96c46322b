"""The MLP speculator as a drafter, on a tiny random llama with a speculator trained on it for a few
seconds (mechanics: exactness, the hidden state it drafts from, sampling, profile, errors); the
real default model is in test_mlp_drafter_smollm.py."""

from __future__ import annotations

import argparse
from collections import Counter
from pathlib import Path

import pytest
import torch

from engine.config import EngineConfig
from engine.drafters.base import Draft, DraftRequest
from engine.drafters.mlp import MLPDrafter, confidence_bucket
from engine.offline import Job, run_alone, run_jobs
from engine.profile import profile_steps
from engine.protocol import (
    EngineReady,
    FinishReason,
    NewRequest,
    Offer,
    ProfileShape,
    SamplingParams,
    ScheduledRequest,
    StepPlan,
)
from engine.runner import ModelRunner
from engine.speculator.store import SpeculatorNotFoundError
from engine.worker import build_runner
from server.__main__ import add_serve_arguments, config_from_args
from server.app import build_policy
from server.config import ServerConfig
from tests.engine.distributions import claiming_uniform_q, total_variation
from tests.speculator.tiny import make_corpus, save_markov_speculator, train_tiny
from tests.tiny_models import make_tiny_llama, make_tiny_markov_llama

MAX_NEW = 24


@pytest.fixture(scope="module")
def model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny llama with a speculator trained for it in a cache of its own, beside it."""
    root = tmp_path_factory.mktemp("mlp")
    make_tiny_llama(root / "model")
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("GOODSPEED_SPECULATORS", str(root / "speculators"))
        train_tiny(root / "model", make_corpus(root), num_classes=100)
    return root / "model"


def make_runner(model: Path, drafters: tuple[str, ...]) -> ModelRunner:
    return build(model, drafters)[0]


def build(model: Path, drafters: tuple[str, ...]) -> tuple[ModelRunner, EngineReady]:
    """With the speculators of the model's own cache, beside it."""
    config = EngineConfig(model=str(model), drafters=drafters, kv_cache_tokens=4096, num_threads=1)
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("GOODSPEED_SPECULATORS", str(model.parent / "speculators"))
        return build_runner(config, show_progress=False)


def prompts() -> list[list[int]]:
    return [[(7 * i + j) % 100 + 2 for j in range(12 + 5 * i)] for i in range(6)]


def drafter_of(runner: ModelRunner) -> MLPDrafter:
    drafter = runner.drafters["mlp"]
    assert isinstance(drafter, MLPDrafter)
    return drafter


def test_greedy_output_with_the_speculator_equals_plain_alone_and_in_a_mixed_batch(model: Path) -> None:
    plain = make_runner(model, ())
    expected = [run_alone(plain, Job(f"p{i}", ids, MAX_NEW), []).output_ids for i, ids in enumerate(prompts())]
    runner = make_runner(model, ("mlp", "ngram"))
    for i, ids in enumerate(prompts()):
        job = run_alone(runner, Job(f"a{i}", ids, MAX_NEW, num_draft_tokens=(1, 3, 8)[i % 3]), [])
        assert job.output_ids == expected[i], i
        assert job.num_drafted > 0
    jobs = [
        Job(
            f"m{i}",
            ids,
            MAX_NEW,
            num_draft_tokens=(0, 1, 3, 5, 2, 3)[i],
            drafter=("mlp", "mlp", "ngram", "ngram", "mlp", "mlp")[i],
            prefill_chunk=(4, 1 << 30)[i % 2],
        )
        for i, ids in enumerate(prompts())
    ]
    run_jobs(runner, jobs, [], join_every=2)
    assert [job.output_ids for job in jobs] == expected
    drafted = [job for job in jobs if job.drafter == "mlp" and job.num_draft_tokens]
    assert sum(job.num_drafted for job in drafted) > sum(job.num_accepted for job in drafted) > 0
    assert not runner.seqs and not runner.allocator.regions


def test_it_drafts_from_the_hidden_state_that_produced_the_last_token(model: Path) -> None:
    runner = make_runner(model, ("mlp",))
    ids = prompts()[1]
    runner.step(StepPlan(0, [NewRequest("q", ids, 40, stop_token_ids=[])], [ScheduledRequest("q", 64)]))
    seq = runner.seqs["q"]
    assert seq.last_hidden is not None and len(seq.token_ids) == len(ids) + 1
    # the row the output layer read: its logits pick the token the step emitted
    assert int(runner.model.weights.lm_head(seq.last_hidden[None]).argmax()) == seq.token_ids[-1]
    drafter = drafter_of(runner)
    request = DraftRequest("q", seq.token_ids, 3, last_hidden=seq.last_hidden)
    (draft,) = drafter.propose([request])
    state, logits = drafter.heads.run_head(0, seq.last_hidden[None], drafter.classes[seq.token_ids[-1:]])
    classes, _ = drafter.heads.propose_after_head_0(state, logits, 3, lambda _, logits: logits[:, :-1].argmax(-1))
    assert draft.token_ids == drafter.token_ids[classes[0]].tolist() and draft.probs is None
    # head 0 ran when the step offered (for every request), so drafting ran heads 1 and 2
    assert [s.num_seqs for s in drafter.take_forwards()] == [1, 1]
    offer = drafter.offer("q", seq.token_ids, 8)
    assert offer.num_tokens == 3  # its number of heads
    top = float(logits[0].softmax(-1)[:-1].max())
    assert offer.match_len == confidence_bucket(top) == 1 + min(int(top * 10), 9)
    assert drafter.offer("q", [*seq.token_ids, 5], 8).match_len == 0  # a position it has not seen: no notion
    # what the runner checks against the emitted tokens when the speculator does not draft: head
    # 0's greedy pick, known without running a head; nothing when sampling or at another position
    assert drafter.offered_tokens("q", len(seq.token_ids), SamplingParams()) == draft.token_ids[:1]
    assert drafter.offered_tokens("q", len(seq.token_ids), SamplingParams(temperature=0.9)) == []
    assert drafter.offered_tokens("q", len(seq.token_ids) + 1, SamplingParams()) == []
    # without offers first (outside a step) it runs head 0 itself, with the same drafts
    fresh = MLPDrafter(drafter.speculator, 128, runner.model.spec.hidden_size)
    assert fresh.propose([request]) == [draft] and len(fresh.take_forwards()) == 3
    assert drafter.propose([DraftRequest("r", ids, 2)]) == [Draft()]  # no hidden state yet: nothing
    with pytest.raises(ValueError, match="trained for another model: its hidden size 32 .* hidden size 64"):
        MLPDrafter(drafter.speculator, 128, 64)


def test_offers_run_head_zero_only_for_requests_planned_from_them(model: Path) -> None:
    runner = make_runner(model, ("ngram", "mlp"))
    new = [NewRequest(name, prompts()[i], 40, stop_token_ids=[]) for i, name in enumerate(("auto", "off"))]
    plan = StepPlan(0, new, [ScheduledRequest("auto", 64), ScheduledRequest("off", 64, wants_offers=False)])
    outputs = {out.req_id: out for out in runner.step(plan).outputs}
    assert list(drafter_of(runner).first_heads) == ["auto"]
    assert outputs["off"].offers == [Offer(), Offer()]  # one per drafter, none worked out
    assert outputs["auto"].offers[1].num_tokens == 3 and outputs["auto"].offers[1].match_len >= 1


def test_head_zero_waits_where_n_gram_is_sure_and_the_drafts_stay_exact(model: Path) -> None:
    runner = make_runner(model, ("ngram", "mlp"))
    drafter = drafter_of(runner)
    prompt = [3, 4] * 10  # what this tiny llama writes after it, n-gram lookup catches on to
    plain = run_alone(runner, Job("plain", prompt, 40), [])
    runner.step(StepPlan(0, [NewRequest("a", prompt, 40, stop_token_ids=[])], [ScheduledRequest("a", 64)]))
    tokens = list(runner.seqs["a"].token_ids[len(prompt) :])
    num_skipped = num_drafted_after_a_skip = 0
    step_id = 1
    while "a" in runner.seqs:
        seq = runner.seqs["a"]
        first = drafter.first_heads.get("a")
        is_head_fresh = first is not None and first.num_tokens == len(seq.token_ids)
        k = 2 if step_id % 2 == 0 else 0  # drafting with the speculator every other step
        num_drafted_after_a_skip += k > 0 and not is_head_fresh
        scheduled = ScheduledRequest("a", num_draft_tokens=k, drafter="mlp" if k else "")
        (out,) = runner.step(StepPlan(step_id, scheduled=[scheduled], sure_match_lens={"ngram": 2})).outputs
        tokens += out.new_token_ids
        step_id += 1
        if out.finish_reason != FinishReason.NONE or runner.seqs["a"].num_new_tokens_left < 2:
            continue  # no offers for a request that may not draft any more
        is_sure = out.offers[0].num_tokens > 0 and out.offers[0].match_len >= 2
        first = drafter.first_heads.get("a")
        ran = first is not None and first.num_tokens == len(runner.seqs["a"].token_ids)
        assert ran != is_sure and (out.offers[1] == Offer()) == is_sure  # head 0 ran exactly where not sure
        num_skipped += is_sure
    assert tokens == plain.output_ids
    assert num_skipped > 0 and num_drafted_after_a_skip > 0  # drafting then ran head 0 itself


def test_the_control_plane_is_told_the_speculators_offers_run_a_model(model: Path) -> None:
    _, ready = build(model, ("ngram", "mlp"))
    assert ready.model_drafters == ready.offer_model_drafters == ["mlp"]
    assert build_policy(ServerConfig(), ready).offer_model_drafters == ("mlp",)


def test_sampled_drafts_come_with_their_distribution_and_stay_seeded(model: Path) -> None:
    runner = make_runner(model, ("mlp",))
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
    seq_hidden = torch.randn(runner.model.spec.hidden_size)
    request = DraftRequest("q", prompts()[1], 3, sampling=params, last_hidden=seq_hidden)
    drafter = drafter_of(runner)
    (draft,) = drafter.propose([request])
    assert draft.probs is not None and draft.probs.shape == (3, 128)
    torch.testing.assert_close(draft.probs.sum(dim=-1), torch.ones(3))
    named = torch.zeros(128, dtype=torch.bool)
    named[drafter.token_ids] = True
    assert not draft.probs[:, ~named].any()  # nothing outside the tokens the heads name
    assert all(draft.probs[j, token] > 0 for j, token in enumerate(draft.token_ids))
    assert int((draft.probs > 0).sum(dim=-1).max()) <= 20  # top-k applied to the draft too


def sampled_triples(runner: ModelRunner, seeds: range, num_draft_tokens: int) -> Counter[tuple[int, ...]]:
    """The first three generated tokens under many seeds: the second and third come through
    verification of the speculator's two-token drafts when num_draft_tokens > 0."""
    params = [SamplingParams(temperature=1.0, top_k=3, seed=seed) for seed in seeds]
    jobs = [Job(f"s{p.seed}", prompts()[2], 4, num_draft_tokens, p, drafter="mlp") for p in params]
    for start in range(0, len(jobs), 100):
        run_jobs(runner, jobs[start : start + 100], [])
    assert (sum(job.num_drafted for job in jobs) > 0) == (num_draft_tokens > 0)
    return Counter(tuple(job.output_ids[:3]) for job in jobs)


@pytest.fixture(scope="module")
def markov(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny llama whose next token depends on the current one only, with a speculator built by
    hand that knows it, three times too sharp: drafts pass often, yet q is far from p."""
    root = tmp_path_factory.mktemp("markov")
    make_tiny_markov_llama(root / "model", sharpness=10.0)
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("GOODSPEED_SPECULATORS", str(root / "speculators"))
        save_markov_speculator(root / "model", sharpness=3.0)
    return root / "model"


@pytest.mark.slow
def test_sampled_output_keeps_the_target_distribution_with_speculator_drafts(markov: Path) -> None:
    """Rejection sampling with the heads' own q, end to end: over 4,000 fixed seeds the joint
    distribution of the first three tokens (top-k 3, 27 outcomes) with two-token drafts (74% pass)
    is the plain one within a total variation of 0.07. Measured: 0.045; two plain estimates from
    disjoint seeds differ by 0.036. Telling verification q is uniform moves it to 0.235."""
    seeds = range(4000)
    runner = make_runner(markov, ("mlp",))
    plain = sampled_triples(runner, seeds, 0)
    distance = total_variation(plain, sampled_triples(runner, seeds, 2))
    assert len(plain) <= 27 and distance < 0.07, distance
    drafter = drafter_of(runner)
    drafter.propose = claiming_uniform_q(drafter.propose)  # type: ignore[method-assign]
    wrong = total_variation(plain, sampled_triples(runner, seeds, 2))
    assert wrong > 0.15, wrong


def test_a_speculator_that_knows_the_target_has_every_greedy_draft_accepted(tmp_path: Path) -> None:
    """The hand-built speculator at sharpness 1 predicts exactly what a Markov target says, so
    every draft passes: the drafter reads the right hidden state, token and classes."""
    make_tiny_markov_llama(tmp_path / "model", sharpness=10.0)
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("GOODSPEED_SPECULATORS", str(tmp_path / "speculators"))
        save_markov_speculator(tmp_path / "model", sharpness=1.0)
    runner = make_runner(tmp_path / "model", ("mlp",))
    jobs = [Job(f"g{i}", ids, MAX_NEW, num_draft_tokens=2) for i, ids in enumerate(prompts())]
    run_jobs(runner, jobs, [])
    assert all(job.num_drafted > 0 and job.num_accepted == job.num_drafted for job in jobs)


def test_the_speculator_is_profiled_per_head_by_batch_size(model: Path) -> None:
    runner = make_runner(model, ("ngram", "mlp"))
    shapes = [ProfileShape(2, 1, 64), ProfileShape(1, 4, 16), ProfileShape(3, 1, 8, 2)]
    samples = profile_steps(runner, shapes, 1, "mlp")
    # one head at every batch size up to the largest (5), as one token over one KV token per request
    assert [(s.shape.num_seqs, s.shape.num_tokens, s.shape.num_context_tokens) for s in samples] == [
        (n, n, n) for n in range(1, 6)
    ]
    assert all(s.step_s > 0 for s in samples) and not drafter_of(runner).take_forwards()


def test_asking_for_the_speculator_without_one_trained_says_how_to_train_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("GOODSPEED_SPECULATORS", str(tmp_path / "empty"))
    make_tiny_llama(tmp_path / "other")
    with pytest.raises(SpeculatorNotFoundError, match="goodspeed speculator train"):
        make_runner(tmp_path / "other", ("ngram", "mlp"))

    parser = argparse.ArgumentParser()
    add_serve_arguments(parser)
    with pytest.raises(ValueError, match="no trained speculator .* `goodspeed speculator train "):
        config_from_args(parser.parse_args(["--model", str(tmp_path / "other"), "--drafters", "ngram,mlp"]))
    assert config_from_args(parser.parse_args(["--model", str(tmp_path / "other")])).engine.drafters == (
        "ngram",
        "self",
    )


def test_a_trained_speculator_joins_the_default_drafters(model: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("GOODSPEED_SPECULATORS", str(model.parent / "speculators"))
    parser = argparse.ArgumentParser()
    add_serve_arguments(parser)
    assert config_from_args(parser.parse_args(["--model", str(model)])).engine.drafters == ("ngram", "self", "mlp")
