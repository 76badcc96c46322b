"""Most of a minute of load while the engine is SIGKILLed at random moments: idle, mid-stream, mid-restart.

The server must never exit, every request must end with a status within its deadline (none
hangs), and requests that wait while the engine restarts keep their place and complete.
"""

from __future__ import annotations

import os
import random
import signal
import threading
import time
from collections import Counter
from collections.abc import Iterator

import grpc
import pytest
from grpc_health.v1 import health_pb2

from client.client import Client, build_request
from tests.e2e.conftest import RunningServer, engine_pids, health, serving, wait_for

pytestmark = [pytest.mark.model, pytest.mark.slow]

CHAOS_S = 45.0
NUM_CLIENTS = 4
DEADLINE_S = 120.0  # far beyond a restart: a request still open then has hung
PROMPTS = ["def fibonacci(n):", "Write a poem about rivers.", "class Stack:", "import numpy as np\n"]


@pytest.fixture(scope="module")
def chaotic(smollm2_path: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningServer]:
    yield from serving(
        tmp_path_factory, "chaos", "--max-engine-restarts 1000 --max-running-requests 8 --max-step-tokens 64"
    )


class Load:
    """Client threads sending streams and unary calls until stopped, recording each call's end."""

    def __init__(self, target: str, seed: int) -> None:
        self.target = target
        self.random = random.Random(seed)
        self.is_paused = threading.Event()
        self.is_stopped = threading.Event()
        self.codes: Counter[str] = Counter()
        self.num_in_flight = 0
        self.lock = threading.Lock()
        self.threads = [threading.Thread(target=self._run, args=(i,)) for i in range(NUM_CLIENTS)]

    def __enter__(self) -> Load:
        for thread in self.threads:
            thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.is_stopped.set()
        for thread in self.threads:
            thread.join(DEADLINE_S + 30)
        assert not any(t.is_alive() for t in self.threads), "a request hung"

    def _run(self, index: int) -> None:
        rng = random.Random(self.random.random())
        with Client(self.target) as client:
            while not self.is_stopped.is_set():
                if self.is_paused.is_set():
                    time.sleep(0.05)
                    continue
                with self.lock:
                    self.num_in_flight += 1
                code = self._call(client, rng)
                with self.lock:
                    self.num_in_flight -= 1
                    self.codes[code] += 1

    def _call(self, client: Client, rng: random.Random) -> str:
        prompt, max_new_tokens = rng.choice(PROMPTS), rng.randint(4, 64)
        try:
            if rng.random() < 0.5:
                chunks = list(client.generate_stream(prompt, max_new_tokens=max_new_tokens, timeout=DEADLINE_S))
                assert chunks[-1].finish_reason
            else:
                client.generate(prompt, max_new_tokens=max_new_tokens, timeout=DEADLINE_S)
        except grpc.RpcError as exc:
            return str(exc.code().name)
        return "OK"


def kill_engine(server: RunningServer) -> int:
    pids = engine_pids(server)
    for pid in pids:
        os.kill(pid, signal.SIGKILL)
    return len(pids)


def test_random_engine_kills_under_load_never_take_the_server_down(chaotic: RunningServer) -> None:
    rng = random.Random(16)
    kinds: Counter[str] = Counter()
    with Client(chaotic.target) as client, Load(chaotic.target, seed=16) as load:
        ends = time.monotonic() + CHAOS_S
        while time.monotonic() < ends:
            time.sleep(rng.uniform(1.0, 4.0))
            kind = rng.choice(["idle", "mid-stream", "mid-restart"])
            if kind == "idle":
                load.is_paused.set()
                wait_for(lambda: load.num_in_flight == 0, timeout=DEADLINE_S, what="the load to pause")
                kinds[kind] += kill_engine(chaotic)
                time.sleep(rng.uniform(0.2, 1.5))
                load.is_paused.clear()
            elif kind == "mid-stream":
                kinds[kind] += kill_engine(chaotic)
            else:
                before = set(engine_pids(chaotic))
                kill_engine(chaotic)
                wait_for(lambda: set(engine_pids(chaotic)) - before, timeout=60, what="a new engine")  # noqa: B023
                time.sleep(rng.uniform(0.0, 1.5))
                kinds[kind] += kill_engine(chaotic)
            assert chaotic.process.poll() is None, chaotic.log()
        # Requests that arrive while the engine restarts wait for it, in their place.
        load.is_paused.set()
        wait_for(lambda: health(client) == health_pb2.HealthCheckResponse.SERVING, timeout=300, what="SERVING")
        kill_engine(chaotic)
        wait_for(lambda: health(client) == health_pb2.HealthCheckResponse.NOT_SERVING, timeout=10, what="noticed")
        waiting = [client.stub.Generate.future(build_request(p, max_new_tokens=6), timeout=DEADLINE_S) for p in PROMPTS]
        assert all(0 < f.result().usage.completion_tokens <= 6 for f in waiting)
    assert chaotic.process.poll() is None
    print(f"kills: {dict(kinds)}; outcomes: {dict(load.codes)}")
    assert set(load.codes) <= {"OK", "UNAVAILABLE"}, load.codes
    # About 12 kills of each kind mixed and 30 requests served here; loose bounds for slower machines.
    assert load.codes["OK"] > 10 and sum(kinds.values()) >= 6 and len(kinds) == 3
    with Client(chaotic.target) as client:
        wait_for(lambda: health(client) == health_pb2.HealthCheckResponse.SERVING, timeout=300, what="SERVING")
        stats = client.stats()
        assert stats.requests_running == stats.requests_waiting == stats.kv_tokens_used == 0
        # Kills during a restart join that restart's episode, so there are fewer restarts than kills.
        assert stats.engine_state == "running" and stats.engine_restarts >= 3
