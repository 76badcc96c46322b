"""The engine's C++ CPU kernels (csrc/), built as one extension for the CPU at hand.

- `ragged_attention` (cpu_attention.py): one attention call per layer for a step's short sequences.
- `few_rows_linear` (linear.py): products of 1 to 9 rows (decoding, verifying), at the memory's speed.
- `add_rms_norm`, `silu_mul`, `rope_write_kv` (layer_ops.py): a layer's element-wise groups, one call each.

They are compiled with -march=native by torch's extension builder: by `make setup`, or else on
first use (about 15 s, once), and cached under ~/.cache/torch_extensions per CPU model and flags.
Without a C++ compiler, or on CUDA, the engine runs torch's operators instead.
"""

from __future__ import annotations

import functools
import hashlib
import platform
from pathlib import Path

import structlog

log = structlog.get_logger("goodspeed.engine")

SOURCES = tuple(
    Path(__file__).parent / "csrc" / name
    for name in ("cpu_attention.cpp", "cpu_linear.cpp", "cpu_fused.cpp", "cpu_layer.cpp")
)


def cpu_fingerprint() -> str:
    """The CPU model and flags, hashed: a kernel built with -march=native is only for them."""
    try:
        info = Path("/proc/cpuinfo").read_text()
        lines = [line for line in info.splitlines() if line.startswith(("model name", "flags"))][:2]
    except OSError:
        lines = [platform.processor()]
    return hashlib.sha256("\n".join(lines).encode()).hexdigest()[:12]


@functools.cache
def cpu_kernels_built() -> bool:
    """Builds (or loads the cached build of) the kernels into torch.ops.goodspeed; False where
    they cannot be built (a warning says why)."""
    from torch.utils.cpp_extension import load

    try:
        load(
            name=f"goodspeed_cpu_kernels_{cpu_fingerprint()}",
            sources=[str(source) for source in SOURCES],
            # -fopenmp: without it at::parallel_for compiles to a serial loop
            extra_cflags=["-O3", "-march=native", "-ffp-contract=fast", "-fopenmp"],
            extra_ldflags=["-fopenmp"],
            is_python_module=False,
        )
    except Exception as error:  # no compiler, no ninja, a toolchain that rejects the flags
        log.warning("CPU kernels unavailable; running torch's operators instead", error=str(error))
        return False
    return True
