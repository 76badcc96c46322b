"""transformers `generate` as a reference system, in a process of its own.

The benchmark interleaves it with goodspeed prompt by prompt; in its own process it keeps its
own allocator, threads and caches, as a user running it would, and cannot warm or slow ours.
Calls are sent over a pipe and block until the reply (bench/reference_process.py): only one of
the two computes at a time. Timing happens in the reference process, around `generate` only.
"""

from __future__ import annotations

import time
from typing import Any

import torch

from bench.reference_process import ReferenceProcess


class HFReference:
    """transformers `generate`, greedy, on the same weights and dtype (and the draft model's, for
    assisted generation)."""

    def __init__(self, model_path: str, dtype: str, eos_ids: list[int], draft_path: str = "") -> None:
        from transformers import AutoModelForCausalLM

        torch_dtype = getattr(torch, dtype)
        self.model: Any = AutoModelForCausalLM.from_pretrained(model_path, dtype=torch_dtype)
        self.assistant: Any = (
            AutoModelForCausalLM.from_pretrained(draft_path, dtype=torch_dtype) if draft_path else None
        )
        self.eos_ids = eos_ids

    def has_assistant(self) -> bool:
        return self.assistant is not None

    @torch.inference_mode()
    def generate(
        self, prompt_ids: list[int], max_new_tokens: int, prompt_lookup: int = 0, is_assisted: bool = False
    ) -> tuple[list[int], float]:
        extra: dict[str, Any] = {"prompt_lookup_num_tokens": prompt_lookup} if prompt_lookup else {}
        if is_assisted:
            extra["assistant_model"] = self.assistant
        started = time.perf_counter()
        out = self.model.generate(
            torch.tensor([prompt_ids]),
            attention_mask=torch.ones(1, len(prompt_ids), dtype=torch.long),
            max_new_tokens=max_new_tokens,
            do_sample=False,
            eos_token_id=self.eos_ids,
            pad_token_id=self.eos_ids[0],
            **extra,
        )
        return out[0, len(prompt_ids) :].tolist(), time.perf_counter() - started

    @torch.inference_mode()
    def top2_margin(self, token_ids: list[int]) -> float:
        """How close the model's next-token choice after token_ids is to a tie."""
        logits = self.model(torch.tensor([token_ids])).logits[0, -1].float()
        top2 = torch.topk(logits, 2).values
        return float(top2[0] - top2[1])

    @torch.inference_mode()
    def static_batch(self, prompts: list[list[int]], max_new_tokens: int) -> tuple[int, float]:
        """Left-padded static batch; returns (generated tokens, seconds)."""
        width = max(len(p) for p in prompts)
        pad = self.eos_ids[0]
        input_ids = torch.tensor([[pad] * (width - len(p)) + p for p in prompts])
        mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts])
        started = time.perf_counter()
        out = self.model.generate(
            input_ids,
            attention_mask=mask,
            max_new_tokens=max_new_tokens,
            do_sample=False,
            eos_token_id=self.eos_ids,
            pad_token_id=pad,
        )
        seconds = time.perf_counter() - started
        return sum(len(trim_at_eos(row, self.eos_ids)) for row in out[:, width:].tolist()), seconds


def trim_at_eos(token_ids: list[int], eos_ids: list[int]) -> list[int]:
    for i, token_id in enumerate(token_ids):
        if token_id in eos_ids:
            return token_ids[: i + 1]
    return token_ids


class HFProcess(ReferenceProcess):
    """HFReference's methods, run in a spawned process."""

    def __init__(self, model_path: str, dtype: str, eos_ids: list[int], draft_path: str = "") -> None:
        super().__init__("hf-reference", HFReference, model_path, dtype, eos_ids, draft_path)
        self.has_assistant = bool(self.call("has_assistant"))

    def generate(
        self, prompt_ids: list[int], max_new_tokens: int, prompt_lookup: int = 0, is_assisted: bool = False
    ) -> tuple[list[int], float]:
        output, seconds = self.call("generate", prompt_ids, max_new_tokens, prompt_lookup, is_assisted)
        return list(output), float(seconds)

    def top2_margin(self, token_ids: list[int]) -> float:
        return float(self.call("top2_margin", token_ids))

    def static_batch(self, prompts: list[list[int]], max_new_tokens: int) -> tuple[int, float]:
        tokens, seconds = self.call("static_batch", prompts, max_new_tokens)
        return int(tokens), float(seconds)
