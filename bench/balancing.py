"""Replicas behind the client's round-robin (`goodspeed bench balancing`): the latency the
balancing channel adds to a call, how requests spread over replicas, and throughput through one
replica against several (on one machine the replicas share its cores: not a scaling figure)."""

from __future__ import annotations

import json
import statistics
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from bench.machine import machine_facts
from bench.server_process import start_server
from client.client import Client

PROMPTS = ["def fibonacci(n):", "class Stack:\n    def push(self, item):", "def parse_csv(path):"]


def call_latencies_us(client: Client, num_calls: int) -> list[float]:
    """ModelInfo round trips: the smallest call, so the channel's own cost shows."""
    seconds = []
    for _ in range(num_calls):
        started = time.perf_counter()
        client.model_info()
        seconds.append((time.perf_counter() - started) * 1e6)
    return seconds


def added_latency(target: str, num_calls: int, num_rounds: int) -> dict[str, Any]:
    """One replica through a direct channel (pick_first) and through the balancing one
    (round_robin with health checking, the `ipv4:` form), interleaved round by round."""
    samples: dict[str, list[float]] = {"direct": [], "balanced": []}
    with Client(target) as direct, Client(f"ipv4:{target}") as balanced:
        for client in (direct, balanced):
            client.wait_ready()
            call_latencies_us(client, 50)  # connections up, caches warm
        for _ in range(num_rounds):
            samples["direct"] += call_latencies_us(direct, num_calls)
            samples["balanced"] += call_latencies_us(balanced, num_calls)
    means = {name: statistics.fmean(s) for name, s in samples.items()}
    return {
        **{
            name: {"mean_us": round(means[name], 1), "p50_us": round(statistics.median(s), 1)}
            for name, s in samples.items()
        },
        "added_mean_us": round(means["balanced"] - means["direct"], 1),
        "calls": num_calls * num_rounds,
    }


def num_admitted(target: str) -> int:
    with Client(target) as client:
        stats = client.stats()
    return int(stats.requests_finished + stats.requests_running + stats.requests_waiting)


def throughput(target: str, num_requests: int, max_new_tokens: int) -> float:
    """num_requests streams at once, greedy; generated tokens per second."""

    def one(i: int) -> int:
        chunks = client.generate_stream(PROMPTS[i % len(PROMPTS)], max_new_tokens=max_new_tokens, timeout=600)
        return sum(len(chunk.token_ids) for chunk in chunks)

    with Client(target) as client, ThreadPoolExecutor(num_requests) as pool:
        client.wait_ready()
        time.sleep(1.0)  # every replica connected and health-checked, so round-robin spans them all
        started = time.perf_counter()
        num_tokens = sum(pool.map(one, range(num_requests)))
        return num_tokens / (time.perf_counter() - started)


def main(num_replicas: int, num_requests: int, max_new_tokens: int, out: Path) -> int:
    started = [start_server(out.parent / "logs", "--threads", "1") for _ in range(num_replicas)]
    try:
        targets = [s.target for s in started]
        report = measure(targets, num_requests, max_new_tokens)
    finally:
        for server in started:
            server.stop()
    report["machine"] = machine_facts()
    print_report(report)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2) + "\n")
    print(f"\nwrote {out}")
    return 0


def measure(targets: list[str], num_requests: int, max_new_tokens: int) -> dict[str, Any]:
    latency = added_latency(targets[0], num_calls=200, num_rounds=5)
    before = [num_admitted(t) for t in targets]
    balanced = ",".join(targets)
    rates = {"one replica": throughput(targets[0], num_requests, max_new_tokens)}
    after_one = [num_admitted(t) for t in targets]
    rates[f"{len(targets)} replicas"] = throughput(balanced, num_requests, max_new_tokens)
    spread = [num_admitted(t) - n for t, n in zip(targets, after_one, strict=True)]
    return {
        "replicas": len(targets),
        "threads_per_replica": 1,
        "added_latency": latency,
        "tokens_per_s": {name: round(rate, 1) for name, rate in rates.items()},
        "requests_per_replica": spread,
        "requests_through_one": after_one[0] - before[0],
    }


def print_report(report: dict[str, Any]) -> None:
    latency = report["added_latency"]
    print(f"\nclient-side balancing, {report['machine']['cpu_model']}, {report['replicas']} replicas of 1 thread each")
    print(
        f"ModelInfo round trip over {latency['calls']} calls each: direct {latency['direct']['mean_us']} us "
        f"(p50 {latency['direct']['p50_us']}), balanced {latency['balanced']['mean_us']} us "
        f"(p50 {latency['balanced']['p50_us']}): {latency['added_mean_us']:+.1f} us per call"
    )
    for name, rate in report["tokens_per_s"].items():
        print(f"{name:14} {rate:8.1f} tok/s")
    print(f"requests per replica through the list: {report['requests_per_replica']}")
