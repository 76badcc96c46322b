"""Speculator training on a tiny random model: the loss falls, the result round-trips through the
cache, a run resumes, and the corpus keeps to third-party packages."""

from __future__ import annotations

import sysconfig
from collections.abc import Callable
from pathlib import Path

import pytest
import torch

from client.cli import main as cli_main
from engine.speculator import corpus
from engine.speculator.data import IGNORE, mask_after_eos
from engine.speculator.location import find_trained, not_found_message, speculator_dir
from engine.speculator.store import load, load_trained
from engine.speculator.train import (
    Records,
    evaluate,
    greedy_chain_steps,
    learning_rate,
    to_classes,
    train_speculator,
    work_dir,
)
from engine.speculator.train_config import TrainConfig
from tests.speculator.tiny import encode_bytes, make_corpus, tiny_config, train_tiny
from tests.tiny_models import make_tiny_llama


@pytest.fixture()
def speculators(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setenv("GOODSPEED_SPECULATORS", str(tmp_path / "speculators"))
    return tmp_path / "speculators"


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("speculator")
    make_tiny_llama(root / "model")
    return root / "model", make_corpus(root)


def test_training_lowers_the_loss_and_round_trips_through_the_cache(
    tiny: tuple[Path, Path], speculators: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    model, source = tiny
    assert find_trained(str(model)) is None
    with pytest.raises(RuntimeError, match="goodspeed speculator train"):
        load_trained(str(model), torch.float32, torch.device("cpu"))
    manifest = train_tiny(model, source)
    for stage in ("1", "2"):
        first, final = manifest["stages"][stage]["first_loss_by_head"], manifest["stages"][stage]["final_loss_by_head"]
        assert len(final) == 3 and sum(final) < 0.8 * sum(first), (stage, first, final)
    assert manifest["cut_by_budget"] == [] and not work_dir(str(model)).exists()
    # The learning curve: both stages scored on the held-out sets as they went; its last point is
    # the final evaluation (same weights, same sets), and training time only grows along it.
    curve = manifest["stages"]["1"]["curve"] + manifest["stages"]["2"]["curve"]
    assert [p["step"] for p in manifest["stages"]["2"]["curve"]] == list(range(10, 81, 10))
    assert curve[-1]["generations"] == manifest["held_out"]["generations"]
    assert curve[-1]["code"] == manifest["held_out"]["code"]
    seconds = [p["training_seconds"] for p in curve]
    assert seconds == sorted(seconds) and seconds[-1] > seconds[0]
    assert manifest["data_positions"] == {"code": 64 * 64, "generations": 16 * 24}  # chunks x tokens, prompts x new
    held_out = manifest["corpus"]["held_out_packages"]
    assert held_out and all(p.startswith("pkg") for p in held_out)

    trained = load_trained(str(model), torch.float32, torch.device("cpu"))
    assert find_trained(str(model)) == speculator_dir(str(model))
    assert trained.manifest["held_out"] == manifest["held_out"] and len(trained.token_ids) == 48
    # Same weights: the held-out figures computed again from the loaded copy are the saved ones.
    code = trained.manifest["held_out"]["code"]
    assert 0 < code["top1_by_head"][0] <= 1 and code["tokens_per_position_by_k"][0] == pytest.approx(
        1 + code["top1_by_head"][0], abs=1e-3
    )
    assert 1 <= code["tokens_per_step_by_k"][0] <= code["tokens_per_position_by_k"][0]
    assert cli_main(["models", "list"]) == 0
    listed = capsys.readouterr().out
    assert f"speculator for {model}: trained" in listed and "older mean over positions" not in listed


def test_saved_tied_weights_load_back_shared(tiny: tuple[Path, Path], speculators: Path) -> None:
    from engine.speculator.model import MLPSpeculator, SpeculatorConfig
    from engine.speculator.store import TrainedSpeculator, save

    spec = MLPSpeculator(SpeculatorConfig(emb_dim=32, vocab_size=9, num_heads=3, tie_weights=True))
    directory = speculators / "one"
    save(directory, TrainedSpeculator(spec, torch.arange(8), {"model": "x"}))
    loaded = load(directory)
    assert loaded.model.head[0] is loaded.model.head[2]
    for (name, a), (_, b) in zip(spec.state_dict().items(), loaded.model.state_dict().items(), strict=True):
        assert torch.equal(a, b), name


def run_killed_after_stage(
    monkeypatch: pytest.MonkeyPatch, config: TrainConfig, source: Path, stage: int, encode: Callable[[str], list[int]]
) -> list[dict[str, object]]:
    """Runs training as if killed right after the given stage ended (its checkpoint saved);
    returns the figures of the stages that ran."""
    import engine.speculator.train as train_module

    real_stage = train_module.train_stage
    figures: list[dict[str, object]] = []

    def stage_then_stop(*args: object, **kwargs: object) -> dict[str, object]:
        figures.append(real_stage(*args, **kwargs))  # type: ignore[arg-type]
        if len(figures) == stage:
            raise KeyboardInterrupt
        return figures[-1]

    with monkeypatch.context() as patched, pytest.raises(KeyboardInterrupt):
        patched.setattr(train_module, "train_stage", stage_then_stop)
        train_speculator(config, None, encode=encode, source_dirs=[source])
    return figures


def test_an_interrupted_run_resumes_from_its_checkpoint(
    tiny: tuple[Path, Path], speculators: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    model, source = tiny
    config = tiny_config(model, stage1_steps=50)
    calls = {"n": 0}

    def encode_then_stop(text: str) -> list[int]:
        calls["n"] += 1
        return encode_bytes(text)

    run_killed_after_stage(monkeypatch, config, source, 1, encode_then_stop)
    assert (work_dir(str(model)) / "code.pt").is_file() and (work_dir(str(model)) / "checkpoint.pt").is_file()
    encoded = calls["n"]
    manifest = train_speculator(config, None, encode=encode_then_stop, source_dirs=[source])
    assert calls["n"] == encoded  # the corpus was not read again
    assert manifest["stages"]["1"]["steps"] == 50


def test_the_corpus_never_reads_the_standard_library() -> None:
    dirs = corpus.site_packages_dirs()
    stdlib = Path(sysconfig.get_paths()["stdlib"]).resolve()
    assert dirs and all("site-packages" in d.parts and d != stdlib for d in dirs)
    files = corpus.source_files(dirs)
    assert files and not any(stdlib in f.path.parents and "site-packages" not in f.path.parts for f in files)
    training, held_out = corpus.split(files)
    assert {f.package for f in training}.isdisjoint({f.package for f in held_out})
    assert 0.05 < len(held_out) / len(files) < 0.2


def test_helpers_mask_after_the_end_and_map_classes() -> None:
    ids = torch.tensor([[5, 7, 127, 9, 9], [1, 2, 3, 4, 5]])
    assert mask_after_eos(ids, {127}).tolist() == [[5, 7, 127, IGNORE, IGNORE], [1, 2, 3, 4, 5]]
    classes = torch.tensor([2, 0, 1, 2])  # target id -> class; 2 is "other"
    assert to_classes(torch.tensor([0, 1, IGNORE, 3]), classes).tolist() == [2, 0, IGNORE, 2]
    assert learning_rate(0, 100, 1.0) < learning_rate(4, 100, 1.0) == pytest.approx(1.0)
    assert learning_rate(99, 100, 1.0) == pytest.approx(0.1, abs=0.01)


def test_evaluation_counts_the_right_prefix_of_heads() -> None:
    from engine.speculator.model import MLPSpeculator, SpeculatorConfig

    class Fixed(MLPSpeculator):
        """Predicts class (t + i + 1) % 4 for head i at position t; position 1's head 1 is wrong."""

        def forward(self, states: torch.Tensor, token_ids: torch.Tensor) -> torch.Tensor:
            n = states.shape[1]
            logits = torch.zeros(2, 1, n, 5)
            for i in range(2):
                for t in range(n):
                    logits[i, 0, t, (t + i + 1 + (i == 1 and t == 1)) % 4] = 1.0
            return logits

    spec = Fixed(SpeculatorConfig(emb_dim=2, vocab_size=5, num_heads=2))
    ids = torch.tensor([[0, 1, 2, 3]])  # the class read, and the one the target would write, after t is t
    records = Records(torch.zeros(1, 4, 2), ids, ids)
    result = evaluate(spec, records, torch.arange(5))
    assert result["positions"] == 2
    assert result["top1_by_head"] == [1.0, 0.5]
    assert result["tokens_per_position_by_k"] == [2.0, 2.5]
    # served, the first step (position 0) takes both positions, whatever k
    assert result["tokens_per_step_by_k"] == [2.0, 2.0]


def test_the_greedy_chain_skips_the_positions_a_step_accepted() -> None:
    # heads right at positions 0-2 (a stretch one step at k = 3 covers), then wrong at 3-5
    is_right = [[True, True, True, False, False, False]] * 3
    assert greedy_chain_steps(is_right, 6, 3) == 3  # at 0 (3 accepted), 4, 5: 6 tokens in 3 steps
    assert greedy_chain_steps(is_right, 6, 1) == 4  # at 0, 2 (1 accepted each), 4, 5
    # at k = 3 the mean over positions says 1 + 3 * 3 / 6 = 2.5 tokens a step, the chain 2.0


def test_the_missing_speculator_message_names_the_command() -> None:
    message = not_found_message("smollm2-135m")
    assert "goodspeed speculator train smollm2-135m" in message and "under an hour" in message


def test_a_warm_start_begins_in_the_targets_space_and_still_learns(tiny: tuple[Path, Path], speculators: Path) -> None:
    model, source = tiny
    manifest = train_tiny(model, source, warm_start=True, stage1_steps=20, stage2_steps=20)
    for stage in ("1", "2"):
        first, final = manifest["stages"][stage]["first_loss_by_head"], manifest["stages"][stage]["final_loss_by_head"]
        assert sum(final) < sum(first), (stage, first, final)

    from engine.speculator.model import MLPSpeculator, SpeculatorConfig
    from engine.speculator.train import warm_start

    spec = MLPSpeculator(SpeculatorConfig(emb_dim=4, vocab_size=3, num_heads=2))
    embed = torch.arange(24, dtype=torch.float32).view(6, 4)
    warm_start(spec, embed, torch.tensor([5, 1]))
    assert torch.equal(spec.head[1].weight, torch.stack([embed[5], embed[1], torch.zeros(4)]))
    assert torch.equal(spec.emb[0].weight, spec.head[0].weight) and torch.equal(spec.proj[1].weight, torch.eye(4))
    with pytest.raises(ValueError, match="inner_dim 0"):
        warm_start(
            MLPSpeculator(SpeculatorConfig(emb_dim=4, vocab_size=3, num_heads=2, inner_dim=8)),
            embed,
            torch.tensor([5, 1]),
        )


def test_a_run_stopped_in_stage_2_does_not_train_stage_1_again(
    tiny: tuple[Path, Path], speculators: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    model, source = tiny
    config = tiny_config(model, stage1_steps=30, stage2_steps=50)
    figures = run_killed_after_stage(monkeypatch, config, source, 2, encode_bytes)
    manifest = train_speculator(config, None, encode=encode_bytes, source_dirs=[source])
    assert manifest["stages"] == {"1": figures[0], "2": figures[1]}


def test_runs_with_more_training_prompts_are_scored_on_the_same_held_out_generations(
    tiny: tuple[Path, Path], speculators: Path
) -> None:
    model, source = tiny
    # No training steps: the heads stay as seeded, so the held-out figures differ only if the
    # held-out generations do.
    scored = [
        train_tiny(model, source, num_prompts=n, stage1_steps=0, stage2_steps=0)["held_out"]["generations"]
        for n in (8, 16)
    ]
    assert scored[0] == scored[1]
