"""Where a model's trained speculator lives in the cache (no torch here: the server's command
line asks before it starts the engine)."""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any

from engine.fetch import cache_root

WEIGHTS = "speculator.safetensors"
MANIFEST = "manifest.json"


def model_key(model: str) -> str:
    """The cache directory name of a model's speculator: a catalog name as it is, a local
    directory by its name and a hash of its absolute path (two checkouts of one name differ)."""
    path = Path(model).expanduser()
    if path.is_dir():
        digest = hashlib.sha256(str(path.resolve()).encode()).hexdigest()[:12]
        return f"{path.resolve().name}-{digest}"
    return model.replace("/", "--")


def speculators_root() -> Path:
    """GOODSPEED_SPECULATORS, or `speculators/` in the model cache."""
    configured = os.environ.get("GOODSPEED_SPECULATORS")
    return Path(configured).expanduser() if configured else cache_root() / "speculators"


def speculator_dir(model: str) -> Path:
    return speculators_root() / model_key(model)


def find_trained(model: str) -> Path | None:
    directory = speculator_dir(model)
    return directory if (directory / MANIFEST).is_file() and (directory / WEIGHTS).is_file() else None


def not_found_message(model: str) -> str:
    return (
        f"no trained speculator for {model} is in the cache ({speculator_dir(model)}); "
        f"`goodspeed speculator train {model}` trains one (under an hour on a 2-core CPU for the default "
        "model; --time-budget-min shortens it), or leave mlp out of --drafters"
    )


def trained_speculators() -> list[tuple[str, dict[str, Any]]]:
    """(model, manifest) of every trained speculator in the cache; unreadable manifests are skipped."""
    root = speculators_root()
    found = []
    for directory in sorted(root.iterdir()) if root.is_dir() else []:
        if (
            directory.name.startswith(".")
            or not (directory / MANIFEST).is_file()
            or not (directory / WEIGHTS).is_file()
        ):
            continue
        try:
            manifest = json.loads((directory / MANIFEST).read_text())
        except (OSError, ValueError):
            continue
        found.append((str(manifest.get("model", directory.name)), manifest))
    return found
