"""The engine's C++ CPU kernels (csrc/), built as one extension for the CPU at hand.

- `ragged_attention` (cpu_attention.py): one attention call per layer for a step's short sequences.
- `few_rows_linear` (linear.py): products of a few rows (decoding, verifying), at the memory's speed.
- `add_rms_norm`, `silu_mul`, `rope_write_kv`, `decoder_layers` (layer_ops.py): a layer's
  element-wise groups, one call each, and all decoder layers in one call.

torch's extension builder compiles them with -march=native, in a child process with a time limit:
a compiler that stalls must cost one build, never a server's start or a test run. `make setup`
builds them (about a minute on 2 cores); otherwise the first process that needs them does, while
any other waits for it. Each build lives under <cache>/kernels/<key>, the key hashing the CPU
model and flags, the sources and their paths, the flags and torch's version. A build that fails or
runs out of time is recorded there with its log, and the engine runs torch's operators instead
(as it does on CUDA) until `make setup` or deleting that folder tries again.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import logging
import os
import platform
import signal
import subprocess
import sys
import time
from pathlib import Path

import structlog
import torch

from engine.fetch import cache_lock, cache_root

log = structlog.get_logger("goodspeed.engine")

CSRC = Path(__file__).parent / "csrc"
SOURCES = tuple(CSRC / name for name in ("cpu_attention.cpp", "cpu_linear.cpp", "cpu_fused.cpp", "cpu_layer.cpp"))
HEADERS = (CSRC / "kernels.h", CSRC / "lanes.h")  # not in torch's own source hash, so in ours
# -fopenmp: without it at::parallel_for compiles to a serial loop
CFLAGS = ("-O3", "-march=native", "-ffp-contract=fast", "-fopenmp")
LDFLAGS = ("-fopenmp",)
EXTENSION_NAME = "goodspeed_cpu_kernels"
BUILD_TIMEOUT_S = 600  # a build takes about a minute on 2 cores
BUILT = "built"  # written once the child has compiled and loaded the extension
FAILED = "failed"  # why the last build failed, then the end of its log
LOG_TAIL_LINES = 30
STOP_GRACE_S = 10


def cpu_description() -> str:
    """The CPU's model name and flags: a kernel built with -march=native is only for them."""
    try:
        info = Path("/proc/cpuinfo").read_text()
        lines = [line for line in info.splitlines() if line.startswith(("model name", "flags"))][:2]
    except OSError:
        lines = [platform.processor()]
    return "\n".join(lines)


def build_dir() -> Path:
    digest = hashlib.sha256(cpu_description().encode())
    for path in SOURCES + HEADERS:
        digest.update(str(path).encode())  # ninja keys its commands on the paths: one folder per checkout
        digest.update(path.read_bytes())
    digest.update(" ".join(CFLAGS + LDFLAGS + (torch.__version__,)).encode())
    return cache_root() / "kernels" / digest.hexdigest()[:16]


def compile_into(directory: Path, verbose: bool = False) -> None:
    """Builds the extension in `directory` (or finds it built) and loads it into torch.ops.goodspeed."""
    from torch.utils.cpp_extension import load

    (directory / "lock").unlink(missing_ok=True)  # torch's own lock, left by a build that was killed
    load(
        name=EXTENSION_NAME,
        sources=[str(source) for source in SOURCES],
        extra_cflags=list(CFLAGS),
        extra_ldflags=list(LDFLAGS),
        build_directory=str(directory),
        is_python_module=False,
        verbose=verbose,
    )


def compile_logged(directory: str) -> None:
    """The child's side of `build_in_child`: torch's builder says each step, ninja each command.
    BUILT is written as soon as the extension has compiled and loaded, so a build whose process
    then fails to exit still counts."""
    logging.getLogger("torch.utils.cpp_extension").setLevel(logging.INFO)  # it has its own handler
    compile_into(Path(directory), verbose=True)
    (Path(directory) / BUILT).write_text(f"{cpu_name()}\ntorch {torch.__version__}\n")


def cpu_name() -> str:
    return cpu_description().split("\n")[0].partition(":")[2].strip()


def stop_group(child: subprocess.Popen[bytes]) -> None:
    """Stops the child's process group. SIGTERM first: ninja starts each compiler in a group of
    its own, out of reach of ours, and stops them itself when it is terminated."""
    with contextlib.suppress(ProcessLookupError):
        os.killpg(child.pid, signal.SIGTERM)
    with contextlib.suppress(subprocess.TimeoutExpired):
        child.wait(timeout=STOP_GRACE_S)
    with contextlib.suppress(ProcessLookupError):  # whatever is left of the group
        os.killpg(child.pid, signal.SIGKILL)
    child.wait()


def build_in_child(directory: Path) -> bool:
    """Compiles in a child process under BUILD_TIMEOUT_S; records BUILT or FAILED in `directory`."""
    (directory / FAILED).unlink(missing_ok=True)
    build_log = directory / "build.log"
    started = time.monotonic()
    code = f"from engine.model.cpu_kernels import compile_logged; compile_logged({str(directory)!r})"
    with open(build_log, "w") as out:
        # its own session, so that a timeout stops ninja and the compilers with it
        child = subprocess.Popen(
            [sys.executable, "-c", code],
            stdout=out,
            stderr=subprocess.STDOUT,
            env={**os.environ, "PYTHONUNBUFFERED": "1"},  # a killed child's last words reach the log
            start_new_session=True,
        )
        try:
            returncode = child.wait(timeout=BUILD_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            stop_group(child)
            returncode = None
    seconds = round(time.monotonic() - started, 1)
    if (directory / BUILT).exists():
        stuck = {} if returncode == 0 else {"note": f"its process did not end (exit {returncode}); stopped"}
        log.info("CPU kernels built", cpu=cpu_name(), seconds=seconds, directory=str(directory), **stuck)
        return True
    reason = f"timed out after {BUILD_TIMEOUT_S} s" if returncode is None else f"the build exited with {returncode}"
    tail = build_log.read_text(errors="replace").splitlines()[-LOG_TAIL_LINES:]
    (directory / FAILED).write_text("\n".join([reason, *tail]) + "\n")
    log.warning(
        "CPU kernels did not build", cpu=cpu_name(), reason=reason, log=str(build_log), last_lines="\n".join(tail)
    )
    return False


def ensure_built(directory: Path, retry_failed: bool) -> bool:
    """Builds in a child unless a process has; False after a failure (recorded now, or earlier
    unless retry_failed). The caller holds the folder's lock."""
    if (directory / BUILT).exists():
        return True
    failure = directory / FAILED
    if failure.exists() and not retry_failed:
        reason = failure.read_text(errors="replace").split("\n")[0]
        log.warning(
            "CPU kernels unavailable; running torch's operators instead",
            reason=reason,
            retry=f"make setup, or delete {directory}",
        )
        return False
    return build_in_child(directory)


def build_lock(directory: Path) -> contextlib.AbstractContextManager[None]:
    directory.mkdir(parents=True, exist_ok=True)
    return cache_lock(f"kernels-{directory.name}")


@functools.cache
def cpu_kernels_built() -> bool:
    """Loads the kernels into torch.ops.goodspeed, building them first if no process has; False
    where they cannot be built or a build failed before (a warning says why)."""
    directory = build_dir()
    with build_lock(directory):
        if not ensure_built(directory, retry_failed=False):
            return False
        try:
            compile_into(directory)
        except Exception as error:  # a build that another torch or toolchain left behind
            log.warning("CPU kernels unavailable; running torch's operators instead", error=str(error))
            return False
    return True


def build_for_setup() -> bool:
    """make setup: builds now (in a child, as always), trying again after a recorded failure."""
    directory = build_dir()
    with build_lock(directory):
        return ensure_built(directory, retry_failed=True)


if __name__ == "__main__":
    # no exit status: without the kernels the engine still runs (torch's operators)
    build_for_setup()
