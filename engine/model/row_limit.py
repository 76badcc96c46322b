"""Up to how many rows a step's products run in the engine's own kernel, timed on the whole model.

The kernel (csrc/cpu_linear.cpp) reads a weight at the memory's speed for a few rows; oneDNN's
denser dot products catch up as the rows grow, sooner in bfloat16, and where depends on the CPU.
One product is the wrong unit to time: within the kernel's limit a step also runs each layer in one
call (layer_ops.py), which steps with oneDNN's products cannot. On an AMD EPYC in bfloat16, oneDNN
won the output layer's product alone at 4 rows and more, while whole steps of 5 and 9 rows were
1.37x and 1.07x faster in the kernel. So the loader times forward passes of 1, 2, 4, 6, 9, 12 and
16 tokens (one sequence, as a batch-1 verification), each with every product in the kernel against
every product in oneDNN, taking turns, and keeps the limit that saves the most time over one pass
of each count (a few seconds at start-up); passes of 32 and 64 tokens too (a batch of 16 verifying
drafts), as many times. Timed 3 times each, they once left a stored limit of 16 for both dtypes on
an Intel Xeon where the kernel was 1.25x faster at 32 rows (bfloat16 24.5 against 31 ms a pass,
float32 62 against 78) and 1.1x at 64, and timed again came out at 64 four times of four; a stored
limit is kept for every later start, so verifications of 17 to 64 tokens had run in oneDNN: slower,
and in bfloat16 rounded otherwise than the plain steps beside them. A near tie at one count does
not stop it: on an AMD EPYC with AVX2 only, bfloat16 tied at one row, then the kernel won 1.5-3.6x
from 2 to 16 rows (this torch's oneDNN packs bfloat16 weights only with AVX-512 or AVX-NE-CONVERT).
On an AMD EPYC with AVX-512, float32 reached 16 (later 64, tied with oneDNN past 16) and bfloat16
stopped at 6, 9 or 12 (oneDNN's AVX512-BF16 products won from 16 rows there), until the kernel took
the same bfloat16 dot products: 64 since.
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
import time
from collections.abc import Callable
from pathlib import Path

import structlog
import torch

from engine.kv_cache import KVCache
from engine.model.cpu_kernels import build_dir
from engine.model.spec import ModelSpec
from engine.model.transformer import ForwardBatch, SeqInput, Transformer

TIMED_ROW_COUNTS = (1, 2, 4, 6, 9, 12, 16, 32, 64)
TIMED_RUNS = 7  # per row count and side; a stored limit timed with fewer (3 for 32 and 64 rows, once) is timed anew

log = structlog.get_logger("goodspeed.engine")


def fit_kernel_row_limit(model: Transformer, repeats: int = TIMED_RUNS) -> int:
    """Times the model's forward passes as above, sets the limit on every product and returns it
    (0: every product through oneDNN, the kernel's copies of the weights freed)."""
    if not model.has_kernel_products:
        return 0
    cache = KVCache(model.spec, max(TIMED_ROW_COUNTS), model.dtype, model.device)

    def forward_with(batch: ForwardBatch, max_rows: int) -> torch.Tensor:
        model.set_kernel_rows(max_rows)
        return model.forward(batch, cache)

    saved, seconds_saved = 0.0, {0: 0.0}  # by each limit, over one pass of each timed count
    with torch.inference_mode():
        for num_rows in TIMED_ROW_COUNTS:
            batch = ForwardBatch.of([SeqInput(list(range(num_rows)), 0, 0, num_rows)], model.device)
            in_kernel, in_onednn = (functools.partial(forward_with, batch, rows) for rows in (num_rows, 0))
            kernel_s, onednn_s = median_times([in_kernel, in_onednn], repeats)
            saved += onednn_s - kernel_s
            seconds_saved[num_rows] = saved
    limit = best_limit(seconds_saved)
    model.set_kernel_rows(limit, free_unused=True)
    log.info("linear products: our kernel up to a row limit, oneDNN beyond", max_kernel_rows=limit)
    return limit


def stored_limit_path(spec: ModelSpec, dtype: torch.dtype, num_threads: int) -> Path:
    """Where the limit timed for models of this shape, dtype and thread count is kept (it depends
    on the weights' shapes, not their values): beside the kernels built for this CPU, these sources
    and this torch, so that any of them changing times it anew."""
    digest = hashlib.sha256(repr(spec).encode()).hexdigest()[:12]
    dtype_name = str(dtype).removeprefix("torch.")
    return build_dir() / "row-limits" / f"{spec.model_type}-{digest}-{dtype_name}-{num_threads}t.json"


def recall_limit(path: Path) -> int | None:
    """The limit stored at path; None where there is none, it cannot be read, or it was chosen
    among other row counts than these or timed fewer times (the Python side changed, not the kernels)."""
    try:
        stored = json.loads(path.read_text())
        limit, counts, runs = stored["max_kernel_rows"], stored["timed_row_counts"], stored.get("timed_runs")
    except (OSError, ValueError, KeyError, TypeError):
        return None
    if not (
        isinstance(limit, int)
        and limit in (0, *TIMED_ROW_COUNTS)
        and counts == list(TIMED_ROW_COUNTS)
        and runs == TIMED_RUNS
    ):
        return None
    log.info(
        "linear products: our kernel up to the row limit an earlier load timed", max_kernel_rows=limit, path=str(path)
    )
    return limit


def store_limit(path: Path, limit: int) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(f"{path.name}.{os.getpid()}.partial")  # replicas may start together
    stored = {"max_kernel_rows": limit, "timed_row_counts": list(TIMED_ROW_COUNTS), "timed_runs": TIMED_RUNS}
    partial.write_text(json.dumps(stored))
    partial.replace(path)


def best_limit(seconds_saved: dict[int, float]) -> int:
    """The limit that saves the most time; the smaller of two that save as much."""
    return max(seconds_saved, key=lambda limit: (seconds_saved[limit], -limit))


def median_times(runs: list[Callable[[], torch.Tensor]], repeats: int) -> list[float]:
    """Each run's median time, the runs taking turns (a slow spell of the machine hits all)."""
    for run in runs:
        run()  # warm-up
    times: list[list[float]] = [[] for _ in runs]
    for _ in range(repeats):
        for run, seconds in zip(runs, times, strict=True):
            started = time.perf_counter()
            run()
            seconds.append(time.perf_counter() - started)
    return [sorted(seconds)[repeats // 2] for seconds in times]
