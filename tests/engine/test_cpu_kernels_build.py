"""Building the CPU kernels can cost one build, never a stalled start: a compiler that hangs is
stopped at the time limit, the failure is recorded once, and a lock left by a killed build is
not waited on."""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from engine.model import cpu_kernels
from tests.engine.cpu_kernels import require_cpu_kernels


@pytest.fixture
def stalling_compiler(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    compiler = tmp_path / "c++"
    # answers torch's version checks, stalls on every compile
    compiler.write_text(
        f'#!/bin/sh\ncase "$*" in *" -c "*) echo $$ >> {tmp_path}/pids; exec sleep 120;; esac\nexec c++ "$@"\n'
    )
    compiler.chmod(0o755)
    monkeypatch.setenv("CXX", str(compiler))  # torch's extension builder takes its compiler from CXX
    monkeypatch.setenv("GOODSPEED_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(cpu_kernels, "BUILD_TIMEOUT_S", 5)
    return compiler


def wait_until_gone(pids: list[int], timeout_s: float = 5.0) -> bool:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if not any(Path(f"/proc/{pid}").exists() for pid in pids):
            return True
        time.sleep(0.1)
    return False


def test_a_stalling_compiler_is_stopped_and_the_failure_recorded(stalling_compiler: Path) -> None:
    started = time.monotonic()
    assert not cpu_kernels.cpu_kernels_built.__wrapped__()
    assert time.monotonic() - started < 60
    failure = (cpu_kernels.build_dir() / cpu_kernels.FAILED).read_text()
    assert failure.startswith("timed out after 5 s")
    assert "Building extension module" in failure  # the end of the build's log comes with it
    compiler_ids = [int(pid) for pid in (stalling_compiler.parent / "pids").read_text().split()]
    assert compiler_ids and wait_until_gone(compiler_ids)  # ninja's compilers stopped with it

    # later processes read the record rather than stalling again
    started = time.monotonic()
    assert not cpu_kernels.cpu_kernels_built.__wrapped__()
    assert time.monotonic() - started < 2


def test_setup_tries_again_after_a_recorded_failure(stalling_compiler: Path) -> None:
    directory = cpu_kernels.build_dir()
    directory.mkdir(parents=True)
    (directory / cpu_kernels.FAILED).write_text("the build exited with 1\n")
    assert not cpu_kernels.build_for_setup()
    assert (directory / cpu_kernels.FAILED).read_text().startswith("timed out")  # it ran again


def test_a_lock_left_by_a_killed_build_is_not_waited_on() -> None:
    require_cpu_kernels()
    directory = cpu_kernels.build_dir()
    (directory / "lock").touch()  # what torch's builder leaves when its process is killed mid-build
    started = time.monotonic()
    assert cpu_kernels.cpu_kernels_built.__wrapped__()
    assert time.monotonic() - started < 60
    assert not (directory / "lock").exists()
