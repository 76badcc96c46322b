"""The engine process dies at awkward times; the server notices, restarts it, and never exits.

Regressions: an engine that died while the server was idle went unnoticed (health SERVING until
the next request failed), and one killed while it was being restarted took the server down with
an ExceptionGroup after two restarts, below the budget. The tests run in order on one server:
each spends some of its restart budget (3 in 10 minutes), the last all of it.
"""

from __future__ import annotations

import os
import signal
import threading
import time
from collections.abc import Iterator

import grpc
import pytest
from grpc_health.v1 import health_pb2

from client.client import Client
from tests.e2e.conftest import RunningServer, engine_pid, engine_pids, health, serving, wait_for

pytestmark = [pytest.mark.model, pytest.mark.slow]

SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING


@pytest.fixture(scope="module")
def supervised(smollm2_path: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningServer]:
    # small limits keep the start-up profile short
    yield from serving(
        tmp_path_factory, "supervised", "--max-engine-restarts 3 --max-running-requests 2 --max-step-tokens 32"
    )


def test_an_engine_that_dies_while_idle_is_noticed_within_a_second(supervised: RunningServer) -> None:
    with Client(supervised.target) as client:
        assert client.generate("def f(x):", max_new_tokens=2).usage.completion_tokens == 2
        os.kill(engine_pid(supervised), signal.SIGKILL)
        killed = time.monotonic()
        wait_for(lambda: health(client) == NOT_SERVING, timeout=10, what="NOT_SERVING")
        assert time.monotonic() - killed < 1.0
        wait_for(lambda: health(client) == SERVING, timeout=300, what="SERVING again")
        stats = client.stats()
        assert (stats.engine_restarts, stats.engine_state) == (1, "running")
        assert "exit code -9" in stats.engine_error
        assert client.generate("def f(x):", max_new_tokens=2).usage.completion_tokens == 2


def test_an_engine_killed_while_restarting_is_restarted_again_and_requests_wait(supervised: RunningServer) -> None:
    with Client(supervised.target) as client:
        first = engine_pid(supervised)
        os.kill(first, signal.SIGKILL)
        queued: list[int] = []
        sender = threading.Thread(
            target=lambda: queued.append(
                client.generate("def g(x):", max_new_tokens=3, timeout=300).usage.completion_tokens
            )
        )
        sender.start()  # sent while the engine restarts: it waits for it rather than failing
        wait_for(lambda: engine_pids(supervised) not in ([], [first]), timeout=30, what="a new engine")
        time.sleep(0.5)
        os.kill(engine_pid(supervised), signal.SIGKILL)  # still loading its model
        wait_for(lambda: health(client) == SERVING, timeout=300, what="SERVING again")
        sender.join(300)
        assert queued == [3]
        assert supervised.process.poll() is None
        stats = client.stats()
        assert (stats.engine_restarts, stats.engine_state) == (2, "running")
    assert "engine restart failed" in supervised.log()  # the second kill did land while it loaded


def test_when_the_restart_budget_is_spent_the_server_stays_up_and_says_why(supervised: RunningServer) -> None:
    with Client(supervised.target) as client:
        os.kill(engine_pid(supervised), signal.SIGKILL)
        wait_for(lambda: client.stats().engine_state == "failed", timeout=30, what="the engine given up on")
        time.sleep(1.0)
        assert supervised.process.poll() is None
        assert health(client) == NOT_SERVING
        stats = client.stats()
        assert "--max-engine-restarts 3" in stats.engine_error and "restart the server" in stats.engine_error
        with pytest.raises(grpc.RpcError) as excinfo:
            client.generate("def h(x):", max_new_tokens=2)
        assert excinfo.value.code() == grpc.StatusCode.UNAVAILABLE
        assert "not serving" in excinfo.value.details()
    assert "engine restarts used up" in supervised.log()
