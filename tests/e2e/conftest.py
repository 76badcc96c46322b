"""End-to-end fixtures: the real server process on a free port, with the real default model."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from client.client import Client

ROOT = Path(__file__).resolve().parents[2]
ADMIN_TOKEN = "test-admin-token"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@dataclass
class RunningServer:
    process: subprocess.Popen[bytes]
    port: int
    metrics_port: int
    log_path: Path

    @property
    def target(self) -> str:
        return f"127.0.0.1:{self.port}"

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def stop(self, timeout: float = 60) -> int:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
        return self.process.wait(timeout)


def start_server(log_dir: Path, *flags: str) -> RunningServer:
    port, metrics_port = free_port(), free_port()
    log_path = log_dir / f"server-{port}.log"
    cmd = [
        sys.executable,
        "-m",
        "server",
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        "--metrics-port",
        str(metrics_port),
        "--dtype",
        "float32",
        "--threads",
        "2",
        *flags,
    ]
    with open(log_path, "wb") as log:
        process = subprocess.Popen(cmd, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT, env=os.environ.copy())
    server = RunningServer(process, port, metrics_port, log_path)
    try:
        with Client(server.target) as client:
            client.wait_ready(timeout=600)
    except Exception:
        server.process.kill()
        raise RuntimeError(f"server did not become ready:\n{server.log()}") from None
    return server


@pytest.fixture(scope="session")
def server(smollm2_path: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningServer]:
    """The main server: default settings plus an admin token."""
    running = start_server(tmp_path_factory.mktemp("server"), "--admin-token", ADMIN_TOKEN)
    yield running
    assert running.stop() == 0, running.log()


@pytest.fixture
def client(server: RunningServer) -> Iterator[Client]:
    with Client(server.target, admin_token=ADMIN_TOKEN) as c:
        yield c
