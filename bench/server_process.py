"""Starting a goodspeed server as a subprocess on free ports (for benchmarks and tests)."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from client.client import Client
from client.tls import TlsFiles

ROOT = Path(__file__).resolve().parents[1]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@dataclass
class ServerProcess:
    process: subprocess.Popen[bytes]
    port: int
    metrics_port: int
    log_path: Path
    tls: TlsFiles | None = None  # how a client reaches a TLS server; None: plaintext

    @property
    def target(self) -> str:
        return f"127.0.0.1:{self.port}"

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def stop(self, timeout: float = 60) -> int:
        """SIGTERM (a graceful drain), then the exit code."""
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
        return self.process.wait(timeout)


def start_server(log_dir: Path, *flags: str, ready_timeout: float = 600, tls: TlsFiles | None = None) -> ServerProcess:
    """`python -m server` with the given flags on free ports; returns once health says SERVING.
    For a server started with --tls-cert, tls holds the files its clients use (the readiness check too).
    A port free when picked can be taken before the server binds it (another process's ephemeral
    port): a server that could not listen is started again on other ports, a few times."""
    for _ in range(NUM_BIND_TRIES - 1):
        try:
            return start_server_once(log_dir, *flags, ready_timeout=ready_timeout, tls=tls)
        except RuntimeError as error:
            if not any(sign in str(error) for sign in BIND_FAILED):
                raise
    return start_server_once(log_dir, *flags, ready_timeout=ready_timeout, tls=tls)


NUM_BIND_TRIES = 3
# server/app.py's message when the gRPC port cannot be bound; the OS's when the metrics port cannot
BIND_FAILED = ("the address is taken or not local", "Address already in use")


def start_server_once(log_dir: Path, *flags: str, ready_timeout: float, tls: TlsFiles | None) -> ServerProcess:
    port, metrics_port = free_port(), free_port()
    log_dir.mkdir(parents=True, exist_ok=True)
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
        *flags,
    ]
    with open(log_path, "wb") as log:
        process = subprocess.Popen(cmd, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT, env=os.environ.copy())
    server = ServerProcess(process, port, metrics_port, log_path, tls)
    try:
        wait_ready(server, ready_timeout)
    except Exception:
        server.process.kill()
        raise RuntimeError(f"the server did not become ready; its log:\n{server.log()}") from None
    return server


def wait_ready(server: ServerProcess, timeout: float) -> None:
    """Waits for SERVING; a server that exits (a bad flag or file) fails at once, not at the timeout."""
    deadline = time.monotonic() + timeout
    with Client(server.target, tls=server.tls) as client:
        while True:
            try:
                client.wait_ready(timeout=1.0)
                return
            except TimeoutError:
                if server.process.poll() is not None:
                    raise RuntimeError(f"the server exited with code {server.process.returncode}") from None
                if time.monotonic() > deadline:
                    raise
