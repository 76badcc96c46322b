"""`goodspeed bench load`: open-loop Poisson load against a server, for several speculation
policies and request rates; latency, TTFT, TPOT, throughput and acceptance per point; JSON and a
PNG plot of mean latency against rate, a line per policy.

Open loop: requests start at their Poisson arrival times whether or not earlier ones finished, so
beyond saturation the queue (and latency) grows, as it would for real traffic. Every policy sees
the same arrival times and the same prompts, and at each rate the policies run back to back, so
slow drifts of the machine hit all of them alike. The policy is set per request (the request's
speculation field), so one server serves every policy.
"""

from __future__ import annotations

import json
import random
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import anyio
import grpc

from bench.server_process import start_server
from bench.workloads import WorkloadItem, build_workload, load_workload
from client.client import AsyncClient
from client.pb import generation_pb2 as pb

POLICIES = ("off", "fixed1", "fixed2", "fixed4", "fixed8", "auto")
# From light load (requests mostly alone) to beyond what OFF can serve on 2 CPU cores.
DEFAULT_RATES = {"editing": [0.2, 0.5, 1.0, 2.0, 3.0], "completion": [0.3, 0.8, 1.5, 2.5, 3.5]}


@dataclass(frozen=True, slots=True)
class LoadShape:
    """How many requests each (rate, policy) point sends, and how often it is repeated."""

    seconds_per_point: float = 40.0  # arrivals span about this long...
    min_requests: int = 16  # ... within these bounds
    max_requests: int = 40
    repeats: int = 1

    def __post_init__(self) -> None:
        if not self.seconds_per_point > 0:
            raise ValueError(f"seconds_per_point: must be > 0, got {self.seconds_per_point}")
        if not 1 <= self.min_requests <= self.max_requests:
            raise ValueError(
                f"min_requests, max_requests: need 1 <= min <= max, got {self.min_requests}, {self.max_requests}"
            )
        if self.repeats < 1:
            raise ValueError(f"repeats: must be >= 1, got {self.repeats}")


@dataclass
class RequestRecord:
    arrival_s: float
    first_token_s: float = 0.0
    end_s: float = 0.0
    num_tokens: int = 0
    num_steps: int = 0
    num_step_tokens: float = 0.0  # tokens produced by decoding steps
    error: str = ""


@dataclass
class PointResult:
    policy: str
    rate: float
    num_requests: int  # over all repeats
    num_errors: int
    mean_latency_s: float
    p50_latency_s: float
    p99_latency_s: float
    mean_ttft_s: float
    mean_tpot_s: float
    tokens_per_s: float
    mean_accepted_length: float
    wall_s: float  # summed over repeats
    repeat_mean_latencies_s: list[float]  # one per repeat: the spread says how noisy the point is
    # From the server's GetStats, over this point's steps: [k] how many times a request's decode
    # step drafted k tokens (num_steps counts engine steps, a batch each), and the
    # cost model's recent relative error at the point's end (AUTO's view of step cost).
    drafts_per_length: list[int]
    num_steps: int
    cost_model_error: float


@dataclass
class PointRun:
    """One run of a (rate, policy) point: its requests and what the server counted meanwhile."""

    records: list[RequestRecord]
    wall_s: float
    drafts_per_length: list[int]
    num_steps: int
    cost_model_error: float


def speculation_args(policy: str) -> dict[str, Any]:
    if policy == "off":
        return {"speculation": "off"}
    if policy == "auto":
        return {"speculation": "auto"}
    if policy.startswith("fixed"):
        return {"speculation": "fixed", "num_draft_tokens": int(policy.removeprefix("fixed"))}
    raise ValueError(f"unknown policy {policy!r}; use off, auto or fixedK")


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
    return PointRun(
        records=records,
        wall_s=max(r.end_s for r in records) - records[0].arrival_s,
        drafts_per_length=[a - b for a, b in zip(after.drafts_per_length, before.drafts_per_length, strict=True)],
        num_steps=after.steps - before.steps,
        cost_model_error=after.cost_model_error,
    )


def summarize_point(policy: str, rate: float, runs: list[PointRun]) -> PointResult:
    """Pools the requests of every repeat of a point."""
    records = [r for run in runs for r in run.records]
    ok = [r for r in records if not r.error]
    latencies = [r.end_s - r.arrival_s for r in ok]
    tpots = [(r.end_s - r.first_token_s) / (r.num_tokens - 1) for r in ok if r.num_tokens > 1]
    steps = sum(r.num_steps for r in ok)
    wall = sum(run.wall_s for run in runs)
    return PointResult(
        policy=policy,
        rate=rate,
        num_requests=len(records),
        num_errors=len(records) - len(ok),
        mean_latency_s=mean(latencies),
        p50_latency_s=percentile(latencies, 50),
        p99_latency_s=percentile(latencies, 99),
        mean_ttft_s=mean([r.first_token_s - r.arrival_s for r in ok]),
        mean_tpot_s=mean(tpots),
        tokens_per_s=sum(r.num_tokens for r in ok) / wall if wall > 0 else 0.0,
        mean_accepted_length=sum(r.num_step_tokens for r in ok) / steps if steps else 0.0,
        wall_s=wall,
        repeat_mean_latencies_s=[
            round(mean([r.end_s - r.arrival_s for r in run.records if not r.error]), 3) for run in runs
        ],
        drafts_per_length=[sum(counts) for counts in zip(*(run.drafts_per_length for run in runs), strict=True)],
        num_steps=sum(run.num_steps for run in runs),
        cost_model_error=runs[-1].cost_model_error,
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
    rates: list[float],
    load: LoadShape,
    seed: int,
) -> list[PointResult]:
    results: list[PointResult] = []
    async with AsyncClient(target) as client:
        await client.wait_ready()
        for policy in policies:  # warm-up: every policy once, so no point pays first-use costs
            await run_request(client, items[0], policy, RequestRecord(arrival_s=time.perf_counter()))
        for i, rate in enumerate(rates):
            num_requests = requests_for(rate, load.seconds_per_point, load.min_requests, load.max_requests)
            runs: dict[str, list[PointRun]] = {policy: [] for policy in policies}
            for repeat in range(load.repeats):
                # Rotated per rate and repeat, so no policy always runs first or after the same one;
                # each repeat draws other arrival times, the same for every policy.
                shift = (i + repeat) % len(policies)
                for policy in policies[shift:] + policies[:shift]:
                    await wait_idle(client)
                    runs[policy].append(await run_point(client, items, policy, rate, num_requests, seed + repeat))
            for policy in policies:
                point = summarize_point(policy, rate, runs[policy])
                results.append(point)
                print_point(point)
    return results


def print_point(point: PointResult) -> None:
    print(
        f"rate {point.rate:5.2f}/s {point.policy:7} {point.num_requests:3d} req: mean {point.mean_latency_s:6.2f}s "
        f"p50 {point.p50_latency_s:6.2f}s p99 {point.p99_latency_s:6.2f}s "
        f"TTFT {point.mean_ttft_s:5.2f}s TPOT {point.mean_tpot_s * 1000:6.1f}ms "
        f"{point.tokens_per_s:6.1f} tok/s accepted/step {point.mean_accepted_length:4.2f} "
        f"k used {k_text(point.drafts_per_length)}"
        + (f" repeats {point.repeat_mean_latencies_s}" if len(point.repeat_mean_latencies_s) > 1 else "")
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

    fig, axes = plt.subplots(1, 2, figsize=(12, 4.5))
    for policy in dict.fromkeys(r.policy for r in results):
        points = sorted((r for r in results if r.policy == policy), key=lambda r: r.rate)
        style = {"linewidth": 2.5, "color": "black"} if policy == "auto" else {"linewidth": 1.2}
        axes[0].plot([p.rate for p in points], [p.mean_latency_s for p in points], marker="o", label=policy, **style)
        axes[1].plot([p.rate for p in points], [p.p99_latency_s for p in points], marker="o", label=policy, **style)
    for ax, name in zip(axes, ("mean latency (s)", "p99 latency (s)"), strict=True):
        ax.set_xlabel("request rate (requests/s, Poisson)")
        ax.set_ylabel(name)
        ax.set_yscale("log")
        ax.grid(True, alpha=0.3)
    axes[0].legend(title="speculation")
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def summarize(results: list[PointResult]) -> dict[str, Any]:
    """AUTO against the best other policy, and against OFF, at every rate."""
    summary = {}
    for rate in sorted({r.rate for r in results}):
        at_rate = {r.policy: r for r in results if r.rate == rate}
        if "auto" not in at_rate:
            continue
        others = [r for p, r in at_rate.items() if p != "auto" and not r.num_errors]
        best = min(others, key=lambda r: r.mean_latency_s) if others else None
        auto = at_rate["auto"]
        summary[str(rate)] = {
            "auto_mean_latency_s": round(auto.mean_latency_s, 3),
            "best_other": best.policy if best else None,
            "auto_over_best": round(auto.mean_latency_s / best.mean_latency_s, 3) if best else None,
            "off_over_auto": round(at_rate["off"].mean_latency_s / auto.mean_latency_s, 3)
            if "off" in at_rate
            else None,
        }
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
) -> int:
    path = Path(workload)
    items = load_workload(path) if path.suffix == ".jsonl" else build_workload(workload)
    name = path.stem if path.suffix == ".jsonl" else workload
    rates = rates or DEFAULT_RATES.get(name, DEFAULT_RATES["completion"])
    for policy in policies:
        speculation_args(policy)  # fail early on a bad name
    server = None
    if target is None:
        server = start_server(out_dir / "logs", "--dtype", dtype)
        target = server.target
    try:
        results = anyio.run(
            run_load,
            target,
            items,
            policies,
            rates,
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
        "dtype": dtype,
        "seed": seed,
        "load": asdict(load),
        "points": [asdict(r) for r in results],
        "auto_vs_others": summarize(results),
    }
    (out_dir / f"load-{name}.json").write_text(json.dumps(report, indent=2) + "\n")
    plot(results, f"goodspeed, {name} workload, {dtype}", out_dir / f"load-{name}.png")
    print(json.dumps(report["auto_vs_others"], indent=2))
    print(f"wrote {out_dir / f'load-{name}.json'} and {out_dir / f'load-{name}.png'}")
    return 0
