"""Three replicas of the real server (the default model) behind our client's round-robin over a
list of addresses, or behind nginx (deploy/nginx-grpc.conf) when it is installed: a load of
streaming requests while one replica is drained by SIGTERM and another's engine is killed.
Where requests went, and which failed."""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import signal
import subprocess
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2

from bench.balancing import PROMPTS, num_admitted
from bench.server_process import free_port
from client.client import Client
from tests.e2e.conftest import RunningServer, engine_pid, health, port_is_open, start_server, wait_for

pytestmark = [pytest.mark.model, pytest.mark.slow]

# one thread each: three replicas share the machine's cores
# JSON logs: the drained replica's log tells when each of its requests was admitted
FLAGS = "--threads 1 --kv-cache-tokens 4096 --max-running-requests 4 --drain-grace 60 --log-format json"
NUM_REQUESTS = 36
NUM_CONCURRENT = 12
# A stream sent to the drained replica itself, so that its drain has a running call to finish
# after its listener has closed.
PINNED_TOKENS = 160
# a call admitted after the signal can only be one that raced it (accepted as the listener closed)
SIGNAL_RACE_S = 0.5
ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture
def replicas(route: str, smollm2_path: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[list[RunningServer]]:
    if route == "nginx":
        nginx_binary()  # skips before three servers start for nothing
    with ThreadPoolExecutor(3) as pool:
        running = list(
            pool.map(lambda i: start_server(tmp_path_factory.mktemp(f"replica{i}"), *FLAGS.split()), range(3))
        )
    yield running
    for r in running:
        r.stop()


@contextlib.contextmanager
def nginx_in_front(replicas: list[RunningServer], work_dir: Path) -> Iterator[str]:
    """nginx with deploy/nginx-grpc.conf, its upstream pointed at the replicas; yields its address."""
    binary = nginx_binary()
    shipped = (ROOT / "deploy" / "nginx-grpc.conf").read_text()
    options = re.search(r"server goodspeed-1:50051 (.*);", shipped)
    assert options is not None
    upstream = "\n".join(f"        server {r.target} {options.group(1)};" for r in replicas)
    port = free_port()
    config = re.sub(r"(        server goodspeed-\d+:50051 .*;\n)+", upstream + "\n", shipped)
    config = config.replace("listen 50051 http2;", f"listen 127.0.0.1:{port} http2;")
    (work_dir / "logs").mkdir(parents=True, exist_ok=True)
    (work_dir / "nginx.conf").write_text(config)
    flags = ["-p", str(work_dir), "-c", str(work_dir / "nginx.conf"), "-e", str(work_dir / "logs" / "error.log")]
    process = subprocess.Popen([binary, *flags, "-g", f"daemon off; pid {work_dir / 'nginx.pid'};"])
    try:
        wait_for(lambda: port_is_open(port), timeout=30, what="nginx listening")
        yield f"127.0.0.1:{port}"
    finally:
        process.terminate()
        process.wait(30)


def nginx_binary() -> str:
    binary = shutil.which("nginx") or "/usr/sbin/nginx"
    if not Path(binary).exists():
        pytest.skip("nginx is not installed (apt-get install nginx-light)")
    return binary


@dataclass
class Outcome:
    num_tokens: int = 0
    error: grpc.StatusCode | None = None


def stream(client: Client, i: int, max_new_tokens: int = 24) -> Outcome:
    outcome = Outcome()
    try:
        for chunk in client.generate_stream(PROMPTS[i % len(PROMPTS)], max_new_tokens=max_new_tokens, timeout=300):
            outcome.num_tokens += len(chunk.token_ids)
    except grpc.RpcError as exc:
        outcome.error = exc.code()
    return outcome


@dataclass
class LoadRun:
    outcomes: list[Outcome]
    pinned: Outcome  # the long stream sent to the drained replica
    admitted_before: list[int]  # per replica, before the load
    admitted_after: list[int]  # by the other two, after the load


@dataclass
class DrainLog:
    """What a drained replica's JSON log says: when the signal came, and when each request it
    finished had been admitted (its log time less its total_s)."""

    signal_s: float
    admitted_s: list[float]

    @classmethod
    def read(cls, text: str) -> DrainLog:
        events = [json.loads(line) for line in text.splitlines() if line.startswith("{")]
        timed = [(e, datetime.fromisoformat(e["timestamp"]).timestamp()) for e in events]
        (signal_s,) = [t for e, t in timed if e["event"].startswith("signal received")]
        return cls(signal_s, [t - e["total_s"] for e, t in timed if e["event"] == "request finished"])

    @property
    def num_admitted_after_signal(self) -> int:
        return sum(t > self.signal_s + SIGNAL_RACE_S for t in self.admitted_s)


@pytest.mark.parametrize("route", ["client round-robin", "nginx"])
def test_a_drain_and_an_engine_kill_under_load(replicas: list[RunningServer], route: str, tmp_path: Path) -> None:
    drained, killed, _ = replicas
    with contextlib.ExitStack() as stack:
        if route == "nginx":
            target = stack.enter_context(nginx_in_front(replicas, tmp_path / "nginx"))
        else:
            target = ",".join(r.target for r in replicas)
        run = drain_and_kill_under_load(replicas, target)
    assert drained.process.wait(120) == 0, drained.log()  # its drain finished what it had
    with Client(killed.target) as direct:
        wait_for(lambda: health(direct) == health_pb2.HealthCheckResponse.SERVING, timeout=300, what="restarted")
        assert direct.stats().engine_restarts == 1
    # nothing failed: the drained replica finished what it had, the killed engine's replica
    # resumed its streams on its next engine, and calls refused meanwhile went elsewhere
    assert [o.error for o in run.outcomes] == [None] * NUM_REQUESTS
    assert [o.num_tokens for o in run.outcomes] == [24] * NUM_REQUESTS
    assert (run.pinned.error, run.pinned.num_tokens) == (None, PINNED_TOKENS)
    # no new request reached the drained replica after the signal: its listener had closed
    drain_log = DrainLog.read(drained.log())
    assert drain_log.num_admitted_after_signal == 0
    served = [len(drain_log.admitted_s) - run.admitted_before[0]]
    served += [after - before for after, before in zip(run.admitted_after, run.admitted_before[1:], strict=True)]
    print(f"\nserved: drained {served[0]}, engine killed {served[1]}, steady {served[2]}")
    assert all(n > 0 for n in served)  # the load reached every replica


def drain_and_kill_under_load(replicas: list[RunningServer], target: str) -> LoadRun:
    """The load through target, and a long stream sent to the first replica itself; SIGTERM to the
    first replica after 6 requests finish, SIGKILL to the second's engine at half. Returns once
    every request has ended."""
    drained, killed, steady = replicas
    before = [num_admitted(r.target) for r in replicas]
    with (
        Client(target) as client,
        Client(drained.target) as pinned_client,
        ThreadPoolExecutor(NUM_CONCURRENT + 1) as pool,
    ):
        pinned = pool.submit(stream, pinned_client, 0, PINNED_TOKENS)
        wait_for(lambda: pinned_client.stats().requests_running == 1, what="the pinned stream running")
        futures = [pool.submit(stream, client, i) for i in range(NUM_REQUESTS)]

        def num_done() -> int:
            return sum(f.done() for f in futures)

        wait_for(lambda: num_done() >= 6, timeout=300, what="the first requests")
        drained.process.send_signal(signal.SIGTERM)
        wait_for(lambda: num_done() >= NUM_REQUESTS // 2, timeout=300, what="half of the requests")
        os.kill(engine_pid(killed), signal.SIGKILL)
        outcomes = [f.result(timeout=600) for f in futures]
    return LoadRun(outcomes, pinned.result(timeout=600), before, [num_admitted(r.target) for r in (killed, steady)])
