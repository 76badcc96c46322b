"""A trained speculator on disk: its weights, the target tokens it predicts, and a manifest.

It lives in the model cache beside the models, one directory per target model:
`<cache>/speculators/<model key>/` with `speculator.safetensors` (weights and the token map) and
`manifest.json` (configuration, corpus fingerprint, steps, losses, per-head held-out accuracy).
The heads predict only the target's most frequent tokens (the projection onto all 49,152 tokens
would cost a fifth of a target step per head on a CPU), plus one "other" class for the rest;
verification handles the tokens it cannot name. The directory is written under a temporary name
and renamed into place, so a reader never sees half of one.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from engine.speculator.location import MANIFEST, WEIGHTS, find_trained, not_found_message
from engine.speculator.model import MLPSpeculator, SpeculatorConfig

TOKEN_IDS_KEY = "token_ids"  # [num_tokens]: the target id of each class but the last ("other")


class SpeculatorNotFoundError(RuntimeError):
    """No trained speculator for the model is in the cache."""


@dataclass(frozen=True, slots=True)
class TrainedSpeculator:
    model: MLPSpeculator
    token_ids: torch.Tensor  # [C - 1] int64: class c < C - 1 is target token token_ids[c]; C - 1 is "other"
    manifest: dict[str, Any] = field(default_factory=dict)

    @property
    def num_heads(self) -> int:
        return self.model.config.num_heads

    def to_classes(self, target_vocab_size: int) -> torch.Tensor:
        """[target vocab] int64: each target token's class ("other" for those it does not name)."""
        classes = torch.full((target_vocab_size,), len(self.token_ids), dtype=torch.long)
        classes[self.token_ids] = torch.arange(len(self.token_ids))
        return classes


def save(directory: Path, trained: TrainedSpeculator) -> None:
    """Writes weights and manifest into a sibling temporary directory, then renames it into place."""
    directory.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{directory.name}-", dir=directory.parent))
    try:
        # Tied heads share modules: save each tensor once, under its first name (safetensors
        # refuses shared storage).
        unique: dict[str, torch.Tensor] = {}
        seen: set[int] = set()
        for name, tensor in trained.model.state_dict().items():
            if tensor.data_ptr() not in seen:
                seen.add(tensor.data_ptr())
                unique[name] = tensor.detach().cpu().contiguous()
        unique[TOKEN_IDS_KEY] = trained.token_ids.cpu()
        save_file(unique, str(staging / WEIGHTS))
        manifest = {"config": asdict(trained.model.config), **trained.manifest}
        (staging / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")
        if directory.exists():
            shutil.rmtree(directory)
        os.replace(staging, directory)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise


def load(directory: Path, dtype: torch.dtype = torch.float32, device: torch.device | None = None) -> TrainedSpeculator:
    manifest = json.loads((directory / MANIFEST).read_text())
    config = SpeculatorConfig(**manifest.pop("config"))
    model = MLPSpeculator(config)
    tensors = load_file(str(directory / WEIGHTS))
    token_ids = tensors.pop(TOKEN_IDS_KEY)
    # strict=False: a tied module's tensors were saved once, under its first name; the check
    # below makes sure every parameter got its values from some name.
    missing, unexpected = model.load_state_dict(tensors, strict=False)
    loaded = {id(p) for name, p in model.named_parameters() if name in tensors}
    if unexpected or any(id(p) not in loaded for p in model.parameters()):
        raise ValueError(f"{directory / WEIGHTS} does not match its manifest's configuration ({missing or unexpected})")
    model = model.to(device=device or torch.device("cpu"), dtype=dtype).eval()
    return TrainedSpeculator(model, token_ids.to(device or torch.device("cpu")), manifest)


def load_trained(model: str, dtype: torch.dtype, device: torch.device) -> TrainedSpeculator:
    directory = find_trained(model)
    if directory is None:
        raise SpeculatorNotFoundError(not_found_message(model))
    return load(directory, dtype, device)
