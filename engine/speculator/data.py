"""Training data for the speculator: the target's hidden states and the tokens that follow them.

A record of n positions holds states [n, hidden] (the target's final-norm hidden state at each
position), next_ids [n] (the token that came after each position, which the target read next)
and label_ids [n] (the token the target itself would write after each position: the argmax of
its logits there). Head i at position t reads next_ids[t + i] and learns label_ids[t + i + 1]:
what the target would say next, having read those tokens, which is what greedy verification
accepts.

Stage 1 runs the target over real code (teacher forcing: next_ids are the text's own tokens,
labels the target's predictions on it, which are easier to learn than the text and are what
drafts are checked against); stage 2 lets the target write greedily from prompts cut from the
same corpus, keeping the hidden state of every step it decodes (there the two ids agree).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from tqdm import tqdm

from engine.kv_cache import KVCache
from engine.model.transformer import ForwardBatch, SeqInput, Transformer


@dataclass(frozen=True, slots=True)
class Records:
    states: torch.Tensor  # [R, n, hidden], stored in bfloat16
    next_ids: torch.Tensor  # [R, n] int64
    label_ids: torch.Tensor  # [R, n] int64; IGNORE where there is nothing to learn

    def as_dict(self) -> dict[str, torch.Tensor]:
        return {"states": self.states, "next_ids": self.next_ids, "label_ids": self.label_ids}


def teacher_forced(
    model: Transformer,
    chunks: Sequence[list[int]],
    batch_chunks: int,
    deadline: Callable[[], bool],
    description: str,
) -> Records:
    """chunks: token lists of one length L + 1 -> records of L positions each (the last token is
    only a target). Stops early when deadline() says time is up."""
    states, next_ids, label_ids = [], [], []
    progress = tqdm(total=len(chunks), desc=description, unit="chunk")
    for start in range(0, len(chunks), batch_chunks):
        batch = chunks[start : start + batch_chunks]
        hidden, labels = _hidden_and_labels(model, [c[:-1] for c in batch])
        states.append(hidden)
        label_ids.append(labels)
        next_ids.append(torch.tensor([c[1:] for c in batch], dtype=torch.long))
        progress.update(len(batch))
        if deadline():
            break
    progress.close()
    if not states:
        raise RuntimeError(f"{description}: no data (the corpus is empty or the time budget too small)")
    return Records(torch.cat(states), torch.cat(next_ids), torch.cat(label_ids))


@torch.inference_mode()
def _hidden_and_labels(model: Transformer, seqs: list[list[int]]) -> tuple[torch.Tensor, torch.Tensor]:
    """[len(seqs), L, hidden] bfloat16: every position's final-norm hidden state; [len(seqs), L]:
    the target's greedy choice after each position."""
    length = len(seqs[0])
    kv = KVCache(model.spec, len(seqs) * length, model.dtype, model.device)
    inputs = [SeqInput(seq, i * length, 0, length) for i, seq in enumerate(seqs)]
    hidden = model.hidden_states(ForwardBatch.of(inputs, model.device), kv)
    labels = model.weights.lm_head(hidden).float().max(dim=-1).indices
    return hidden.view(len(seqs), length, -1).to(torch.bfloat16).cpu(), labels.view(len(seqs), length).cpu()


@torch.inference_mode()
def generated(
    model: Transformer,
    prompts: list[list[int]],
    num_new_tokens: int,
    eos_ids: set[int],
    batch_size: int,
    deadline: Callable[[], bool],
    description: str,
) -> Records:
    """The target continues each prompt greedily for num_new_tokens tokens, batch_size at a time.
    A record per prompt: the hidden state at its last prompt token and at each token it wrote,
    the token that followed; those after its first end-of-sequence token are IGNORE."""
    states, next_ids = [], []
    progress = tqdm(total=len(prompts) * num_new_tokens, desc=description, unit="tok")
    for start in range(0, len(prompts), batch_size):
        batch = prompts[start : start + batch_size]
        length = len(batch[0]) + num_new_tokens
        kv = KVCache(model.spec, len(batch) * length, model.dtype, model.device)
        inputs = [SeqInput(p, i * length, 0, 1) for i, p in enumerate(batch)]
        rows_h, rows_ids = [], []
        for step in range(num_new_tokens):
            hidden = model.hidden_states(ForwardBatch.of(inputs, model.device), kv)  # [B, hidden]
            chosen = model.weights.lm_head(hidden).float().max(dim=-1).indices  # [B]
            rows_h.append(hidden.to(torch.bfloat16).cpu())
            rows_ids.append(chosen.cpu())
            cached = len(batch[0]) + step
            inputs = [SeqInput([int(t)], i * length, cached, 1) for i, t in enumerate(chosen.tolist())]
            progress.update(len(batch))
        states.append(torch.stack(rows_h, dim=1))
        next_ids.append(mask_after_eos(torch.stack(rows_ids, dim=1), eos_ids))
        if deadline():
            break
    progress.close()
    written = torch.cat(next_ids)
    return Records(torch.cat(states), written, written)


IGNORE = -100  # a target id cross-entropy skips


def mask_after_eos(next_ids: torch.Tensor, eos_ids: set[int]) -> torch.Tensor:
    """[R, n]: ids after each row's first end-of-sequence token become IGNORE (the target wrote
    past its own end there, which it never does when served)."""
    is_eos = torch.zeros_like(next_ids, dtype=torch.bool)
    for eos in eos_ids:
        is_eos |= next_ids == eos
    after = (is_eos.cumsum(dim=1) - is_eos.long()) > 0
    return next_ids.masked_fill(after, IGNORE)
