"""`goodspeed bench hardening`: what one request or one client costs everyone else.

1. Stall: a running stream and a health check every 50 ms, while huge prompts arrive (the 16 MB
   prompt of the hardening issue, three at once, the same text to Tokenize, and three of the
   largest prompt the server still tokenizes). Per phase: the worst health-check latency and the
   worst gap between the stream's chunks, next to the worst gap of a calm phase before.
2. Starvation: one client opens many unread streams of 4,096 tokens; then another client sends
   4-token requests (30 s deadline) one after another, and one that cannot start in time.
Runs against a server it starts (README's defaults) or `--target`, so an older build can be
measured the same way. Prints a table and writes JSON.
"""

from __future__ import annotations

import bisect
import itertools
import json
import statistics
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
from grpc_health.v1 import health_pb2

from api.metadata import CLIENT_ID_HEADER
from bench.machine import machine_facts
from bench.server_process import start_server
from client.client import Client, build_request

COMBINING = "e\u0301\u0302\u0303\u0304"  # 9 bytes of UTF-8, 9 tokens of the default model
HUGE_PROMPT = COMBINING * 1_777_777  # 16 MB, the issue's
POEM = [("user", "Write a long poem about the sea.")]


class Heartbeat:
    """A health check every 50 ms and a running stream's chunk arrivals, each on a thread of its own.

    When the stream ends (the model may end its poem) another starts at once; the gap across
    the two counts too (it holds one more prefill step), or a stall at the switch would hide.
    """

    def __init__(self, client: Client, max_new_tokens: int = 2000) -> None:
        self.client = client
        self.max_new_tokens = max_new_tokens
        self.health_s: list[tuple[float, float]] = []  # (sent at, took)
        self.chunk_at: list[tuple[int, float]] = []  # (which stream, arrived at)
        self.is_done = threading.Event()
        self.stream: grpc.Future | None = None
        self.threads = [threading.Thread(target=self._health), threading.Thread(target=self._chunks)]

    def __enter__(self) -> Heartbeat:
        for thread in self.threads:
            thread.start()
        deadline = time.monotonic() + 120
        while len(self.chunk_at) < 20 and time.monotonic() < deadline:
            time.sleep(0.05)
        return self

    def __exit__(self, *exc: object) -> None:
        self.is_done.set()
        if self.stream is not None:
            self.stream.cancel()
        for thread in self.threads:
            thread.join(60)

    def _health(self) -> None:
        while not self.is_done.wait(0.05):
            sent = time.monotonic()
            try:
                self.client.health.Check(health_pb2.HealthCheckRequest(), timeout=120)
            except grpc.RpcError:
                continue
            self.health_s.append((sent, time.monotonic() - sent))

    def _chunks(self) -> None:
        for index in itertools.count():
            if self.is_done.is_set():
                return
            self.stream = self.client.stub.GenerateStream(
                build_request(messages=POEM, max_new_tokens=self.max_new_tokens)
            )
            try:
                for _ in self.stream:
                    self.chunk_at.append((index, time.monotonic()))
            except grpc.RpcError:
                pass

    def worst_health_s(self, since: float, until: float) -> float:
        return max((took for sent, took in self.health_s if since <= sent <= until), default=0.0)

    def gaps_s(self, since: float, until: float) -> list[float]:
        """Gaps between the chunks that arrived from `since` to `until`, and the one before them."""
        times = [t for _, t in self.chunk_at]
        first = max(0, bisect.bisect_left(times, since) - 1)
        arrivals = [t for t in times[first:] if t <= until]
        return [b - a for a, b in itertools.pairwise(arrivals)]


@dataclass
class Phase:
    name: str
    outcomes: list[str] = field(default_factory=list)
    seconds: float = 0.0
    worst_health_s: float = 0.0
    worst_gap_s: float = 0.0
    median_gap_s: float = 0.0


def code_of(call: Callable[[], object]) -> str:
    try:
        call()
    except grpc.RpcError as exc:
        return f"{exc.code().name}: {(exc.details() or '')[:90]}"
    return "OK"


def run_phase(beat: Heartbeat, name: str, calls: list[Callable[[], object]]) -> Phase:
    phase = Phase(name)
    started = time.monotonic()
    threads = [threading.Thread(target=lambda c=c: phase.outcomes.append(code_of(c))) for c in calls]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(600)
    phase.seconds = time.monotonic() - started
    time.sleep(0.5)  # the stream's next chunks show whether it was held up
    ended = time.monotonic()
    gaps = beat.gaps_s(started, ended) or [0.0]
    phase.worst_health_s, phase.worst_gap_s = beat.worst_health_s(started, ended), max(gaps)
    phase.median_gap_s = statistics.median(gaps)
    return phase


def measure_stall(client: Client) -> list[Phase]:
    info = client.model_info()
    # The largest prompt the server still tokenizes (ModelInfo says it; older servers do not).
    largest = COMBINING * ((info.max_prompt_bytes or 630_000) // len(COMBINING.encode()))
    with Heartbeat(client) as beat:
        phases = [run_phase(beat, "calm (3 s)", [lambda: time.sleep(3.0)])]
        huge = lambda: client.generate(HUGE_PROMPT, max_new_tokens=1, timeout=300)  # noqa: E731
        phases.append(run_phase(beat, "16 MB prompt", [huge]))
        phases.append(run_phase(beat, "16 MB prompt x3 at once", [huge] * 3))
        phases.append(run_phase(beat, "16 MB text to Tokenize", [lambda: client.tokenize(HUGE_PROMPT)]))
        large = lambda: client.generate(largest, max_new_tokens=1, timeout=300)  # noqa: E731
        size = f"{len(largest.encode()) // 1000} KB"
        phases.append(run_phase(beat, f"{size} prompt x3 at once", [large] * 3))
        phases.append(run_phase(beat, f"{size} text to Tokenize", [lambda: client.tokenize(largest)]))
        phases.append(run_phase(beat, "calm again (3 s)", [lambda: time.sleep(3.0)]))
    return phases


@dataclass
class Starvation:
    num_hog_streams: int
    num_hog_refused: int = 0
    hog_refusal: str = ""
    small_latencies_s: list[float] = field(default_factory=list)
    small_outcomes: list[str] = field(default_factory=list)
    late_outcome: str = ""
    late_latency_s: float = 0.0
    stats_while_held: dict[str, int] = field(default_factory=dict)


def measure_starvation(client: Client, num_hog_streams: int, num_small: int = 5) -> Starvation:
    result = Starvation(num_hog_streams)
    hog = ((CLIENT_ID_HEADER, "hog"),)
    request = build_request("Once upon a time", max_new_tokens=4096)
    streams = [client.stub.GenerateStream(request, metadata=hog) for _ in range(num_hog_streams)]
    settled, last = 0, -1
    while settled < 10:  # until the count of refused streams has stood still for a second
        time.sleep(0.1)
        done = sum(call.done() for call in streams)
        settled, last = (settled + 1, last) if done == last else (0, done)
    refused = [call for call in streams if call.done()]
    result.num_hog_refused = len(refused)
    result.hog_refusal = f"{refused[0].code().name}: {refused[0].details()}" if refused else ""
    stats = client.stats()
    result.stats_while_held = {
        "running": stats.requests_running,
        "waiting": stats.requests_waiting,
        "kv_tokens_used": stats.kv_tokens_used,
    }
    victim = ((CLIENT_ID_HEADER, "victim"),)
    for _ in range(num_small):
        started = time.monotonic()
        outcome = code_of(
            lambda: client.stub.Generate(build_request("def add(a, b):", max_new_tokens=4), timeout=30, metadata=victim)
        )
        result.small_latencies_s.append(time.monotonic() - started)
        result.small_outcomes.append(outcome)
    started = time.monotonic()
    result.late_outcome = code_of(
        lambda: client.stub.Generate(build_request("def big(x):", max_new_tokens=4096), timeout=5, metadata=victim)
    )
    result.late_latency_s = time.monotonic() - started
    for call in streams:
        call.cancel()
    return result


def print_report(facts: dict[str, Any], phases: list[Phase], starvation: Starvation) -> None:
    print(f"\n{facts['cpu_model']} ({facts['num_cpus']} CPUs), {facts['platform']}")
    calm = phases[0].worst_gap_s
    print(f"\n{'phase':34} {'took s':>7} {'health worst s':>15} {'gap worst s':>12} {'extra s':>8} {'gap p50 s':>10}")
    for phase in phases:
        extra = max(0.0, phase.worst_gap_s - calm)
        print(
            f"{phase.name:34} {phase.seconds:7.2f} {phase.worst_health_s:15.3f} {phase.worst_gap_s:12.3f} "
            f"{extra:8.3f} {phase.median_gap_s:10.3f}"
        )
        for outcome in sorted(set(phase.outcomes)):
            if outcome != "OK" or len(phase.outcomes) > 1:
                print(f"    {phase.outcomes.count(outcome)} x {outcome}")
    s = starvation
    print(f"\none client with {s.num_hog_streams} unread streams of 4096 tokens: {s.num_hog_refused} refused")
    print(f"    {s.hog_refusal[:150]}")
    print(f"    while held: {s.stats_while_held}")
    latencies = ", ".join(f"{t:.2f}" for t in s.small_latencies_s)
    print(f"another client's 4-token requests: {latencies} s; {sorted(set(s.small_outcomes))}")
    print(f"a 4096-token request with a 5 s deadline: {s.late_latency_s:.2f} s, {s.late_outcome[:150]}")


def main(target: str | None, num_hog_streams: int, out: Path) -> int:
    server = None
    if target is None:
        server = start_server(out.parent / "logs")
        target = server.target
    try:
        with Client(target) as client:
            phases = measure_stall(client)
            starvation = measure_starvation(client, num_hog_streams)
    finally:
        if server is not None:
            server.stop()
    facts = machine_facts()
    print_report(facts, phases, starvation)
    out.parent.mkdir(parents=True, exist_ok=True)
    report = {"machine": facts, "target": target, "phases": [vars(p) for p in phases], "starvation": vars(starvation)}
    out.write_text(json.dumps(report, indent=2) + "\n")
    print(f"\nwrote {out}")
    return 0
