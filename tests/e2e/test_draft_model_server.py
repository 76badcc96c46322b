"""The draft model through the real server on a real port: `--model X --draft-model Y` with a
tiny qwen2 pair that borrows the default model's tokenizer (mechanics: the flags, the engine
process and exact output; the real Qwen pair is in tests/engine/test_draft_model_qwen.py)."""

from __future__ import annotations

import shutil
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest

from client.client import Client
from tests.e2e.conftest import RunningServer, serving, start_server
from tests.tiny_models import make_tiny_qwen2, perturb_model

pytestmark = [pytest.mark.model, pytest.mark.slow]

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja")
VOCAB_SIZE = 49152  # the default model's tokenizer


def with_tokenizer(path: Path, tokenizer_dir: str) -> Path:
    for name in TOKENIZER_FILES:
        if (Path(tokenizer_dir) / name).is_file():
            shutil.copy(Path(tokenizer_dir) / name, path / name)
    return path


@pytest.fixture(scope="module")
def pair(smollm2_path: str, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    target, draft = tmp_path_factory.mktemp("tiny-target"), tmp_path_factory.mktemp("tiny-draft")
    make_tiny_qwen2(target, vocab_size=VOCAB_SIZE)
    perturb_model(target, draft, scale=0.1)
    return with_tokenizer(target, smollm2_path), with_tokenizer(draft, smollm2_path)


@pytest.fixture(scope="module")
def drafting(pair: tuple[Path, Path], tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningServer]:
    target, draft = pair
    yield from serving(
        tmp_path_factory, "draft-model", f"--model {target} --draft-model {draft} --kv-cache-tokens 4096"
    )


def test_the_server_drafts_with_either_drafter_and_the_output_stays_exact(drafting: RunningServer) -> None:
    with Client(drafting.target) as client:
        info = client.model_info()
        assert list(info.drafters) == ["ngram", "model", "self"] and info.drafter == "ngram"
        prompt = "def add(a, b):\n    return a + b\n\ndef add(a, b):"
        plain = client.generate(prompt, max_new_tokens=24, speculation="off")
        drafted = client.generate(prompt, max_new_tokens=24, speculation="fixed", num_draft_tokens=3, drafter="model")
        assert drafted.token_ids == plain.token_ids and drafted.text == plain.text
        usage = drafted.speculation.by_drafter
        assert set(usage) == {"model"} and usage["model"].drafted_tokens == drafted.speculation.drafted_tokens > 0
        assert usage["model"].accepted_tokens > 0
        stream = list(
            client.generate_stream(prompt, max_new_tokens=24, speculation="fixed", num_draft_tokens=2, drafter="model")
        )
        assert [t for chunk in stream for t in chunk.token_ids] == list(plain.token_ids)
        for mode in ("auto", "fixed"):  # AUTO picks per step; FIXED without a name uses the first (ngram)
            other = client.generate(prompt, max_new_tokens=24, speculation=mode, num_draft_tokens=2 * (mode == "fixed"))
            assert other.token_ids == plain.token_ids
        stats = client.stats()
        model = stats.drafters["model"]
        assert model.drafted_tokens > 0 and model.mean_draft_s > 0  # its own time, reported on its own
        # its drafting-cost model was warmed at start-up, on the target's features
        assert set(model.cost_model_ms) == set(stats.cost_model_ms) and any(model.cost_model_ms.values())
        assert model.cost_model_error > 0  # checked against its measured drafting time every step it ran
        assert stats.drafters["ngram"].steps > 0  # the FIXED request without a drafter named (it may find nothing)
    url = f"http://127.0.0.1:{drafting.metrics_port}/metrics"
    text = urllib.request.urlopen(url, timeout=5).read().decode()
    assert 'goodspeed_policy_draft_cost_model_error{drafter="model"}' in text
    assert 'goodspeed_policy_draft_cost_model_error{drafter="ngram"}' not in text  # it runs no model


def test_a_request_naming_a_drafter_the_server_lacks_is_refused_and_names_the_field(
    drafting: RunningServer,
) -> None:
    with Client(drafting.target) as client:
        with pytest.raises(grpc.RpcError) as error:
            client.generate("x", max_new_tokens=4, speculation="fixed", num_draft_tokens=2, drafter="medusa")
        assert error.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert "speculation.drafter" in str(error.value.details()) and "ngram, model" in str(error.value.details())
        assert client.generate("x", max_new_tokens=4).token_ids  # and it keeps serving


def test_a_draft_model_with_another_vocabulary_stops_the_server_with_the_reason(
    pair: tuple[Path, Path], tmp_path: Path
) -> None:
    target, _ = pair
    wide = tmp_path / "wide"
    make_tiny_qwen2(wide, vocab_size=VOCAB_SIZE + 64)
    with pytest.raises(RuntimeError, match=f"{VOCAB_SIZE + 64} entries, the target's {VOCAB_SIZE}"):
        start_server(tmp_path / "logs", "--model", str(target), "--draft-model", str(wide))


@pytest.fixture(scope="module")
def self_drafting(pair: tuple[Path, Path], tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningServer]:
    """The tiny target self-speculating over a small window, with an untrained MLP speculator in
    a speculator directory of the module's own: serving finds it and adds the mlp drafter without
    a flag."""
    import torch

    from engine.speculator.location import speculator_dir
    from engine.speculator.model import MLPSpeculator, SpeculatorConfig
    from engine.speculator.store import TrainedSpeculator, save

    target, _ = pair
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("GOODSPEED_SPECULATORS", str(tmp_path_factory.mktemp("speculators")))
        torch.manual_seed(0)
        heads = MLPSpeculator(SpeculatorConfig(emb_dim=32, vocab_size=4097, num_heads=3))
        save(speculator_dir(str(target)), TrainedSpeculator(heads, torch.arange(4096), {"model": str(target)}))
        flags = f"--model {target} --self-spec-sinks 2 --self-spec-window 14 --kv-cache-tokens 4096"
        yield from serving(tmp_path_factory, "self-spec", flags)


@pytest.mark.parametrize("drafter", ["self", "mlp"])
def test_the_server_drafts_over_a_window_or_with_the_speculator_and_the_output_stays_exact(
    self_drafting: RunningServer, drafter: str
) -> None:
    with Client(self_drafting.target) as client:
        assert list(client.model_info().drafters) == ["ngram", "self", "mlp"]
        prompt = "def add(a, b):\n    return a + b\n\n" * 3 + "def sub(a, b):"  # longer than the window of 16
        plain = client.generate(prompt, max_new_tokens=24, speculation="off")
        drafted = client.generate(prompt, max_new_tokens=24, speculation="fixed", num_draft_tokens=3, drafter=drafter)
        assert drafted.token_ids == plain.token_ids
        assert drafted.speculation.by_drafter[drafter].drafted_tokens > 0
        assert client.generate(prompt, max_new_tokens=24, speculation="auto").token_ids == plain.token_ids
        stats = client.stats()
        # profiled at start-up (self: the target's one-token forwards through the window; mlp: its
        # heads) and priced by a cost model of its own
        assert any(stats.drafters[drafter].cost_model_ms.values()) and stats.drafters[drafter].mean_draft_s > 0
