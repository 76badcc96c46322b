"""Where a plain decode step spends its time (`goodspeed bench step-profile`): the torch
profiler's self CPU time per operator over decode steps of a batch, grouped into matrix
products, attention, element-wise work (norms, rotary, residuals, SiLU), copies and indexing,
and the rest of the wall time: Python and the dispatcher between operators.

The profiler adds a few microseconds to every operator, so the step times it sees are longer
than unprofiled ones (both are printed); the shares are what to read.
"""

from __future__ import annotations

import json
import statistics
import time
from pathlib import Path
from typing import Any

from torch.profiler import ProfilerActivity, profile

from bench.machine import machine_facts, memory_bandwidth_gbs
from bench.roofline import TRIAD_REPEATS, roofline_tokens_per_s, spread
from bench.workloads import build_workload
from engine.config import EngineConfig
from engine.protocol import NewRequest, ScheduledRequest, StepPlan
from engine.runner import ModelRunner
from engine.worker import build_runner
from server.tokenizer import TextTokenizer

ATTENTION_OPS = ("bmm", "_softmax", "softmax", "_scaled_dot_product_flash_attention_for_cpu", "ragged_attention")
COPY_OPS = ("copy_", "_to_copy", "index", "index_copy_", "index_put_", "cat", "stack", "empty", "empty_strided")
VIEW_OPS = ("slice", "select", "as_strided", "view", "reshape", "permute", "transpose", "unsqueeze", "expand")


def category(op_name: str) -> str:
    """The profiler's operator name -> what it does in a decode step."""
    name = op_name.split("::")[-1]
    if name == "decoder_layers":
        return "all decoder layers in one C++ call (products, attention, norms)"
    if name in ATTENTION_OPS:
        return "attention"
    if "linear" in name or name in ("mm", "addmm", "matmul"):
        return "matrix products (projections, MLP, output layer)"
    if name in COPY_OPS:
        return "copies, dtype casts and KV writes"
    if name in VIEW_OPS:
        return "views and slices"
    return "element-wise: norms, rotary, residual, SiLU, other"


class DecodingBatch:
    """Requests prefilled on the runner, decoded a step at a time, released at the end."""

    def __init__(self, runner: ModelRunner, prompts: list[list[int]], max_steps: int, name: str) -> None:
        self.runner, self.step_id = runner, 0
        new = [NewRequest(f"{name}-{i}", ids, max_steps + 1, stop_token_ids=[]) for i, ids in enumerate(prompts)]
        self.req_ids = [n.req_id for n in new]
        self.run(StepPlan(0, new, [ScheduledRequest(n.req_id, len(n.prompt_token_ids)) for n in new]))

    def run(self, plan: StepPlan) -> float:
        started = time.perf_counter()
        self.runner.step(plan)
        self.step_id += 1
        return time.perf_counter() - started

    def decode(self, num_steps: int) -> list[float]:
        """Seconds of each plain decode step of the whole batch."""
        return [
            self.run(StepPlan(self.step_id, [], [ScheduledRequest(r) for r in self.req_ids])) for _ in range(num_steps)
        ]

    def release(self) -> None:
        self.run(StepPlan(self.step_id, [], [], self.req_ids))


def profile_batch(runner: ModelRunner, prompts: list[list[int]], num_steps: int) -> dict[str, Any]:
    batch = DecodingBatch(runner, prompts, 2 * num_steps + 4, f"b{len(prompts)}")
    batch.decode(4)  # warm-up
    unprofiled = batch.decode(num_steps)
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        profiled = batch.decode(num_steps)
    batch.release()
    events = prof.key_averages()
    op_us: dict[str, float] = {}
    for event in events:
        op_us[category(event.key)] = op_us.get(category(event.key), 0.0) + event.self_cpu_time_total
    step_us = sum(profiled) / num_steps * 1e6
    shares = {label: us / num_steps / step_us for label, us in sorted(op_us.items())}
    shares["Python and dispatch"] = max(0.0, 1 - sum(shares.values()))
    return {
        "batch": len(prompts),
        "step_ms": round(statistics.median(unprofiled) * 1e3, 2),
        "step_ms_profiled": round(step_us / 1e3, 2),
        "operator_calls": sum(e.count for e in events) // num_steps,
        "shares": {label: round(share, 3) for label, share in shares.items()},
        "top_ops": [
            {
                "op": e.key,
                "ms_per_step": round(e.self_cpu_time_total / num_steps / 1e3, 3),
                "calls": e.count // num_steps,
            }
            for e in sorted(events, key=lambda e: -e.self_cpu_time_total)[:10]
        ],
    }


ROOFLINE_ROUNDS, STEPS_PER_ROUND = 10, 10


def roofline_share(runner: ModelRunner, prompt: list[int]) -> dict[str, Any]:
    """Batch-1 plain decoding against the memory roofline, a triad between rounds of steps: a shared
    host's bandwidth moves within seconds, so each round is set against the triads on either side."""
    batch = DecodingBatch(runner, [prompt], ROOFLINE_ROUNDS * STEPS_PER_ROUND + 4, "roofline")
    batch.decode(4)  # warm-up
    triads, shares = [memory_bandwidth_gbs(TRIAD_REPEATS)], []
    for _ in range(ROOFLINE_ROUNDS):
        step_s = statistics.median(batch.decode(STEPS_PER_ROUND))
        triads.append(memory_bandwidth_gbs(TRIAD_REPEATS))
        bound = roofline_tokens_per_s(runner.model.spec, runner.model.dtype, (triads[-2] + triads[-1]) / 2)
        shares.append(1 / step_s / bound)
    batch.release()
    return {**spread(shares), "triads_gbs": [round(t, 1) for t in triads]}


def main(model: str, dtypes: list[str], batch_sizes: list[int], num_steps: int, out: Path) -> int:
    machine = machine_facts()
    report: dict[str, Any] = {"model": model, "machine": machine, "num_steps": num_steps, "profiles": []}
    for dtype in dtypes:
        runner, ready = build_runner(EngineConfig(model=model, dtype=dtype, drafters=()), show_progress=False)
        tokenizer = TextTokenizer(ready.model_path)
        items = build_workload("completion", max(batch_sizes))
        prompts = [item.token_ids(tokenizer) for item in items]
        for batch_size in batch_sizes:
            row = {"dtype": dtype, **profile_batch(runner, prompts[:batch_size], num_steps)}
            if batch_size == 1:
                row["roofline_share"] = roofline_share(runner, prompts[0])
            report["profiles"].append(row)
            print_profile(machine["cpu_model"], row)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2) + "\n")
    print(f"\nwrote {out}")
    return 0


def print_profile(cpu: str, row: dict[str, Any]) -> None:
    print(
        f"\n{row['dtype']}, batch {row['batch']}, {cpu}: a decode step {row['step_ms']} ms "
        f"({row['step_ms_profiled']} ms under the profiler, {row['operator_calls']} operator calls)"
    )
    if "roofline_share" in row:
        roofline = row["roofline_share"]
        print(
            f"  against the memory roofline, a triad between every {STEPS_PER_ROUND} steps "
            f"({min(roofline['triads_gbs'])}-{max(roofline['triads_gbs'])} GB/s): {roofline['median']:.0%}, "
            f"median of {ROOFLINE_ROUNDS} rounds ({roofline['min']:.0%}-{roofline['max']:.0%})"
        )
    for label, share in row["shares"].items():
        print(f"  {label:52} {share:6.1%}")
    print("  top operators (self time per step):")
    for op in row["top_ops"]:
        print(f"    {op['op']:44} {op['ms_per_step']:7.3f} ms  x{op['calls']}")
