"""End-to-end fixtures: the real server process on a free port, with the real default model."""

from __future__ import annotations

import contextlib
import socket
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2

from bench.server_process import ServerProcess
from bench.server_process import start_server as start_server_process
from client.client import Client
from client.tls import TlsFiles

ADMIN_TOKEN = "test-admin-token"
RunningServer = ServerProcess


def start_server(log_dir: Path, *flags: str, tls: TlsFiles | None = None) -> ServerProcess:
    """A float32 server on 2 threads (as in CI) with the given extra flags."""
    return start_server_process(log_dir, "--dtype", "float32", "--threads", "2", *flags, tls=tls)


def serving(
    tmp_path_factory: pytest.TempPathFactory, name: str, flags: str, tls: TlsFiles | None = None
) -> Iterator[ServerProcess]:
    """A module's own server (`yield from` it in a fixture): flags in one string, split on spaces;
    stopped by SIGTERM afterwards, which must drain it cleanly."""
    running = start_server(tmp_path_factory.mktemp(name), *flags.split(), tls=tls)
    yield running
    assert running.stop() == 0, running.log()


@pytest.fixture(scope="session")
def server(smollm2_path: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    """The main server: default settings plus an admin token."""
    running = start_server(tmp_path_factory.mktemp("server"), "--admin-token", ADMIN_TOKEN)
    yield running
    assert running.stop() == 0, running.log()


@pytest.fixture
def client(server: ServerProcess) -> Iterator[Client]:
    with Client(server.target, admin_token=ADMIN_TOKEN) as c:
        yield c


def engine_pids(server: RunningServer) -> list[int]:
    """The engine processes: the server's spawned children (not the resource tracker)."""
    pids = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text().rsplit(")", 1)[1].split()
            cmdline = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode()
        except OSError:
            continue
        if int(stat[1]) == server.process.pid and "spawn_main" in cmdline and stat[0] != "Z":
            pids.append(int(entry.name))
    return pids


def engine_pid(server: RunningServer) -> int:
    pids = engine_pids(server)
    assert len(pids) == 1, f"expected one engine process, found {pids}"
    return pids[0]


def health(client: Client) -> int:
    try:
        return int(client.health.Check(health_pb2.HealthCheckRequest(service=""), timeout=2).status)
    except grpc.RpcError:
        return -1


def port_is_open(port: int) -> bool:
    with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), timeout=1):
        return True
    return False


def wait_for(predicate: Callable[[], object], timeout: float = 60.0, what: str = "condition") -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.05)
