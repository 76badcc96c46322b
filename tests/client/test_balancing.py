"""Client-side load balancing over replicas, with stand-in servers (the real gRPC server on real
ports, a fake Generation service and the real health service): the round-robin spread, a replica
that stops serving, and the retry of calls a replica refused."""

from __future__ import annotations

import json
import threading
import time
from collections import Counter
from collections.abc import Iterator
from concurrent import futures
from dataclasses import dataclass, field

import grpc
import pytest
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from api.pb import generation_pb2 as pb
from api.pb import generation_pb2_grpc as pb_grpc
from client.balancing import GENERATION_SERVICE, MAX_ATTEMPTS, channel_options, channel_target, service_config
from client.client import AsyncClient, Client
from tests.e2e.conftest import wait_for


@dataclass
class Replica(pb_grpc.GenerationServicer):
    name: str
    refuse: grpc.StatusCode | None = None  # answer every call with this, before any output
    calls: Counter[str] = field(default_factory=Counter)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def Generate(self, request: pb.GenerateRequest, context: grpc.ServicerContext) -> pb.GenerateResponse:
        with self.lock:
            self.calls[request.prompt] += 1
        if self.refuse is not None:
            context.abort(self.refuse, f"{self.name} refuses")
        return pb.GenerateResponse(text=self.name)


@dataclass
class Running:
    replica: Replica
    health: health.HealthServicer
    server: grpc.Server
    port: int

    def set_serving(self, is_serving: bool) -> None:
        status = health_pb2.HealthCheckResponse.SERVING if is_serving else health_pb2.HealthCheckResponse.NOT_SERVING
        self.health.set(GENERATION_SERVICE, status)


@pytest.fixture
def replicas() -> Iterator[list[Running]]:
    running = []
    for i in range(3):
        server = grpc.server(futures.ThreadPoolExecutor(max_workers=4))
        replica, servicer = Replica(f"r{i}"), health.HealthServicer()
        pb_grpc.add_GenerationServicer_to_server(replica, server)  # type: ignore[no-untyped-call]
        health_pb2_grpc.add_HealthServicer_to_server(servicer, server)
        port = server.add_insecure_port("127.0.0.1:0")
        server.start()
        running.append(Running(replica, servicer, server, port))
        running[-1].set_serving(True)
    yield running
    for r in running:
        r.server.stop(grace=None)


def target_of(running: list[Running]) -> str:
    return ",".join(f"localhost:{r.port}" for r in running)


def served_by(client: Client, num_calls: int, prompt: str = "p") -> Counter[str]:
    return Counter(client.generate(prompt, max_new_tokens=1, timeout=10).text for _ in range(num_calls))


def test_a_list_of_replicas_is_balanced_round_robin(replicas: list[Running]) -> None:
    with Client(target_of(replicas)) as client:
        wait_for(lambda: len(served_by(client, 3)) == 3)  # every replica connected
        spread = served_by(client, 30)
    assert spread == {"r0": 10, "r1": 10, "r2": 10}


def test_a_replica_that_stops_serving_gets_no_new_calls_until_it_serves_again(replicas: list[Running]) -> None:
    with Client(target_of(replicas)) as client:
        wait_for(lambda: len(served_by(client, 3)) == 3)
        replicas[1].set_serving(False)  # as a draining or restarting server does
        wait_for(lambda: "r1" not in served_by(client, 6))
        assert set(served_by(client, 30)) == {"r0", "r2"}
        replicas[1].set_serving(True)
        wait_for(lambda: "r1" in served_by(client, 6))


@pytest.mark.parametrize("code", [grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.RESOURCE_EXHAUSTED])
def test_a_call_a_replica_refused_is_retried_on_another(replicas: list[Running], code: grpc.StatusCode) -> None:
    replicas[0].replica.refuse = code
    with Client(target_of(replicas)) as client:
        wait_for(lambda: len(served_by(client, 3)) == 2 and replicas[0].replica.calls["p"] > 0)
        assert set(served_by(client, 20, "q")) == {"r1", "r2"}  # none failed
    assert replicas[0].replica.calls["q"] > 0  # it was asked, refused, and the call went on


def test_retries_are_bounded_and_other_errors_are_not_retried(replicas: list[Running]) -> None:
    for r in replicas:
        r.replica.refuse = grpc.StatusCode.UNAVAILABLE
    replicas[2].replica.refuse = grpc.StatusCode.INVALID_ARGUMENT
    with Client(target_of(replicas[:2])) as client, pytest.raises(grpc.RpcError) as unavailable:
        client.generate("u", max_new_tokens=1, timeout=30)
    assert unavailable.value.code() == grpc.StatusCode.UNAVAILABLE
    assert sum(r.replica.calls["u"] for r in replicas[:2]) == MAX_ATTEMPTS
    with Client(f"localhost:{replicas[2].port}") as client, pytest.raises(grpc.RpcError) as invalid:
        client.generate("i", max_new_tokens=1, timeout=30)
    assert invalid.value.code() == grpc.StatusCode.INVALID_ARGUMENT and replicas[2].replica.calls["i"] == 1


def test_targets_and_service_config() -> None:
    assert channel_target("localhost:1,127.0.0.2:2") == "ipv4:127.0.0.1:1,127.0.0.2:2"
    assert channel_target("[::1]:5, [::2]:6") == "ipv6:[::1]:5,[::2]:6"
    for passed_through in ("dns:///goodspeed:50051", "host:50051", "ipv4:10.0.0.1:1,10.0.0.2:1"):
        assert channel_target(passed_through) == passed_through
    for bad, message in (
        ("127.0.0.1:1,[::1]:2", "mixes IPv4 and IPv6"),
        ("127.0.0.1:1,nohost", "'nohost' is not host:port"),
        ("127.0.0.1:1,h.invalid:3", "cannot resolve 'h.invalid'"),
    ):
        with pytest.raises(ValueError, match=message):
            channel_target(bad)
    single, several = service_config(False), service_config(True)
    assert "loadBalancingConfig" not in single and several["loadBalancingConfig"] == [{"round_robin": {}}]
    assert several["healthCheckConfig"] == {"serviceName": GENERATION_SERVICE}
    retry = several["methodConfig"][0]["retryPolicy"]
    assert retry["retryableStatusCodes"] == ["UNAVAILABLE", "RESOURCE_EXHAUSTED"]
    assert json.loads(dict(channel_options("a:1,b:2"))["grpc.service_config"]) == several


async def test_the_async_client_balances_and_retries_alike(replicas: list[Running]) -> None:
    replicas[2].replica.refuse = grpc.StatusCode.UNAVAILABLE
    async with AsyncClient(target_of(replicas)) as client:

        async def served(num_calls: int) -> Counter[str]:
            return Counter([(await client.generate("a", max_new_tokens=1, timeout=10)).text for _ in range(num_calls)])

        deadline = time.monotonic() + 10
        while len(await served(3)) < 2 or replicas[2].replica.calls["a"] == 0:
            assert time.monotonic() < deadline, "the replicas never all connected"
        spread = await served(20)  # r2 refused its share; each of those calls went on to another
        assert set(spread) == {"r0", "r1"} and abs(spread["r0"] - spread["r1"]) <= 2
