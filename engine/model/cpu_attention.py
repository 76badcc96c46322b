"""One attention call per layer for a CPU step's sequences: a small C++ kernel (csrc/).

Attending one sequence at a time costs two matrix products and a softmax per sequence and layer:
at batch 16 over short prompts that is 1,440 operator calls a step, nearly all per-call overhead
(docs/decode-profile.md). The kernel runs every sequence and KV head of a step in one call, in
parallel, reading K as the cache stores it (paged and transposed, engine/kv_cache.py) and a
self-speculation window's sinks and recent rows in place (the loop copies them into one block
first).

It attends every sequence of a step: decoding, verification, drafting over a window, and prefill
chunks. Chunks stayed with the loop until 2026-12-05, as matrix products at heart; but the loop
widens and masks a whole score matrix per sequence and layer, and on an Intel Xeon with AMX (2
threads, whole forward passes of one sequence, loop -> kernel) a chunk of 512 tokens after 7,000
cached took 4.59 -> 1.46 s in bfloat16 (4.59 -> 1.70 in float32), 64 after 2,000 126 -> 68 ms,
17 after 7,000 236 -> 54 ms, and a prompt's first 512 289 -> 207 ms (float32, 128 tokens: a tie).
Against the loop on decoding steps (one layer, 2 threads, AMD EPYC, interleaved scratch timings, the
kernel still built without OpenMP and so on one thread): 2.3-3.7x at batch 1 and 16 over 150-300
tokens, 1.5-1.9x verifying 4 drafts, 1.6x at batch 1 over 7,680 tokens, 2.8-3x over a 512-token
window of 7,680, and 0.9x at batch 8 over 7,680 (where both are bound by memory). On two threads
it is about twice as fast again at batch 16 (docs/decode-profile.md). One code path for decoding
and verification also makes a decoded token's attention bit-identical to the same token's when
verified (see the source). A long sequence's keys are split into chunks so that its few KV heads
still fill every thread.

It is built with the engine's other CPU kernels (cpu_kernels.py). Without them everything runs
the loop.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from engine.model.cpu_kernels import cpu_kernels_built

HEAD_DIMS = (64, 128)  # the kernel's register tiles are written for these

RaggedAttention = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, int, int], torch.Tensor]


@dataclass(frozen=True, slots=True)
class KernelSeqs:
    """The step's sequences the kernel attends, as it reads them: [S, 4] int64 rows of
    (query_start, num_query_tokens, kv_start, num_kv_tokens)."""

    seqs: torch.Tensor
    num_sink_tokens: int = 0
    num_recent_tokens: int = 0  # 0: all keys


def ragged_attention(head_dim: int) -> RaggedAttention | None:
    """The compiled kernel (torch.ops.goodspeed.ragged_attention) for a model of this head size, or
    None where it cannot be built or is not written for that size. The one place that decides
    whether the kernel attends a model: the model's attention and its KV cache's dtype both ask."""
    if head_dim not in HEAD_DIMS or not cpu_kernels_built():
        return None
    kernel: RaggedAttention = torch.ops.goodspeed.ragged_attention
    return kernel
