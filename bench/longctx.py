"""`goodspeed bench longctx`: what self-speculation (MagicDec) costs and buys at long context.

Three parts (`--parts`), one report:

- step costs, from synthetic KV (no prefill needed, so 8 requests at 8K tokens take seconds):
  per (context, batch), the target's plain decode step, its verification of 1 + k tokens per
  request, and one self-speculation draft forward over the sink + window view, each the median
  of timed runs (engine/profile.py, the start-up profile's own timer). With a per-token
  acceptance rate a they give MagicDec's expected speedup of k drafts (reference algorithms.md,
  section 2.2): speedup(k) = (1 - a^(k+1)) / (1 - a) * T_plain / (k * T_draft + T_verify(k)).
- end to end, on real long inputs (bench/long_prompts.py): per (context, batch), the batch's
  prompts are prefilled once, then every variant (plain, self-speculation with each k, n-gram,
  AUTO) decodes the same continuation through the server's own scheduler and policy in this
  process (bench/in_process.py), the variants taking turns run by run. Decode tokens/s (from the
  step that gave every request its first token to the last) and speedup over the plain run of the
  same turn, each the median over runs; acceptance, tokens per step, and outputs that differ from
  plain's; a PNG of speedup against batch per context (MagicDec's figure).
- interference: a running stream's inter-token latency while a prompt of the longest context is
  prefilled, with the prefill cap and without (bench/prefill_latency.py).
"""

from __future__ import annotations

import json
import statistics
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tqdm import tqdm

from api.speculation import SpeculationMode
from bench import prefill_latency
from bench.in_process import InProcessServer
from bench.long_prompts import SOURCES, PrefilledRunner, cut_prompts, source_token_ids
from bench.machine import machine_facts
from engine.config import EngineConfig
from engine.profile import profile_steps
from engine.protocol import ProfileShape, StepSample
from engine.runner import ModelRunner
from engine.worker import build_runner
from server.app import configure_logging
from server.tokenizer import TextTokenizer

REPEATS = 11  # medians: this kind of machine is noisy for seconds at a time


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


def add_kv_read_times(runner: ModelRunner, rows: list[dict[str, Any]], bandwidth_gbs: float) -> None:
    """Each longer context's plain step against the shortest at its batch: the extra time, and the
    time to read the extra K and V once at the measured bandwidth (what the extra cannot be under)."""
    spec = runner.model.spec
    kv_bytes_per_token = 2 * spec.num_layers * spec.num_kv_heads * spec.head_dim * runner.kv_cache.dtype.itemsize
    for row in rows:
        base = min((r for r in rows if r["batch"] == row["batch"]), key=lambda r: r["context"])
        if row is base:
            continue
        extra_bytes = row["batch"] * (row["context"] - base["context"]) * kv_bytes_per_token
        row["over_shortest"] = {
            "context": base["context"],
            "extra_ms": row["plain_ms"] - base["plain_ms"],
            "kv_read_ms": 1e3 * extra_bytes / (bandwidth_gbs * 1e9),
            "extra_kv_mb": extra_bytes / 1e6,
        }


def speedups(row: dict[str, Any], acceptance: float) -> dict[int, float]:
    return {
        k: expected_tokens(acceptance, k) * row["plain_ms"] / (k * row["draft_ms"] + verify_ms)
        for k, verify_ms in row["verify_ms"].items()
    }


@dataclass(frozen=True, slots=True)
class Variant:
    name: str
    mode: SpeculationMode
    drafter: str = ""
    num_draft_tokens: int = 0


def variants(ks: list[int], ngram_k: int) -> list[Variant]:
    return [
        Variant("plain", SpeculationMode.OFF),
        *(Variant(f"self k={k}", SpeculationMode.FIXED, "self", k) for k in ks),
        Variant(f"ngram k={ngram_k}", SpeculationMode.FIXED, "ngram", ngram_k),
        Variant("auto", SpeculationMode.AUTO),
    ]


@dataclass
class VariantTotals:
    """One variant's runs at a (context, batch) point: its speed per run, its counts summed."""

    max_new_tokens: int
    decode_tok_s: list[float] = field(default_factory=list)  # per run: tokens after each request's first
    # per run: the mean over requests of the time from the step that gave every request its first
    # token to the request's last token (decode tok/s is the batch's: it waits for the last request)
    mean_request_s: list[float] = field(default_factory=list)
    num_steps: int = 0
    num_generated: int = 0
    num_drafted: int = 0
    num_accepted: int = 0
    steps_by_drafter: dict[str, int] = field(default_factory=dict)
    outputs: list[list[list[int]]] = field(default_factory=list)  # per run, per request

    def add_run(self, server: InProcessServer, runner: PrefilledRunner, prompts: list[list[int]], v: Variant) -> None:
        num_prefilled = min(runner.num_prefilled_tokens(ids) for ids in prompts)
        outcomes, decode_s = server.generate_batch(
            prompts, self.max_new_tokens, v.mode, v.num_draft_tokens, v.drafter, num_prefilled
        )
        num_decoded = sum(len(o.output_ids) - 1 for o in outcomes)
        self.decode_tok_s.append(num_decoded / decode_s if decode_s else 0.0)
        decode_start_s = max(o.first_token_s for o in outcomes)  # decode_s runs from there
        self.mean_request_s.append(statistics.mean(o.seconds - decode_start_s for o in outcomes))
        for summary in (o.speculation for o in outcomes):
            self.num_steps += summary.num_steps
            self.num_generated += summary.num_generated
            self.num_drafted += summary.num_drafted
            self.num_accepted += summary.num_accepted
            for drafter, usage in summary.by_drafter.items():
                self.steps_by_drafter[drafter] = self.steps_by_drafter.get(drafter, 0) + usage.num_steps
        self.outputs.append([o.output_ids for o in outcomes])

    def report(self, plain: VariantTotals) -> dict[str, Any]:
        # Medians over runs: a run at short context lasts under a second, so one slow spell of the
        # machine would move a sum by 10-30%. Each run's speedup is over the plain run of its turn.
        runs = zip(self.decode_tok_s, plain.decode_tok_s, strict=True)
        speedups = [tok_s / plain_tok_s if plain_tok_s else 0.0 for tok_s, plain_tok_s in runs]
        latencies = zip(plain.mean_request_s, self.mean_request_s, strict=True)
        latency_speedups = [plain_s / request_s if request_s else 0.0 for plain_s, request_s in latencies]
        reference = plain.outputs[0]
        return {
            "decode_tok_s": statistics.median(self.decode_tok_s),
            "speedup": statistics.median(speedups),
            "mean_request_s": statistics.median(self.mean_request_s),
            "latency_speedup": statistics.median(latency_speedups),  # plain's mean request time over this one's
            "decode_tok_s_runs": self.decode_tok_s,
            "tokens_per_step": self.num_generated / self.num_steps if self.num_steps else 0.0,
            "acceptance": self.num_accepted / self.num_drafted if self.num_drafted else None,
            "steps_by_drafter": self.steps_by_drafter,
            # outputs of all runs that differ from plain's first run, request by request
            "num_diverged": sum(a != b for run in self.outputs for a, b in zip(run, reference, strict=True)),
            "outputs": self.outputs[0],
        }


def end_to_end(
    runner: PrefilledRunner,
    servers: tuple[InProcessServer, InProcessServer],
    sources: list[list[int]],
    contexts: list[int],
    batches: list[int],
    ks: list[int],
    ngram_k: int,
    max_new_tokens: int,
    repeats: int,
    profile: dict[str, list[StepSample]],
) -> list[dict[str, Any]]:
    """servers: (the fixed settings' and plain's, AUTO's). AUTO has a control plane of its own, so
    that it learns acceptance from its own drafts, as on a server, and not from the fixed
    settings having just decoded the same continuation (with them it trusted self-speculation's
    acceptance from the fixed runs and drafted with it far more than it does alone)."""
    server, auto_server = servers
    for each in servers:
        each.warm(profile)  # AUTO prices steps as a started server would
    rows = []
    points = tqdm(total=len(contexts) * len(batches), desc="(context, batch)", unit="point")
    for context in contexts:
        prompts = cut_prompts(sources, context)
        points.set_postfix_str(f"prefilling {len(prompts)} prompts of {context} tokens")
        runner.is_saving = True
        server.generate_batch(prompts, 1, SpeculationMode.OFF)
        runner.is_saving = False
        for batch in batches:
            points.set_postfix_str(f"context {context}, batch {batch}")
            totals = {v.name: VariantTotals(max_new_tokens) for v in variants(ks, ngram_k)}
            for _ in range(repeats):  # variants take turns, so a slow spell of the machine hits them all
                for v in variants(ks, ngram_k):
                    runs_it = auto_server if v.mode == SpeculationMode.AUTO else server
                    totals[v.name].add_run(runs_it, runner, prompts[:batch], v)
            plain = totals["plain"]
            row = {
                "context": context,
                "batch": batch,
                "variants": {name: t.report(plain) for name, t in totals.items()},
            }
            rows.append(row)
            points.update()
        runner.saved.clear()
    points.close()
    return rows


def run_longctx_bench(
    model: str,
    dtype: str,
    contexts: list[int],
    batches: list[int],
    ks: list[int],
    acceptance: float,
    sink_tokens: int,
    window_tokens: int,
    ngram_k: int,
    max_new_tokens: int,
    repeats: int,
    parts: list[str],
    out_path: Path,
) -> dict[str, Any]:
    configure_logging("console", "warning")  # the policy's per-step debug lines would drown the tables
    num_batch_tokens = max(batches) * (max(contexts) + max_new_tokens + max(ks) + ngram_k + 1)
    num_interference_tokens = prefill_latency.num_kv_tokens(max(contexts))
    config = EngineConfig(
        model=model,
        dtype=dtype,
        kv_cache_tokens=max(num_batch_tokens, num_interference_tokens),
        drafters=("self", "ngram"),
        self_spec_sink_tokens=sink_tokens,
        self_spec_window_tokens=window_tokens,
    )
    built, ready = build_runner(config, show_progress=True)
    runner = PrefilledRunner(built)
    tokenizer = TextTokenizer(ready.model_path)
    sources = source_token_ids(tokenizer, max(batches))
    report: dict[str, Any] = {
        "machine": machine_facts(),
        "model": model,
        "dtype": dtype,
        "device": ready.device,
        "window": {"sink_tokens": sink_tokens, "window_tokens": window_tokens},
        "max_new_tokens": max_new_tokens,
        "repeats_end_to_end": repeats,
        "sources": [f"{package}/{name}" for package, name in SOURCES[: max(batches)]],
    }
    if "step-costs" in parts:
        rows = step_costs(runner, contexts, batches, ks)
        add_kv_read_times(runner, rows, report["machine"]["memory_bandwidth_gbs"])
        for row in rows:
            row["predicted_speedup"] = {k: round(v, 3) for k, v in speedups(row, acceptance).items()}
        report |= {"acceptance_for_prediction": acceptance, "repeats": REPEATS, "step_costs": rows}
        print_step_costs(report)
    server = InProcessServer(runner, ready, tokenizer)
    # the start-up profile, timed once: every server below is warmed with it
    profile = server.profile() if {"end-to-end", "interference"} & set(parts) else {}
    if "end-to-end" in parts:
        servers = (server, InProcessServer(runner, ready, tokenizer))
        report["end_to_end"] = end_to_end(
            runner, servers, sources, contexts, batches, ks, ngram_k, max_new_tokens, repeats, profile
        )
        print_end_to_end(report)
    if "interference" in parts:
        report["prefill_interference"] = prefill_latency.with_and_without_cap(
            runner, ready, tokenizer, profile, sources[0][: max(contexts)], sources[-1]
        )
        prefill_latency.print_interference(report)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    out_path.write_text(json.dumps(report, indent=2) + "\n")
    print(f"wrote {out_path}")
    if "end-to-end" in parts:
        plot(report, out_path.with_suffix(".png"))
        print(f"wrote {out_path.with_suffix('.png')}")
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
    bandwidth = report["machine"]["memory_bandwidth_gbs"]
    for row in rows:
        if over := row.get("over_shortest"):
            print(
                f"context {row['context']}, batch {row['batch']}: {over['extra_ms']:.1f} ms more than at "
                f"{over['context']}; its extra KV ({over['extra_kv_mb']:.0f} MB) read once at {bandwidth} GB/s "
                f"(triad): {over['kv_read_ms']:.1f} ms, {over['extra_ms'] / over['kv_read_ms']:.2f}x that"
            )


def print_end_to_end(report: dict[str, Any]) -> None:
    rows = report["end_to_end"]
    names = list(rows[0]["variants"]) if rows else []
    print(
        f"\nend to end, {report['model']}, {report['dtype']}, {report['machine']['cpu_model']}: "
        f"{report['max_new_tokens']} new tokens per request, {report['repeats_end_to_end']} runs each taking "
        "turns, greedy; speedup of decode tok/s over plain's run of the same turn, median over runs "
        "(acceptance of drafted tokens in brackets)"
    )
    print(f"{'context':>7} {'batch':>5} {'plain tok/s':>11} " + " ".join(f"{name:>15}" for name in names[1:]))
    num_diverged = 0
    for row in rows:
        cells = []
        for name in names[1:]:
            v = row["variants"][name]
            num_diverged += v["num_diverged"]
            accepted = f"({v['acceptance']:.2f})" if v["acceptance"] is not None else ""
            cells.append(f"{v['speedup']:7.2f}x{accepted:>7}")
        plain = row["variants"]["plain"]["decode_tok_s"]
        print(f"{row['context']:7d} {row['batch']:5d} {plain:11.1f} " + " ".join(cells))
    print(f"outputs that differ from plain: {num_diverged}")
    print(
        "\nthe same runs by each request's own end: plain's mean time from the decoding's start to a "
        "request's last token over each variant's, median over runs"
    )
    print(f"{'context':>7} {'batch':>5} {'plain mean s':>12} " + " ".join(f"{name:>15}" for name in names[1:]))
    for row in rows:
        cells = [f"{row['variants'][name]['latency_speedup']:14.2f}x" for name in names[1:]]
        plain_s = row["variants"]["plain"]["mean_request_s"]
        print(f"{row['context']:7d} {row['batch']:5d} {plain_s:12.2f} " + " ".join(cells))


def plot(report: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = report["end_to_end"]
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for i, context in enumerate(sorted({row["context"] for row in rows})):
        points = [row for row in rows if row["context"] == context]
        batches = [row["batch"] for row in points]
        best_self = [
            max(v["speedup"] for name, v in row["variants"].items() if name.startswith("self")) for row in points
        ]
        auto = [row["variants"]["auto"]["speedup"] for row in points]
        color = f"C{i}"
        ax.plot(batches, best_self, "o-", color=color, label=f"{context} tokens: best self-speculation k")
        ax.plot(batches, auto, "s--", color=color, alpha=0.6, label=f"{context} tokens: AUTO")
    ax.axhline(1.0, color="grey", linewidth=0.8)
    ax.set_xscale("log", base=2)
    all_batches = sorted({row["batch"] for row in rows})
    ax.set_xticks(all_batches, labels=[str(b) for b in all_batches])
    ax.set_xlabel("batch (requests decoding together)")
    ax.set_ylabel("decode speedup over plain")
    ax.set_title(f"{report['model']}, {report['dtype']}, {report['machine']['cpu_model']}", fontsize=10)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
