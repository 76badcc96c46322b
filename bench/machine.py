"""Where a figure was taken: CPU model and flags, core count, platform, measured memory bandwidth
(machines of one kind differ: AMD EPYC on some days, Intel Xeon with AMX on others)."""

from __future__ import annotations

import os
import platform
import time
from pathlib import Path
from typing import Any

import torch

# the instruction sets the CPU kernels choose between
KERNEL_FLAGS = ("avx2", "fma", "avx512f", "avx512_vnni", "avx512_bf16", "amx_tile", "amx_bf16", "amx_int8")
TRIAD_BYTES = 256 * 2**20  # per array: far larger than any cache of these machines


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def cpu_flags() -> list[str]:
    """Which of KERNEL_FLAGS the CPU has."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags"):
                present = set(line.split(":", 1)[1].split())
                return [flag for flag in KERNEL_FLAGS if flag in present]
    except OSError:
        pass
    return []


def memory_bandwidth_gbs(repeats: int = 5) -> float:
    """A STREAM-style triad, a = b + 2c, over float32 arrays of TRIAD_BYTES each with the
    process's torch threads: bytes read and written (3 arrays) over the best time, in GB/s."""
    n = TRIAD_BYTES // 4
    a, b, c = torch.empty(n), torch.rand(n), torch.rand(n)
    best = float("inf")
    for _ in range(repeats + 1):  # the first run touches the pages
        started = time.perf_counter()
        torch.add(b, c, alpha=2.0, out=a)
        best = min(best, time.perf_counter() - started)
    return 3 * n * 4 / best / 1e9


def machine_facts() -> dict[str, Any]:
    return {
        "cpu_model": cpu_model(),
        "cpu_flags": cpu_flags(),
        "num_cpus": os.cpu_count() or 0,
        "torch_threads": torch.get_num_threads(),
        "memory_bandwidth_gbs": round(memory_bandwidth_gbs(), 1),
        "platform": platform.platform(),
    }
