"""`goodspeed bench longctx`: what self-speculation (MagicDec) costs and buys at long context.

Step costs, from synthetic KV (no prefill needed, so 8 requests at 8K tokens take seconds, not
minutes): per (context, batch), the target's plain decode step, its verification of 1 + k tokens
per request, and one self-speculation draft forward over the sink + window view, each the median
of timed runs (engine/profile.py, the start-up profile's own timer). With a per-token acceptance
rate a they give MagicDec's expected speedup of k drafts (reference algorithms.md, section 2.2):

    speedup(k) = (1 - a^(k+1)) / (1 - a) * T_plain / (k * T_draft + T_verify(k))

printed for the acceptance rate given (MagicDec reports ~0.8 at a 512-token budget). End-to-end
runs on real long inputs are not part of this command yet.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from tqdm import tqdm

from bench.machine import machine_facts
from engine.config import EngineConfig
from engine.profile import profile_steps
from engine.protocol import ProfileShape
from engine.runner import ModelRunner
from engine.worker import build_runner

REPEATS = 3


def expected_tokens(acceptance: float, k: int) -> float:
    """Tokens a step yields with k drafts that each pass with chance `acceptance` (given the last did)."""
    return sum(acceptance**i for i in range(k + 1))


def time_step(runner: ModelRunner, shape: ProfileShape, drafter: str = "") -> float:
    (sample,) = profile_steps(runner, [shape], REPEATS, drafter)
    return sample.step_s


def step_costs(runner: ModelRunner, contexts: list[int], batches: list[int], ks: list[int]) -> list[dict[str, Any]]:
    rows = []
    points = [(c, b) for c in contexts for b in batches]
    for context, batch in tqdm(points, desc="(context, batch)", unit="point"):
        row: dict[str, Any] = {"context": context, "batch": batch}
        row["plain_ms"] = 1e3 * time_step(runner, ProfileShape(batch, 1, context))
        row["draft_ms"] = 1e3 * time_step(runner, ProfileShape(batch, 1, context), "self")
        row["verify_ms"] = {k: 1e3 * time_step(runner, ProfileShape(batch, k + 1, context)) for k in ks}
        rows.append(row)
    return rows


def speedups(row: dict[str, Any], acceptance: float) -> dict[int, float]:
    return {
        k: expected_tokens(acceptance, k) * row["plain_ms"] / (k * row["draft_ms"] + verify_ms)
        for k, verify_ms in row["verify_ms"].items()
    }


def run_longctx_bench(
    model: str,
    dtype: str,
    contexts: list[int],
    batches: list[int],
    ks: list[int],
    acceptance: float,
    sink_tokens: int,
    window_tokens: int,
    out_path: Path,
) -> dict[str, Any]:
    num_tokens = max(batches) * (max(contexts) + max(ks) + 1)
    config = EngineConfig(
        model=model,
        dtype=dtype,
        kv_cache_tokens=num_tokens,
        drafters=("self",),
        self_spec_sink_tokens=sink_tokens,
        self_spec_window_tokens=window_tokens,
    )
    runner, ready = build_runner(config, show_progress=True)
    rows = step_costs(runner, contexts, batches, ks)
    for row in rows:
        row["predicted_speedup"] = {k: round(v, 3) for k, v in speedups(row, acceptance).items()}
    report = {
        "machine": machine_facts(),
        "model": model,
        "dtype": dtype,
        "device": ready.device,
        "window": {"sink_tokens": sink_tokens, "window_tokens": window_tokens},
        "acceptance_for_prediction": acceptance,
        "repeats": REPEATS,
        "step_costs": rows,
    }
    print_step_costs(report)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    out_path.write_text(json.dumps(report, indent=2) + "\n")
    print(f"wrote {out_path}")
    return report


def print_step_costs(report: dict[str, Any]) -> None:
    window = report["window"]
    print(
        f"\nstep costs, {report['model']}, {report['dtype']}, {report['machine']['cpu_model']}; self-speculation "
        f"window {window['sink_tokens']} + {window['window_tokens']} tokens; median of {report['repeats']} runs"
    )
    rows = report["step_costs"]
    ks = list(rows[0]["verify_ms"]) if rows else []
    verify_heads = " ".join(f"{'verify k=' + str(k):>10}" for k in ks)
    speed_heads = " ".join(f"{'x k=' + str(k):>7}" for k in ks)
    print(
        f"{'context':>7} {'batch':>5} {'plain ms':>9} {'draft ms':>9} {'draft/plain':>11} {verify_heads}  {speed_heads}"
    )
    for row in rows:
        verify = " ".join(f"{row['verify_ms'][k]:10.1f}" for k in ks)
        speed = " ".join(f"{row['predicted_speedup'][k]:7.2f}" for k in ks)
        ratio = row["draft_ms"] / row["plain_ms"]
        print(
            f"{row['context']:7d} {row['batch']:5d} {row['plain_ms']:9.1f} {row['draft_ms']:9.1f} {ratio:11.2f} "
            f"{verify}  {speed}"
        )
    print(f"x k: MagicDec's predicted speedup over plain at acceptance {report['acceptance_for_prediction']}")
