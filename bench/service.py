"""`goodspeed bench service`: control-plane overhead and reliability of a running server.

1. Overhead: N concurrent greedy streams, with speculation off and with the goodput policy (whose
   choice of k every step is control-plane work too). The engine reports, per step, how long it waited for the
   plan after sending its previous result; when the control loop had work the whole time, that
   wait is control plane + IPC. The server also measures, per chunk, the time from the end of the
   engine step that made it to the handler handing it to gRPC. Both come from GetStats (means over
   the last 200 steps and chunks), read right after the streams finish. Each chunk's step-end
   time also comes back in the stream's trailers, so this client times, on the same clock, when
   the chunk's last byte left the server (a loopback packet capture, `bench/wire.py`; root only)
   and when it read the chunk itself.
2. Reliability: many requests at a fixed concurrency, a share of them cancelled at a random point;
   every request must end (finished or cancelled, never hung) and the server must end idle with
   its KV budget fully released.
"""

from __future__ import annotations

import contextlib
import json
import random
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import anyio
import grpc

from api.metadata import STEP_END_TRAILER, STEP_TIMING_HEADER
from api.pb import generation_pb2 as pb
from bench import wire
from bench.load import mean, percentile
from bench.server_process import start_server
from bench.workloads import completion_workload
from client.client import AsyncClient, build_request


@dataclass
class ReliabilityCounts:
    finished: int = 0
    cancelled: int = 0
    failed: list[str] = field(default_factory=list)
    hung: int = 0


NEW_CONNECTION = (("grpc.use_local_subchannel_pool", 1),)


@dataclass(frozen=True, slots=True)
class ServiceBench:
    """What `goodspeed bench service` runs."""

    streams: list[int]  # concurrent streams to time, one setting each
    runs: int  # timed runs per setting
    max_new_tokens: int
    requests: int  # reliability: requests in all,
    concurrency: int  # ... at most this many at once,
    cancel_share: float  # ... this share of them cancelled by the client

    def settings(self) -> list[tuple[int, str]]:
        """(streams, speculation) for every timed setting."""
        return [(n, speculation) for n in self.streams for speculation in ("off", "auto")]


def delay_summary_ms(delays_ms: list[float]) -> dict[str, float]:
    return {
        "mean": round(mean(delays_ms), 3),
        "p50": round(percentile(delays_ms, 50), 3),
        "p99": round(percentile(delays_ms, 99), 3),
    }


def on_this_host(target: str) -> bool:
    return target.rsplit(":", 1)[0] == "127.0.0.1"  # the capture reads IPv4 on the loopback device


async def overhead(
    target: str, client: AsyncClient, num_streams: int, max_new_tokens: int, speculation: str, is_wire_timed: bool
) -> dict[str, Any]:
    prompts = [item.prompt or "" for item in completion_workload(num_streams)]
    tokens = 0
    step_end_ns: dict[str, list[int]] = {}  # per request id, one entry per chunk
    arrived_ns: dict[str, list[int]] = {}

    async def stream(streams_client: AsyncClient, request_id: str, prompt: str) -> None:
        nonlocal tokens
        request = build_request(prompt, max_new_tokens=max_new_tokens, speculation=speculation, request_id=request_id)
        call = streams_client.stub.GenerateStream(request, metadata=((STEP_TIMING_HEADER, "1"),))
        arrived = arrived_ns.setdefault(request_id, [])
        async for chunk in call:
            arrived.append(time.monotonic_ns())
            tokens += len(chunk.token_ids)
        trailers = dict(await call.trailing_metadata())
        step_end_ns[request_id] = [int(ns) for ns in str(trailers[STEP_END_TRAILER]).split(",")]

    # The capture starts before the streams' connection opens, so it reads that connection from
    # its first frame (a channel of its own: by default gRPC would reuse this process's
    # connection). Starting and ending the capture blocks for a moment; nothing else runs then.
    port = int(target.rsplit(":", 1)[1])
    with wire.capture(port) if is_wire_timed else contextlib.nullcontext() as captured:
        async with AsyncClient(target, options=NEW_CONNECTION) as streams_client:
            started = time.perf_counter()
            async with anyio.create_task_group() as tg:
                for i, prompt in enumerate(prompts):
                    tg.start_soon(stream, streams_client, f"bench-{speculation}-{i}", prompt)
            seconds = time.perf_counter() - started
    stats = await client.stats()
    # Both clocks are this host's CLOCK_MONOTONIC; a 0 step end marks a chunk from no step (a cancel).
    arrival_delays_ms = [
        (arrived - end) / 1e6
        for request_id, ends in step_end_ns.items()
        for arrived, end in zip(arrived_ns[request_id], ends, strict=True)
        if end
    ]
    row = {
        "streams": num_streams,
        "speculation": speculation,
        "tokens": tokens,
        "tokens_per_s": round(tokens / seconds, 1),
        "mean_step_ms": round(stats.mean_step_s * 1000, 2),
        "overhead_percent_of_step": round(stats.mean_overhead_fraction * 100, 2),
        "step_end_to_chunk_handed_ms": round(stats.mean_chunk_handed_s * 1000, 3),
        "step_end_to_chunk_written_ms": round(stats.mean_chunk_written_s * 1000, 3),
        # When this client read the chunk: an upper bound on when it left the server.
        "step_end_to_chunk_arrived_ms": delay_summary_ms(arrival_delays_ms),
        "step_end_to_chunk_on_wire_ms": None,
    }
    on_wire = wire_delays_ms(captured, step_end_ns) if captured is not None else None
    if on_wire is not None:
        row["step_end_to_chunk_on_wire_ms"] = delay_summary_ms(on_wire)
    return row


def wire_delays_ms(captured: wire.Capture, step_end_ns: dict[str, list[int]]) -> list[float] | None:
    """Step end -> the packet with the chunk's last byte leaving, for every chunk of the streams;
    None (and a warning) if the capture missed some."""
    sent_ns: dict[str, list[int]] = {}
    for message in captured.messages():
        sent_ns.setdefault(pb.GenerateChunk.FromString(message.data).request_id, []).append(message.monotonic_ns)
    delays_ms = []
    for request_id, ends in step_end_ns.items():
        sent = sent_ns.get(request_id, [])
        if len(sent) != len(ends):
            print(f"warning: the capture saw {len(sent)} of {len(ends)} chunks of {request_id}; not timing this run")
            return None
        delays_ms += [(at - end) / 1e6 for at, end in zip(sent, ends, strict=True) if end]
    return delays_ms


async def reliability(
    client: AsyncClient, num_requests: int, concurrency: int, cancel_share: float, seed: int
) -> dict[str, Any]:
    rng = random.Random(seed)
    prompts = [item.prompt or "" for item in completion_workload(40)]
    counts = ReliabilityCounts()
    before = await client.stats()
    limiter = anyio.Semaphore(concurrency)

    async def one(i: int) -> None:
        cancel_after = rng.randint(0, 6) if rng.random() < cancel_share else None
        max_new = rng.choice([8, 16, 32, 64])
        async with limiter:
            with anyio.move_on_after(120) as timeout:
                received = 0
                try:
                    async for chunk in client.generate_stream(prompts[i % len(prompts)], max_new_tokens=max_new):
                        received += 1
                        if cancel_after is not None and received > cancel_after:
                            counts.cancelled += 1
                            return  # leaving the loop closes the call: the server sees a cancel
                        if chunk.finish_reason != pb.FINISH_REASON_UNSPECIFIED:
                            counts.finished += 1
                            return
                    counts.failed.append(f"request {i}: stream ended without a finish reason")
                except grpc.aio.AioRpcError as exc:
                    counts.failed.append(f"request {i}: {exc.code().name}: {exc.details()}")
            if timeout.cancelled_caught:
                counts.hung += 1

    started = time.perf_counter()
    async with anyio.create_task_group() as tg:
        for i in range(num_requests):
            tg.start_soon(one, i)
    seconds = time.perf_counter() - started
    with anyio.fail_after(30):
        while True:
            after = await client.stats()
            if after.requests_running == after.requests_waiting == 0:
                break
            await anyio.sleep(0.05)
    return {
        "requests": num_requests,
        "concurrency": concurrency,
        "finished": counts.finished,
        "cancelled_by_client": counts.cancelled,
        "failed": counts.failed,
        "hung": counts.hung,
        "server_finished_delta": after.requests_finished - before.requests_finished,
        "server_idle_after": after.requests_running == 0 and after.requests_waiting == 0,
        "kv_tokens_used_after": after.kv_tokens_used,
        "seconds": round(seconds, 1),
    }


def describe(row: dict[str, Any]) -> str:
    def delays(summary: dict[str, float]) -> str:
        return f"{summary['mean']:.3f} ms (p50 {summary['p50']:.3f}, p99 {summary['p99']:.3f})"

    on_wire = row["step_end_to_chunk_on_wire_ms"]
    return (
        f"{row['streams']} streams, {row['speculation']:4}: {row['tokens_per_s']:.1f} tok/s, "
        f"step {row['mean_step_ms']:.1f} ms, "
        f"control plane + IPC {row['overhead_percent_of_step']:.2f}% of the step; step end -> chunk "
        f"handed to gRPC {row['step_end_to_chunk_handed_ms']:.3f} ms, "
        + (f"on the wire {delays(on_wire)}, " if on_wire else "")
        + f"read by the client {delays(row['step_end_to_chunk_arrived_ms'])}"
    )


def across_runs(rows: list[dict[str, Any]]) -> str:
    """The runs' mean chunk delays, side by side."""
    parts = [f"overhead {mean([r['overhead_percent_of_step'] for r in rows]):.2f}%"]
    for key, name in (("step_end_to_chunk_on_wire_ms", "on the wire"), ("step_end_to_chunk_arrived_ms", "read")):
        if all(r[key] for r in rows):
            means = [r[key]["mean"] for r in rows]
            parts.append(f"{name} {mean(means):.3f} ms (runs: {', '.join(f'{m:.2f}' for m in means)})")
    return ", ".join(parts)


async def run_service_bench(target: str, bench: ServiceBench) -> dict[str, Any]:
    report: dict[str, Any] = {"overhead": [], "reliability": None}
    async with AsyncClient(target) as client:
        await client.wait_ready()
        info = await client.model_info()
        report["model"] = {"name": info.model, "dtype": info.dtype, "device": info.device}
        # Untimed: the first batches after start-up run slower (allocator, caches, the cost model's refits).
        await overhead(target, client, max(bench.streams), 16, "auto", is_wire_timed=False)
        is_wire_timed = on_this_host(target) and wire.can_capture()
        if not is_wire_timed:
            print("not timing chunks on the wire: that needs the server on this host and CAP_NET_RAW (root)")
        for run in range(bench.runs):
            for n, speculation in bench.settings():
                row = await overhead(target, client, n, bench.max_new_tokens, speculation, is_wire_timed)
                report["overhead"].append(row | {"run": run})
                print(f"run {run + 1}/{bench.runs}, {describe(row)}")
        for n, speculation in bench.settings():
            rows = [r for r in report["overhead"] if (r["streams"], r["speculation"]) == (n, speculation)]
            print(f"{n} streams, {speculation:4}, mean over {bench.runs} runs: " + across_runs(rows))
        rel = await reliability(client, bench.requests, bench.concurrency, bench.cancel_share, seed=0)
        report["reliability"] = rel
        print(
            f"{rel['requests']} requests at {rel['concurrency']} concurrent: {rel['finished']} finished, "
            f"{rel['cancelled_by_client']} cancelled by the client, {len(rel['failed'])} failed, "
            f"{rel['hung']} hung; server counted {rel['server_finished_delta']} endings, "
            f"idle after: {rel['server_idle_after']}, KV tokens still reserved: {rel['kv_tokens_used_after']}"
        )
    return report


def main(target: str | None, dtype: str, bench: ServiceBench, out_path: Path) -> int:
    server = None
    if target is None:
        server = start_server(out_path.parent / "logs", "--dtype", dtype)
        target = server.target
    try:
        report = anyio.run(run_service_bench, target, bench, backend="asyncio")
    finally:
        if server is not None:
            server.stop()
    out_path.parent.mkdir(parents=True, exist_ok=True)
    out_path.write_text(json.dumps(report, indent=2) + "\n")
    print(f"wrote {out_path}")
    rel = report["reliability"]
    is_reliable = not rel["failed"] and not rel["hung"] and rel["server_idle_after"] and not rel["kv_tokens_used_after"]
    return 0 if is_reliable else 1
