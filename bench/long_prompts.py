"""Long prompts for `bench longctx`, and a runner that prefills each of them only once.

The prompts are the first N tokens of large source files of third-party packages installed here
(not the Python standard library, not HumanEval), one file per request of a batch, continued by
the model as code. Prefilling 8 prompts of 8K tokens takes minutes on a small CPU, and every
variant of a (context, batch) point needs the same prompts in the KV cache, so `PrefilledRunner`
keeps each prompt's K/V the first time it is prefilled and writes them back when the prompt
comes again; the control plane is told the prompt is prefilled up to its last token, whose
forward then gives the first token exactly as a full prefill would.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

import torch

from engine.protocol import NewRequest
from engine.runner import ModelRunner
from server.tokenizer import TextTokenizer

# (package, file): each at least 8K tokens of the default model's tokenizer, one per batch slot.
SOURCES = (
    ("grpc", "_channel.py"),
    ("transformers", "generation/utils.py"),
    ("torch", "_tensor.py"),
    ("torch", "nn/modules/module.py"),
    ("anyio", "_backends/_asyncio.py"),
    ("hypothesis", "strategies/_internal/core.py"),
    ("numpy", "_core/fromnumeric.py"),
    ("tqdm", "std.py"),
)


def source_token_ids(tokenizer: TextTokenizer, num_sources: int) -> list[list[int]]:
    """The first num_sources files of SOURCES, tokenized whole."""
    if num_sources > len(SOURCES):
        raise ValueError(f"at most {len(SOURCES)} long prompts are defined, asked for {num_sources}")
    files = []
    for package, name in SOURCES[:num_sources]:
        spec = importlib.util.find_spec(package)
        if spec is None or spec.origin is None:
            raise RuntimeError(f"bench longctx reads {package}/{name}, but {package} is not installed")
        files.append(tokenizer.encode((Path(spec.origin).parent / name).read_text()))
    return files


def cut_prompts(sources: list[list[int]], num_tokens: int) -> list[list[int]]:
    names = [f"{package}/{name}" for package, name in SOURCES[: len(sources)]]
    too_short = [name for name, ids in zip(names, sources, strict=True) if len(ids) < num_tokens]
    if too_short:
        raise ValueError(f"these sources have fewer than {num_tokens} tokens: {', '.join(too_short)}")
    return [ids[:num_tokens] for ids in sources]


class PrefilledRunner(ModelRunner):
    """A model runner that remembers prompts' K/V (all but the last prompt token) when a request
    ends while `is_saving`, and restores them when a request with the same prompt arrives."""

    def __init__(self, runner: ModelRunner) -> None:
        super().__init__(runner.model, runner.kv_cache, list(runner.drafters.values()), runner.max_draft_tokens)
        self.saved: dict[tuple[int, ...], tuple[torch.Tensor, torch.Tensor]] = {}
        self.is_saving = False

    def num_prefilled_tokens(self, prompt_ids: list[int]) -> int:
        return len(prompt_ids) - 1 if tuple(prompt_ids) in self.saved else 0

    def add_request(self, new: NewRequest) -> None:
        super().add_request(new)
        saved = self.saved.get(tuple(new.prompt_token_ids))
        if saved is not None:
            seq = self.seqs[new.req_id]
            rows = slice(seq.kv_start, seq.kv_start + saved[0].shape[2])
            self.kv_cache.set_k_rows(rows, saved[0])
            self.kv_cache.v[:, :, rows] = saved[1]
            seq.num_computed_tokens = saved[0].shape[2]

    def remove_request(self, req_id: str) -> None:
        seq = self.seqs.get(req_id)
        if self.is_saving and seq is not None and not seq.is_prefilling:
            rows = slice(seq.kv_start, seq.kv_start + seq.num_prompt_tokens - 1)
            key = tuple(seq.token_ids[: seq.num_prompt_tokens])
            self.saved[key] = (self.kv_cache.k_rows(rows).clone(), self.kv_cache.v[:, :, rows].clone())
        super().remove_request(req_id)
