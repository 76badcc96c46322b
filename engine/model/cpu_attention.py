"""One attention call per layer for a CPU step's short sequences: a small C++ kernel (csrc/).

Attending one sequence at a time costs two matrix products and a softmax per sequence and layer:
at batch 16 over short prompts that is 1,440 operator calls a step, nearly all per-call overhead
(docs/decode-profile.md). The kernel runs every sequence and KV head of a step in one call, in
parallel, reading K as the cache stores it ([Hkv, D, capacity]) and a self-speculation window's
sinks and recent rows in place (the loop copies them into one block first).

It is used for every sequence of up to MAX_QUERY_TOKENS query tokens (decoding, verification,
drafting over a window); prefill chunks, matrix products at heart, stay with the loop. Against the
loop (one layer, 2 threads, AMD EPYC, interleaved scratch timings): 2.3-3.7x at batch 1 and 16
over 150-300 tokens, 1.5-1.9x verifying 4 drafts, 1.6x at batch 1 over 7,680 tokens, 2.8-3x over
a 512-token window of 7,680, and 0.9x at batch 8 over 7,680 (where both are bound by memory).
One code path for decoding and verification also makes a decoded token's attention bit-identical
to the same token's when verified (see the source).

It is compiled for the CPU at hand (-march=native) with torch's extension builder by `make setup`,
or else on first use, and cached under ~/.cache/torch_extensions per CPU model and flags (about
10 s, once). Without a C++ compiler, or on CUDA, everything runs the loop.
"""

from __future__ import annotations

import functools
import hashlib
import platform
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import structlog
import torch

log = structlog.get_logger("goodspeed.engine")

SOURCE = Path(__file__).parent / "csrc" / "cpu_attention.cpp"
MAX_QUERY_TOKENS = 16
HEAD_DIMS = (64, 128)  # the kernel's register tiles are written for these

RaggedAttention = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, int, int], torch.Tensor]


@dataclass(frozen=True, slots=True)
class KernelSeqs:
    """The step's sequences the kernel attends, as it reads them: [S, 4] int64 rows of
    (query_start, num_query_tokens, kv_start, num_kv_tokens)."""

    seqs: torch.Tensor
    num_sink_tokens: int = 0
    num_recent_tokens: int = 0  # 0: all keys


def cpu_fingerprint() -> str:
    """The CPU model and flags, hashed: a kernel built with -march=native is only for them."""
    try:
        info = Path("/proc/cpuinfo").read_text()
        lines = [line for line in info.splitlines() if line.startswith(("model name", "flags"))][:2]
    except OSError:
        lines = [platform.processor()]
    return hashlib.sha256("\n".join(lines).encode()).hexdigest()[:12]


@functools.cache
def ragged_attention() -> RaggedAttention | None:
    """The compiled kernel (torch.ops.goodspeed.ragged_attention), or None where it cannot be built."""
    from torch.utils.cpp_extension import load

    try:
        load(
            name=f"goodspeed_cpu_attention_{cpu_fingerprint()}",
            sources=[str(SOURCE)],
            extra_cflags=["-O3", "-march=native", "-ffp-contract=fast"],
            is_python_module=False,
        )
    except Exception as error:  # no compiler, no ninja, a toolchain that rejects the flags: run the loop
        log.warning("CPU attention kernel unavailable; attending one sequence at a time", error=str(error))
        return None
    kernel: RaggedAttention = torch.ops.goodspeed.ragged_attention
    return kernel
