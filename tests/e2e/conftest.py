"""End-to-end fixtures: the real server process on a free port, with the real default model."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from bench.server_process import ServerProcess
from bench.server_process import start_server as start_server_process
from client.client import Client

ADMIN_TOKEN = "test-admin-token"
RunningServer = ServerProcess


def start_server(log_dir: Path, *flags: str) -> ServerProcess:
    """A float32 server on 2 threads (as in CI) with the given extra flags."""
    return start_server_process(log_dir, "--dtype", "float32", "--threads", "2", *flags)


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
