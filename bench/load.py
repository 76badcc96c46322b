"""`goodspeed bench load`: load against a server, for several speculation policies and loads;
latency, TTFT, TPOT, throughput and acceptance per point; JSON and a PNG plot, a line per policy.

Open loop (`--rates`, the default): requests start at their Poisson arrival times whether or not
earlier ones finished, so beyond saturation the queue (and latency) grows, as it would for real
traffic. Every policy sees the same arrival times and the same prompts, and at each rate the
policies run back to back, so slow drifts of the machine hit all of them alike.

Closed loop (`--concurrency`): a fixed number of clients each send their next request when the
last one ends, so the batch holds that many requests. Throughput is counted only while all of
them are in flight (from the last client's first request to the last request sent), which makes
it the server's capacity at that batch size: it compares policies with far less noise than
open-loop latency, whose mean near saturation swings with the arrival pattern.

The policy is set per request (the request's speculation field), so one server serves every policy.
"""

from __future__ import annotations

import json
import random
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import anyio
import grpc

from api.pb import generation_pb2 as pb
from api.speculation import SpeculationMode
from bench.machine import cpu_model
from bench.server_process import start_server
from bench.workloads import WorkloadItem, build_workload, load_workload
from client.client import AsyncClient
from engine.config import DRAFTERS

POLICIES = ("off", "fixed1", "fixed2", "fixed4", "fixed8", "auto")
# From light load (requests mostly alone) to beyond what OFF can serve on 2 CPU cores.
DEFAULT_RATES = {
    "editing": [0.2, 0.5, 1.0, 2.0, 3.0],
    "completion": [0.3, 0.8, 1.5, 2.5, 3.5],
    "mixed": [0.2, 0.6, 1.2, 2.0, 3.0],
}


@dataclass(frozen=True, slots=True)
class LoadShape:
    """How many requests each (rate, policy) point sends, and how often it is repeated."""

    seconds_per_point: float = 40.0  # arrivals span about this long...
    min_requests: int = 16  # ... within these bounds
    max_requests: int = 40
    repeats: int = 1
    requests_per_client: int = 4  # closed loop: each point sends concurrency x this many requests

    def __post_init__(self) -> None:
        if not self.seconds_per_point > 0:
            raise ValueError(f"seconds_per_point: must be > 0, got {self.seconds_per_point}")
        if not 1 <= self.min_requests <= self.max_requests:
            raise ValueError(
                f"min_requests, max_requests: need 1 <= min <= max, got {self.min_requests}, {self.max_requests}"
            )
        if self.repeats < 1:
            raise ValueError(f"repeats: must be >= 1, got {self.repeats}")
        if self.requests_per_client < 2:
            raise ValueError(
                f"requests_per_client: must be >= 2 (one to fill the batch), got {self.requests_per_client}"
            )


@dataclass
class RequestRecord:
    arrival_s: float
    first_token_s: float = 0.0
    end_s: float = 0.0
    num_tokens: int = 0
    num_steps: int = 0
    num_step_tokens: float = 0.0  # tokens produced by decoding steps
    error: str = ""
    token_times: list[tuple[float, int]] = field(default_factory=list)  # (when read, tokens) per chunk


@dataclass
class PointResult:
    policy: str
    rate: float  # open loop: requests per second offered (0 in closed loop)
    concurrency: int  # closed loop: requests kept in flight (0 in open loop)
    num_requests: int  # over all repeats
    num_errors: int
    mean_latency_s: float
    p50_latency_s: float
    p99_latency_s: float
    mean_ttft_s: float
    mean_tpot_s: float
    tokens_per_s: float  # open loop: over the whole run; closed loop: while the batch is full
    mean_accepted_length: float
    wall_s: float  # summed over repeats
    repeat_mean_latencies_s: list[float]  # one per repeat: the spread says how noisy the point is
    repeat_tokens_per_s: list[float]
    # From the server's GetStats, over this point's steps: [k] how many times a request's decode
    # step drafted k tokens (num_steps counts engine steps, a batch each), and the
    # cost model's recent relative error at the point's end.
    drafts_per_length: list[int]
    num_steps: int
    cost_model_error: float
    draft_cost_model_error: dict[str, float]  # each draft model's drafting-cost model, likewise


@dataclass
class PointRun:
    """One run of a (rate, policy) point: its requests and what the server counted meanwhile."""

    records: list[RequestRecord]
    wall_s: float
    window_s: float  # when throughput is counted: the whole run, or (closed loop) while the batch is full
    window_tokens: int
    drafts_per_length: list[int]
    num_steps: int
    cost_model_error: float
    draft_cost_model_error: dict[str, float]


def speculation_args(policy: str) -> dict[str, Any]:
    """'off', 'auto', 'fixedK' (FIXED with k = K, the server's drafter) or 'DRAFTERK' (FIXED k with
    that drafter: ngram4, model2) -> build_request's speculation arguments."""
    label = policy.rstrip("0123456789")
    num_draft_tokens = policy[len(label) :]
    drafter = label if label in DRAFTERS else ""
    try:
        mode = SpeculationMode.FIXED if drafter else SpeculationMode.parse(label)
    except ValueError:
        mode = SpeculationMode.DEFAULT
    if mode == SpeculationMode.DEFAULT or (mode == SpeculationMode.FIXED) != bool(num_draft_tokens):
        raise ValueError(f"unknown policy {policy!r}; use off, auto, fixedK or DRAFTERK (ngram4, model2)")
    return {"speculation": mode.label, "num_draft_tokens": int(num_draft_tokens or 0), "drafter": drafter}


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    if not ordered:
        return 0.0
    index = min(len(ordered) - 1, max(0, round(q / 100 * (len(ordered) - 1))))
    return ordered[index]


async def run_request(client: AsyncClient, item: WorkloadItem, policy: str, record: RequestRecord) -> None:
    messages = [(m["role"], m["content"]) for m in item.messages] if item.messages else None
    try:
        async for chunk in client.generate_stream(
            item.prompt, messages=messages, max_new_tokens=item.max_new_tokens, **speculation_args(policy)
        ):
            now = time.perf_counter()
            if chunk.token_ids and not record.first_token_s:
                record.first_token_s = now
            record.num_tokens += len(chunk.token_ids)
            record.token_times.append((now, len(chunk.token_ids)))
            if chunk.finish_reason != pb.FINISH_REASON_UNSPECIFIED:
                record.num_steps = chunk.speculation.steps
                record.num_step_tokens = chunk.speculation.mean_accepted_length * chunk.speculation.steps
        record.end_s = time.perf_counter()
    except grpc.aio.AioRpcError as exc:
        record.error = f"{exc.code().name}: {exc.details()}"
        record.end_s = time.perf_counter()


async def run_point(
    client: AsyncClient, items: list[WorkloadItem], policy: str, rate: float, num_requests: int, seed: int
) -> PointRun:
    rng = random.Random(seed)
    offsets, t = [], 0.0
    for _ in range(num_requests):
        t += rng.expovariate(rate)
        offsets.append(t)
    before = await client.stats()
    records: list[RequestRecord] = []
    started = anyio.current_time()
    async with anyio.create_task_group() as tg:
        for i, offset in enumerate(offsets):
            await anyio.sleep_until(started + offset)
            record = RequestRecord(arrival_s=time.perf_counter())
            records.append(record)
            tg.start_soon(run_request, client, items[i % len(items)], policy, record)
    after = await client.stats()
    return point_run(records, records[0].arrival_s, max(r.end_s for r in records), before, after)


async def run_closed_point(
    client: AsyncClient, items: list[WorkloadItem], policy: str, concurrency: int, num_requests: int, first_item: int
) -> PointRun:
    """concurrency clients, each sending its next request when the last ends, num_requests in all,
    the workload's items in order from first_item."""
    before = await client.stats()
    records: list[RequestRecord] = []

    async def client_loop() -> None:
        while len(records) < num_requests:
            record = RequestRecord(arrival_s=time.perf_counter())
            records.append(record)
            await run_request(client, items[(first_item + len(records) - 1) % len(items)], policy, record)

    async with anyio.create_task_group() as tg:
        for _ in range(concurrency):
            tg.start_soon(client_loop)
    after = await client.stats()
    # The batch is full from the last client's first request to the last request sent.
    return point_run(records, records[concurrency - 1].arrival_s, records[-1].arrival_s, before, after)


def point_run(records: list[RequestRecord], start_s: float, end_s: float, before: Any, after: Any) -> PointRun:
    """A run's records, with throughput counted over [start_s, end_s] and the server's counters
    (GetStats before and after) over the whole run."""
    return PointRun(
        records=records,
        wall_s=max(r.end_s for r in records) - records[0].arrival_s,
        window_s=end_s - start_s,
        window_tokens=sum(n for r in records for t, n in r.token_times if start_s <= t <= end_s),
        drafts_per_length=[a - b for a, b in zip(after.drafts_per_length, before.drafts_per_length, strict=True)],
        num_steps=after.steps - before.steps,
        cost_model_error=after.cost_model_error,
        draft_cost_model_error={name: d.cost_model_error for name, d in after.drafters.items() if d.cost_model_ms},
    )


def summarize_point(policy: str, rate: float, runs: list[PointRun], concurrency: int = 0) -> PointResult:
    """Pools the requests of every repeat of a point."""
    records = [r for run in runs for r in run.records]
    ok = [r for r in records if not r.error]
    latencies = [r.end_s - r.arrival_s for r in ok]
    tpots = [(r.end_s - r.first_token_s) / (r.num_tokens - 1) for r in ok if r.num_tokens > 1]
    steps = sum(r.num_steps for r in ok)
    wall, window = sum(run.wall_s for run in runs), sum(run.window_s for run in runs)
    return PointResult(
        policy=policy,
        rate=rate,
        concurrency=concurrency,
        num_requests=len(records),
        num_errors=len(records) - len(ok),
        mean_latency_s=mean(latencies),
        p50_latency_s=percentile(latencies, 50),
        p99_latency_s=percentile(latencies, 99),
        mean_ttft_s=mean([r.first_token_s - r.arrival_s for r in ok]),
        mean_tpot_s=mean(tpots),
        tokens_per_s=sum(run.window_tokens for run in runs) / window if window > 0 else 0.0,
        mean_accepted_length=sum(r.num_step_tokens for r in ok) / steps if steps else 0.0,
        wall_s=wall,
        repeat_mean_latencies_s=[
            round(mean([r.end_s - r.arrival_s for r in run.records if not r.error]), 3) for run in runs
        ],
        repeat_tokens_per_s=[round(run.window_tokens / run.window_s, 1) if run.window_s > 0 else 0.0 for run in runs],
        drafts_per_length=[sum(counts) for counts in zip(*(run.drafts_per_length for run in runs), strict=True)],
        num_steps=sum(run.num_steps for run in runs),
        cost_model_error=runs[-1].cost_model_error,
        draft_cost_model_error=runs[-1].draft_cost_model_error,
    )


def mean(values: list[float]) -> float:
    return sum(values) / len(values) if values else 0.0


async def wait_idle(client: AsyncClient) -> None:
    while True:
        stats = await client.stats()
        if stats.requests_running == 0 and stats.requests_waiting == 0:
            return
        await anyio.sleep(0.1)


def requests_for(rate: float, seconds_per_point: float, min_requests: int, max_requests: int) -> int:
    return int(min(max_requests, max(min_requests, round(rate * seconds_per_point))))


async def run_load(
    target: str,
    items: list[WorkloadItem],
    policies: list[str],
    loads: list[tuple[float, int]],
    load: LoadShape,
    seed: int,
) -> list[PointResult]:
    """loads: (rate, 0) for an open-loop point, (0, concurrency) for a closed-loop one."""
    results: list[PointResult] = []
    async with AsyncClient(target) as client:
        await client.wait_ready()
        for policy in policies:  # warm-up: every policy once, so no point pays first-use costs
            await run_request(client, items[0], policy, RequestRecord(arrival_s=time.perf_counter()))
        for i, (rate, concurrency) in enumerate(loads):
            runs: dict[str, list[PointRun]] = {policy: [] for policy in policies}
            for repeat in range(load.repeats):
                # Rotated per load and repeat, so no policy always runs first or after the same one;
                # each repeat draws other arrival times (or items), the same for every policy.
                shift = (i + repeat) % len(policies)
                for policy in policies[shift:] + policies[:shift]:
                    await wait_idle(client)
                    if concurrency:
                        num_requests = concurrency * load.requests_per_client
                        run = await run_closed_point(
                            client, items, policy, concurrency, num_requests, repeat * num_requests
                        )
                    else:
                        num_requests = requests_for(rate, load.seconds_per_point, load.min_requests, load.max_requests)
                        run = await run_point(client, items, policy, rate, num_requests, seed + repeat)
                    runs[policy].append(run)
            for policy in policies:
                point = summarize_point(policy, rate, runs[policy], concurrency)
                results.append(point)
                print_point(point)
    return results


def print_point(point: PointResult) -> None:
    where = f"concurrency {point.concurrency:3d}" if point.concurrency else f"rate {point.rate:5.2f}/s"
    print(
        f"{where} {point.policy:7} {point.num_requests:3d} req: mean {point.mean_latency_s:6.2f}s "
        f"p50 {point.p50_latency_s:6.2f}s p99 {point.p99_latency_s:6.2f}s "
        f"TTFT {point.mean_ttft_s:5.2f}s TPOT {point.mean_tpot_s * 1000:6.1f}ms "
        f"{point.tokens_per_s:6.1f} tok/s accepted/step {point.mean_accepted_length:4.2f} "
        f"k used {k_text(point.drafts_per_length)}"
        + (f" repeats {point.repeat_mean_latencies_s}" if len(point.repeat_mean_latencies_s) > 1 else "")
        + (f" tok/s {point.repeat_tokens_per_s}" if len(point.repeat_tokens_per_s) > 1 else "")
        + (f" errors {point.num_errors}" if point.num_errors else ""),
        flush=True,
    )


def k_text(drafts_per_length: list[int]) -> str:
    """The share of decode steps at each k, for the k values used at all: '0:12% 4:30% 8:58%'."""
    total = sum(drafts_per_length)
    return " ".join(f"{k}:{100 * n / total:.0f}%" for k, n in enumerate(drafts_per_length) if n) if total else "-"


def plot(results: list[PointResult], title: str, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    is_closed = any(r.concurrency for r in results)
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.5))
    for policy in dict.fromkeys(r.policy for r in results):
        points = sorted((r for r in results if r.policy == policy), key=lambda r: (r.rate, r.concurrency))
        style = {"linewidth": 2.5, "color": "black"} if policy == "auto" else {"linewidth": 1.2}
        xs = [p.concurrency if is_closed else p.rate for p in points]
        axes[0].plot(xs, [p.mean_latency_s for p in points], marker="o", label=policy, **style)
        right = [p.tokens_per_s if is_closed else p.p99_latency_s for p in points]
        axes[1].plot(xs, right, marker="o", label=policy, **style)
    names = ("mean latency (s)", "generated tokens/s, batch full" if is_closed else "p99 latency (s)")
    for ax, name in zip(axes, names, strict=True):
        ax.set_xlabel("requests in flight (closed loop)" if is_closed else "request rate (requests/s, Poisson)")
        ax.set_ylabel(name)
        ax.set_yscale("log")
        ax.grid(True, alpha=0.3)
    axes[0].legend(title="speculation")
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def summarize(results: list[PointResult]) -> dict[str, Any]:
    """AUTO against the best other policy, and against OFF, at every load: by mean latency, and in
    closed loop also by throughput. Keys: the rate ("2.5"), or the concurrency ("c24")."""
    summary = {}
    for rate, concurrency in sorted({(r.rate, r.concurrency) for r in results}):
        at_load = {r.policy: r for r in results if (r.rate, r.concurrency) == (rate, concurrency)}
        if "auto" not in at_load:
            continue
        others = [r for p, r in at_load.items() if p != "auto" and not r.num_errors]
        best = min(others, key=lambda r: r.mean_latency_s) if others else None
        auto = at_load["auto"]
        entry: dict[str, Any] = {
            "auto_mean_latency_s": round(auto.mean_latency_s, 3),
            "best_other": best.policy if best else None,
            "auto_over_best": round(auto.mean_latency_s / best.mean_latency_s, 3) if best else None,
            # Against the pooled best, repeat by repeat (they share arrival times): the spread is the noise.
            "auto_over_best_by_repeat": [
                round(a / b, 3) for a, b in zip(auto.repeat_mean_latencies_s, best.repeat_mean_latencies_s, strict=True)
            ]
            if best
            else None,
            "off_over_auto": round(at_load["off"].mean_latency_s / auto.mean_latency_s, 3)
            if "off" in at_load
            else None,
        }
        if concurrency and others:
            fastest = max(others, key=lambda r: r.tokens_per_s)
            entry["most_tokens_per_s"] = fastest.policy
            entry["auto_tokens_per_s_over_most"] = round(auto.tokens_per_s / max(fastest.tokens_per_s, 1e-9), 3)
        summary[f"c{concurrency}" if concurrency else str(rate)] = entry
    return summary


def main(
    workload: str,
    target: str | None,
    dtype: str,
    policies: list[str],
    rates: list[float] | None,
    load: LoadShape,
    seed: int,
    out_dir: Path,
    concurrencies: list[int] | None = None,
    model: str = "",
    draft_model: str = "",
) -> int:
    """Open loop at rates (default: per workload), or closed loop at concurrencies if given."""
    path = Path(workload)
    items = load_workload(path) if path.suffix == ".jsonl" else build_workload(workload)
    name = path.stem if path.suffix == ".jsonl" else workload
    if concurrencies:
        loads, stem = [(0.0, c) for c in concurrencies], f"load-{name}-closed"
    else:
        loads, stem = [(r, 0) for r in rates or DEFAULT_RATES.get(name, DEFAULT_RATES["completion"])], f"load-{name}"
    if model:
        stem += f"-{Path(model).name}"
    for policy in policies:
        speculation_args(policy)  # fail early on a bad name
    server = None
    if target is None:
        flags = [
            "--dtype",
            dtype,
            *(["--model", model] if model else []),
            *(["--draft-model", draft_model] if draft_model else []),
        ]
        server = start_server(out_dir / "logs", *flags)
        target = server.target
    try:
        results = anyio.run(
            run_load,
            target,
            items,
            policies,
            loads,
            load,
            seed,
            backend="asyncio",
        )
    finally:
        if server is not None:
            server.stop()
    out_dir.mkdir(parents=True, exist_ok=True)
    report = {
        "workload": name,
        "model": model,
        "draft_model": draft_model,
        "dtype": dtype,
        "cpu": cpu_model(),
        "seed": seed,
        "load": asdict(load),
        "points": [asdict(r) for r in results],
        "auto_vs_others": summarize(results),
    }
    (out_dir / f"{stem}.json").write_text(json.dumps(report, indent=2) + "\n")
    plot(results, f"goodspeed, {name} workload, {model or 'default model'}, {dtype}", out_dir / f"{stem}.png")
    print(f"cpu: {report['cpu']}")
    print(json.dumps(report["auto_vs_others"], indent=2))
    print(f"wrote {out_dir / f'{stem}.json'} and {out_dir / f'{stem}.png'}")
    return 0
