"""Admission limits, engine death and graceful draining, on servers of their own."""

from __future__ import annotations

import os
import signal
import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2

from api.pb import generation_pb2 as pb
from bench import server_process
from bench.server_process import free_port as pick_free_port
from client.balancing import GENERATION_SERVICE
from client.client import Client
from tests.e2e.conftest import RunningServer, engine_pid, health, port_is_open, start_server, wait_for

pytestmark = [pytest.mark.model, pytest.mark.slow]

POEM = [("user", "Write a long poem about the sea.")]

ROW_LIMIT_TIMED = "linear products: our kernel up to a row limit, oneDNN beyond"  # row_limit.py


@pytest.fixture(scope="module")
def small_server(smollm2_path: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningServer]:
    running = start_server(
        tmp_path_factory.mktemp("small"),
        "--max-running-requests",
        "1",
        "--max-waiting-requests",
        "1",
        "--kv-cache-tokens",
        "512",
        "--max-step-tokens",
        "64",
    )
    yield running
    running.stop()


def test_kv_budget_and_full_queue_give_resource_exhausted(small_server: RunningServer) -> None:
    with Client(small_server.target) as client:
        with pytest.raises(grpc.RpcError) as excinfo:
            client.generate("hi", max_new_tokens=600)
        assert excinfo.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert "needs 601 KV tokens" in excinfo.value.details()
        # plain decoding: drafted, this poem's 400 tokens took under 2 s, and the request could end
        # before the third one below arrived
        running = client.stub.GenerateStream(
            pb.GenerateRequest(
                messages=[pb.ChatMessage(role=r, content=c) for r, c in POEM],
                max_new_tokens=400,
                speculation=pb.Speculation(mode="OFF"),
            )
        )
        assert next(running).token_ids
        waiting = client.stub.GenerateStream(pb.GenerateRequest(prompt="def f(x):", max_new_tokens=8))
        threading.Thread(target=lambda: list(waiting), daemon=True).start()
        wait_for(lambda: client.stats().requests_waiting == 1, what="a waiting request")
        with pytest.raises(grpc.RpcError) as excinfo:
            client.generate("def g(x):", max_new_tokens=8)
        assert excinfo.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert "waiting queue is full" in excinfo.value.details()
        running.cancel()
        wait_for(lambda: client.stats().requests_running + client.stats().requests_waiting == 0, what="idle")
        assert client.generate("def h(x):", max_new_tokens=4).usage.completion_tokens == 4


@pytest.fixture(scope="module")
def fragile_server(smollm2_path: str, tmp_path_factory: pytest.TempPathFactory) -> RunningServer:
    return start_server(tmp_path_factory.mktemp("fragile"), "--drain-grace", "60")


def test_an_engine_death_pauses_running_streams_and_the_restarted_engine_resumes_them(
    fragile_server: RunningServer,
) -> None:
    with Client(fragile_server.target) as client:
        request = {"messages": POEM, "max_new_tokens": 64, "temperature": 0.0}
        expected = [c.token_ids for c in client.generate_stream(**request)]  # type: ignore[arg-type]
        stream = client.generate_stream(**request)  # type: ignore[arg-type]
        chunks = [next(stream)]
        num_timed = fragile_server.log().count(ROW_LIMIT_TIMED)
        os.kill(engine_pid(fragile_server), signal.SIGKILL)
        chunks += list(stream)
        # the new engine read the tokens sent before as prompt and went on from there: greedy, the
        # same tokens as a run that was never interrupted
        assert [t for c in chunks for t in c.token_ids] == [t for ids in expected for t in ids]
        assert chunks[-1].usage.completion_tokens == sum(len(c.token_ids) for c in chunks) == 64
        wait_for(lambda: health(client) == health_pb2.HealthCheckResponse.SERVING, what="SERVING again")
        assert client.generate("def f(x):", max_new_tokens=4).usage.completion_tokens == 4
        assert client.stats().engine_restarts == 1
    # the restarted engine kept the first start's row limit instead of timing it again (seconds)
    assert fragile_server.log().count(ROW_LIMIT_TIMED) == num_timed


def test_sigterm_drains_running_requests_then_exits(fragile_server: RunningServer) -> None:
    with Client(fragile_server.target) as client:
        watch = client.health.Watch(health_pb2.HealthCheckRequest(service=GENERATION_SERVICE), timeout=120)
        assert next(watch).status == health_pb2.HealthCheckResponse.SERVING
        stream = client.generate_stream(messages=POEM, max_new_tokens=120)
        chunks, arrived_s = [next(stream)], [time.monotonic()]

        def read_the_rest() -> None:
            for chunk in stream:
                chunks.append(chunk)
                arrived_s.append(time.monotonic())

        reader = threading.Thread(target=read_the_rest)
        reader.start()
        fragile_server.process.send_signal(signal.SIGTERM)
        # a watching client hears NOT_SERVING, and the listener closes, while the stream goes on
        assert next(watch).status == health_pb2.HealthCheckResponse.NOT_SERVING
        wait_for(lambda: not port_is_open(fragile_server.port), what="the listener closed")
        closed_s = time.monotonic()
        # A client on a connection of its own is refused. (gRPC shares connections between a
        # process's channels by default, and a call on the open one, which the server has sent
        # GOAWAY, came back CANCELLED, not UNAVAILABLE, in 2 of 5 full suites.)
        own_connection = [("grpc.use_local_subchannel_pool", 1)]
        with (
            Client(fragile_server.target, options=own_connection) as late_client,
            pytest.raises(grpc.RpcError) as excinfo,
        ):
            late_client.generate("def f(x):", max_new_tokens=4)
        assert excinfo.value.code() == grpc.StatusCode.UNAVAILABLE
        reader.join(120)
    assert arrived_s[-1] > closed_s  # its last tokens came after the listener had closed
    assert chunks[-1].finish_reason in (pb.LENGTH, pb.EOS)
    assert sum(len(c.token_ids) for c in chunks) == chunks[-1].usage.completion_tokens
    assert fragile_server.process.wait(60) == 0


def test_a_port_taken_before_the_server_binds_it_is_replaced_by_another(
    smollm2_path: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """free_port's port is free when picked, but another process can take it before the server
    binds it (CI saw it): start_server starts again on other ports."""
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        taken_port = int(taken.getsockname()[1])
        picks = iter([taken_port])
        monkeypatch.setattr(server_process, "free_port", lambda: next(picks, None) or pick_free_port())
        running = start_server(tmp_path, "--max-running-requests", "1")
        try:
            assert running.port != taken_port
            with Client(running.target) as client:
                assert client.generate("def f(x):", max_new_tokens=2).usage.completion_tokens == 2
        finally:
            assert running.stop() == 0, running.log()
    assert len(list(tmp_path.glob("server-*.log"))) == 2  # the failed try's log is kept
