"""Is a converted cache entry intact? A cheap check (sizes, safetensors headers) or a deep one (sha256).

`pull` records every converted file's size and sha256 in the entry's manifest, written last. A file
cut short or damaged later (a full disk, an interrupted copy of the cache) is then found and named
before transformers reads it: transformers itself only says "incomplete metadata", naming no file.
The cheap check reads a few kilobytes per file, so it runs on every start-up; the deep one reads
every byte (about a second per GB) and runs only when asked.
"""

from __future__ import annotations

import hashlib
import json
import struct
from collections.abc import Callable
from dataclasses import dataclass
from enum import StrEnum
from pathlib import Path
from typing import Any

from tqdm import tqdm

MANIFEST = "goodspeed.json"  # written last inside a converted entry: its presence means complete
MAX_HEADER_BYTES = 100_000_000  # safetensors refuses larger headers too
CHUNK_BYTES = 1 << 20


class EntryStatus(StrEnum):
    OK = "ok"
    NOT_CACHED = "not cached"
    CORRUPT = "corrupt"


@dataclass(frozen=True, slots=True)
class EntryState:
    status: EntryStatus
    reason: str = ""  # when corrupt: the file and what is wrong with it

    @property
    def is_ok(self) -> bool:
        return self.status is EntryStatus.OK


@dataclass(frozen=True, slots=True)
class FileRecord:
    num_bytes: int
    sha256: str


def write_manifest(directory: Path, info: dict[str, Any]) -> None:
    """Records every file's size and sha256 next to `info`, in the manifest (call it last)."""
    files = {
        path.relative_to(directory).as_posix(): {"num_bytes": path.stat().st_size, "sha256": sha256_of(path)}
        for path in sorted(directory.rglob("*"))
        if path.is_file() and path.name != MANIFEST
    }
    (directory / MANIFEST).write_text(json.dumps({**info, "files": files}, indent=2) + "\n")


def check_entry(directory: Path, is_deep: bool = False, show_progress: bool = False) -> EntryState:
    """Sizes and safetensors headers; with `is_deep` also every file's sha256 (a bar on a terminal)."""
    if not (directory / MANIFEST).is_file():
        return EntryState(EntryStatus.NOT_CACHED)
    records = _read_records(directory / MANIFEST)
    if isinstance(records, str):
        return EntryState(EntryStatus.CORRUPT, records)
    problem = _size_or_header_problem(directory, records)
    if problem is None and is_deep:
        problem = _sha256_problem(directory, records, show_progress)
    return EntryState(EntryStatus.CORRUPT, problem) if problem else EntryState(EntryStatus.OK)


def safetensors_problem(path: Path) -> str | None:
    """What is wrong with a safetensors file's header, to follow its name; None if it is complete.

    The layout: 8 bytes little-endian header length, the JSON header, then the tensor data, whose
    largest `data_offsets` end must land exactly on the end of the file.
    """
    num_bytes = path.stat().st_size
    with open(path, "rb") as handle:
        prefix = handle.read(8)
        if len(prefix) < 8:
            return f"is {num_bytes:,} bytes, too short for a safetensors header"
        (num_header_bytes,) = struct.unpack("<Q", prefix)
        if num_header_bytes > MAX_HEADER_BYTES:
            return f"has an implausible header length of {num_header_bytes:,} bytes"
        if 8 + num_header_bytes > num_bytes:
            return f"is {num_bytes:,} bytes, too short for its {num_header_bytes:,}-byte header"
        raw = handle.read(num_header_bytes)
    try:
        header = json.loads(raw)
    except ValueError:
        return "has a header that is not valid JSON"
    data_end = _data_end(header)
    if data_end is None:
        return "has a header without valid data_offsets"
    expected = 8 + num_header_bytes + data_end
    if expected != num_bytes:
        return f"is {num_bytes:,} bytes, but its header describes {expected:,}"
    return None


def sha256_of(path: Path, on_bytes: Callable[[int], object] | None = None) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while chunk := handle.read(CHUNK_BYTES):
            digest.update(chunk)
            if on_bytes is not None:
                on_bytes(len(chunk))
    return digest.hexdigest()


def _read_records(manifest: Path) -> dict[str, FileRecord] | str:
    """The manifest's `files`, or why they cannot be used."""
    try:
        files = json.loads(manifest.read_text()).get("files")
    except (OSError, ValueError, AttributeError) as exc:
        return f"{MANIFEST} cannot be read: {exc}"
    if files is None:
        return f"{MANIFEST} predates checksums (written by an older goodspeed), so the files cannot be trusted"
    try:
        return {name: FileRecord(int(record["num_bytes"]), str(record["sha256"])) for name, record in files.items()}
    except (AttributeError, KeyError, TypeError, ValueError):
        return f"{MANIFEST} has a malformed `files` mapping"


def _size_or_header_problem(directory: Path, records: dict[str, FileRecord]) -> str | None:
    for name, record in records.items():
        path = directory / name
        if not path.is_file():
            return f"{name} is missing"
        num_bytes = path.stat().st_size
        if num_bytes != record.num_bytes:
            return f"{name} is {num_bytes:,} bytes, expected {record.num_bytes:,}"
        if path.suffix == ".safetensors" and (problem := safetensors_problem(path)):
            return f"{name} {problem}"
    return None


def _sha256_problem(directory: Path, records: dict[str, FileRecord], show_progress: bool) -> str | None:
    total = sum(record.num_bytes for record in records.values())
    # disable=None: the bar shows only on a terminal, never in logs or captured output.
    disable = None if show_progress else True
    with tqdm(total=total, desc=f"verifying {directory.name}", unit="B", unit_scale=True, disable=disable) as bar:
        for name, record in records.items():
            digest = sha256_of(directory / name, bar.update)
            if digest != record.sha256:
                return f"{name} has sha256 {digest[:12]}..., expected {record.sha256[:12]}...: its content changed"
    return None


def _data_end(header: object) -> int | None:
    """The largest `data_offsets` end in a safetensors header, or None if the header is malformed."""
    if not isinstance(header, dict):
        return None
    data_end = 0
    for key, tensor in header.items():
        if key == "__metadata__":
            continue
        offsets = tensor.get("data_offsets") if isinstance(tensor, dict) else None
        if not (isinstance(offsets, list) and len(offsets) == 2 and all(type(o) is int for o in offsets)):
            return None
        data_end = max(data_end, offsets[1])
    return data_end
