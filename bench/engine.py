"""`goodspeed bench engine`: batch-1 speculation and batched throughput of the engine, side by
side with transformers on the same prompts, model and dtype, in one run.

For each prompt every variant runs back to back: ours (plain, n-gram with each k, the draft
model with each k when one is given, and AUTO choosing drafter and k, also without the MLP
speculator when one is trained, on an engine of its own), each through the server's
own scheduler and policy in this process (bench/in_process.py); then transformers `generate`
(plain, prompt lookup, assisted by the draft model) in a process of its own
(bench/hf_process.py). Slow drifts of a noisy machine hit all variants alike; ratios are computed
from the same run. Tokens/s counts generated tokens over the wall time of the whole request,
prefill included, summed over prompts; ours are also timed decoding alone (the tokens after each
request's first over the time after it), the figure the memory roofline bounds.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, TypeVar

import torch
from tqdm import tqdm

from api.speculation import SpeculationMode
from bench.hf_process import HFProcess
from bench.in_process import InProcessServer
from bench.machine import machine_facts, memory_bandwidth_gbs
from bench.roofline import TRIAD_REPEATS, roofline_tokens_per_s, spread
from bench.workloads import build_workload
from engine.config import EngineConfig, parse_drafters
from engine.drafters.base import Draft, Drafter, DraftRequest
from engine.drafters.mlp import MLPDrafter
from engine.drafters.ngram import NgramDrafter
from engine.fetch import resolve_model
from engine.model.spec import ModelSpec
from engine.offline import Job, run_jobs
from engine.protocol import EngineReady, Offer
from engine.runner import ModelRunner
from engine.speculator.location import find_trained
from engine.worker import build_runner
from server.app import configure_logging
from server.tokenizer import TextTokenizer

T = TypeVar("T")
PLAIN = "ours plain"


@dataclass
class VariantStats:
    name: str
    num_tokens: int = 0
    seconds: float = 0.0
    num_steps: int = 0
    num_drafted: int = 0
    num_accepted: int = 0
    num_diverged: int = 0  # outputs that differ from the plain output of the same engine
    # top-1 minus top-2 logit of transformers' model where a diverging output first differs
    divergence_margins: list[float] = field(default_factory=list)
    outputs: list[list[int]] = field(default_factory=list)
    steps_by_drafter: dict[str, int] = field(default_factory=dict)  # decoding steps each drafter drafted in
    # after each request's first token (ours only: transformers' generate reports no first token)
    num_decode_tokens: int = 0
    decode_seconds: float = 0.0
    request_decode_tokens_per_s: list[float] = field(default_factory=list)
    # ours plain only: the triad around each request (one just before, one just after, their mean)
    triads_gbs: list[float] = field(default_factory=list)

    @property
    def tokens_per_s(self) -> float:
        return self.num_tokens / self.seconds if self.seconds else 0.0

    @property
    def decode_tokens_per_s(self) -> float:
        """Decoding alone: the tokens after each request's first over the time after it."""
        return self.num_decode_tokens / self.decode_seconds if self.decode_seconds else 0.0

    @property
    def mean_accepted_length(self) -> float:
        """Tokens per decoding step, the bonus/recovered token included (plain decoding = 1)."""
        return self.num_tokens / self.num_steps if self.num_steps else 0.0

    def summary(self) -> dict[str, Any]:
        return {
            "tokens": self.num_tokens,
            "seconds": round(self.seconds, 3),
            "tokens_per_s": round(self.tokens_per_s, 2),
            "decode_tokens_per_s": round(self.decode_tokens_per_s, 2) if self.decode_seconds else None,
            "mean_accepted_length": round(self.mean_accepted_length, 3) if self.num_steps else None,
            "drafted": self.num_drafted,
            "accepted": self.num_accepted,
            "diverged_outputs": self.num_diverged,
            "divergence_logit_margins": [round(m, 4) for m in self.divergence_margins],
            "steps_by_drafter": self.steps_by_drafter,
        }


def record(
    stats: VariantStats,
    output: list[int],
    seconds: float,
    steps: int,
    drafted: int,
    accepted: int,
    first_token_s: float | None = None,
) -> None:
    stats.num_tokens += len(output)
    stats.seconds += seconds
    if first_token_s is not None and len(output) > 1:
        stats.num_decode_tokens += len(output) - 1
        stats.decode_seconds += seconds - first_token_s
        stats.request_decode_tokens_per_s.append((len(output) - 1) / (seconds - first_token_s))
    stats.num_steps += steps
    stats.num_drafted += drafted
    stats.num_accepted += accepted
    stats.outputs.append(output)


FIXED, AUTO, WITHOUT_MLP = "fixed", "auto", "auto without mlp"  # our control planes in a run


@dataclass(frozen=True, slots=True)
class Variant:
    """One of our batch-1 settings, as a request would ask for it, and the control plane that runs
    it (FIXED: the fixed settings and plain; AUTO: AUTO's own; WITHOUT_MLP: AUTO over an engine
    served without the speculator)."""

    mode: SpeculationMode
    num_draft_tokens: int = 0
    drafter: str = ""
    server: str = FIXED


def batch_one(
    servers: dict[str, InProcessServer],
    hf: HFProcess | None,
    prompts: list[list[int]],
    max_new_tokens: int,
    variants: dict[str, Variant],
    hf_lookup: int,
) -> dict[str, VariantStats]:
    """variants: name -> our setting, run by the server for its mode; transformers' plain, prompt
    lookup and (with a draft model) assisted generation run after ours on each prompt, in their
    own process."""
    stats = {name: VariantStats(name) for name in variants}
    hf_variants: dict[str, tuple[int, bool]] = {}
    if hf is not None:
        hf_variants = {"transformers plain": (0, False), f"transformers prompt lookup {hf_lookup}": (hf_lookup, False)}
        if hf.has_assistant:
            hf_variants["transformers assisted (draft model)"] = (0, True)
    stats.update({name: VariantStats(name) for name in hf_variants})
    for ids in tqdm(prompts, desc="prompts", unit="prompt"):
        for name, v in variants.items():
            is_plain = name == PLAIN
            triad_before = memory_bandwidth_gbs(TRIAD_REPEATS) if is_plain else 0.0
            outcome = servers[v.server].generate(ids, max_new_tokens, v.mode, v.num_draft_tokens, v.drafter)
            if is_plain:
                stats[name].triads_gbs.append((triad_before + memory_bandwidth_gbs(TRIAD_REPEATS)) / 2)
            spec = outcome.speculation
            # steps that made tokens: the decoding ones and the one that ended the prefill
            record(
                stats[name],
                outcome.output_ids,
                outcome.seconds,
                spec.num_steps + 1,
                spec.num_drafted,
                spec.num_accepted,
                outcome.first_token_s,
            )
            steps = stats[name].steps_by_drafter
            for drafter, usage in spec.by_drafter.items():
                steps[drafter] = steps.get(drafter, 0) + usage.num_steps
        for name, (lookup, is_assisted) in hf_variants.items():
            assert hf is not None
            output, seconds = hf.generate(ids, max_new_tokens, lookup, is_assisted)
            record(stats[name], output, seconds, 0, 0, 0)
    plain = stats[PLAIN].outputs
    for name, variant in stats.items():
        reference = stats["transformers plain"].outputs if name.startswith("transformers") else plain
        variant.num_diverged = sum(a != b for a, b in zip(variant.outputs, reference, strict=True))
        if hf is not None:
            variant.divergence_margins = divergence_margins(hf, prompts, variant.outputs, reference)
    return stats


def our_variants(drafters: list[str], ks: list[int], draft_ks: list[int], mlp_ks: list[int]) -> dict[str, Variant]:
    fixed = SpeculationMode.FIXED
    variants = {PLAIN: Variant(SpeculationMode.OFF)}
    if "ngram" in drafters:
        variants.update({f"ours ngram k={k}": Variant(fixed, k, "ngram") for k in ks})
    if "model" in drafters:
        variants.update({f"ours draft model k={k}": Variant(fixed, k, "model") for k in draft_ks})
    if "mlp" in drafters:
        variants.update({f"ours mlp speculator k={k}": Variant(fixed, k, "mlp") for k in mlp_ks})
    if drafters:
        variants[f"ours auto ({', '.join(drafters)})"] = Variant(SpeculationMode.AUTO, server=AUTO)
    if others := without_mlp(drafters):
        variants[f"ours auto ({', '.join(others)})"] = Variant(SpeculationMode.AUTO, server=WITHOUT_MLP)
    return variants


def without_mlp(drafters: Sequence[str]) -> tuple[str, ...]:
    """The other drafters, where the speculator is one of several (else none)."""
    return tuple(name for name in drafters if name != "mlp") if "mlp" in drafters else ()


def divergence_margins(
    hf: HFProcess, prompts: list[list[int]], outputs: list[list[int]], references: list[list[int]]
) -> list[float]:
    """For each output that differs from its reference: the transformers model's top-1 minus
    top-2 logit where they first differ (small = a near-tie that rounding can flip)."""
    return [
        hf.top2_margin(ids + common_prefix(a, b))
        for ids, a, b in zip(prompts, outputs, references, strict=True)
        if a != b
    ]


def summarize(stats: dict[str, VariantStats], roofline: float) -> dict[str, dict[str, Any]]:
    """Each variant's figures, with its speedup over ours plain and its share of the roofline."""
    plain_tps = stats[PLAIN].tokens_per_s
    return {
        name: {
            **s.summary(),
            "speedup_vs_ours_plain": round(s.tokens_per_s / plain_tps, 3),
            "fraction_of_roofline": round(s.tokens_per_s / roofline, 3),
            "decode_fraction_of_roofline": round(s.decode_tokens_per_s / roofline, 3) if s.decode_seconds else None,
        }
        for name, s in stats.items()
    }


def versus_transformers(hf: HFProcess, prompts: list[list[int]], stats: dict[str, VariantStats]) -> dict[str, Any]:
    """How many of ours plain outputs differ from transformers' plain ones, and the logit margins
    where they part."""
    ours, theirs = stats[PLAIN].outputs, stats["transformers plain"].outputs
    return {
        "diverged_from_transformers_plain": sum(a != b for a, b in zip(ours, theirs, strict=True)),
        "transformers_divergence_logit_margins": [round(m, 4) for m in divergence_margins(hf, prompts, ours, theirs)],
    }


def common_prefix(a: list[int], b: list[int]) -> list[int]:
    n = 0
    while n < min(len(a), len(b)) and a[n] == b[n]:
        n += 1
    return a[:n]


def batched_throughput(
    runner: ModelRunner, prompts: list[list[int]], num_concurrent: int, max_new_tokens: int, eos_ids: list[int]
) -> tuple[int, float]:
    """num_concurrent requests admitted together, plain decoding; returns (tokens, seconds)."""
    jobs = [Job(f"batch-{i}", prompts[i % len(prompts)], max_new_tokens) for i in range(num_concurrent)]
    started = time.perf_counter()
    run_jobs(runner, jobs, eos_ids)
    return sum(len(j.output_ids) for j in jobs), time.perf_counter() - started


class TimedDrafter(Drafter):
    """Wraps a drafter and adds up the time spent in it: the exact cost the drafter puts on a
    step, which a wall-clock comparison of two runs cannot resolve below the machine's noise."""

    def __init__(self, inner: Drafter) -> None:
        self.inner, self.name, self.seconds = inner, inner.name, 0.0
        self.sees_prefill = inner.sees_prefill

    def timed(self, call: Callable[[], T]) -> T:
        started = time.perf_counter()
        try:
            return call()
        finally:
            self.seconds += time.perf_counter() - started

    def add_request(self, req_id: str, token_ids: list[int], num_tokens: int) -> None:
        self.timed(lambda: self.inner.add_request(req_id, token_ids, num_tokens))

    def remove_request(self, req_id: str) -> None:
        self.timed(lambda: self.inner.remove_request(req_id))

    def propose(self, requests: list[DraftRequest]) -> list[Draft]:
        return self.timed(lambda: self.inner.propose(requests))

    def observe(self, req_id: str, num_drafted: int, num_accepted: int) -> None:
        self.timed(lambda: self.inner.observe(req_id, num_drafted, num_accepted))

    def offer(self, req_id: str, token_ids: list[int], num_draft_tokens: int) -> Offer:
        return self.timed(lambda: self.inner.offer(req_id, token_ids, num_draft_tokens))


def no_tax(runner: ModelRunner, prompts: list[list[int]], eos_ids: list[int], repeats: int = 3) -> dict[str, Any]:
    """Plain decoding (k = 0) of a batch of 16 with the n-gram drafter loaded (it still reports
    after every step how much it could propose) against no drafter at all, interleaved; and the
    time spent inside the drafter, as a share of the run."""
    loaded = runner.drafters
    ngram = TimedDrafter(NgramDrafter())
    seconds: dict[str, list[float]] = {"ngram k=0": [], "no drafter": []}
    ngram_seconds = 0.0
    try:
        for _ in range(repeats):
            with_ngram: dict[str, Drafter] = {"ngram": ngram}
            for name, drafters in (("ngram k=0", with_ngram), ("no drafter", {})):
                runner.drafters = drafters
                tokens, elapsed = batched_throughput(runner, prompts, 16, 64, eos_ids)
                seconds[name].append(elapsed / tokens)
                if drafters:
                    ngram_seconds += elapsed
    finally:
        runner.drafters = loaded
    mean = {name: sum(v) / len(v) for name, v in seconds.items()}
    return {
        "seconds_per_token": {name: round(v, 6) for name, v in mean.items()},
        "ngram_k0_over_no_drafter": round(mean["ngram k=0"] / mean["no drafter"], 4),
        "drafter_share_of_time": round(ngram.seconds / ngram_seconds, 6),
        "runs": repeats,
    }


def run_engine_bench(
    model: str,
    dtype: str,
    num_prompts: int,
    ks: list[int],
    concurrency: list[int],
    with_transformers: bool,
    hf_lookup: int = 8,
    out_path: Path | None = None,
    draft_model: str = "",
    draft_ks: tuple[int, ...] = (1, 2, 3, 4),
    workloads: tuple[str, ...] = ("editing", "completion"),
) -> dict[str, Any]:
    configure_logging("console", "warning")  # the policy's per-step debug lines would drown the tables
    drafters = parse_drafters(None, bool(draft_model), find_trained(model) is not None)
    config = EngineConfig(
        model=model,
        dtype=dtype,
        kv_cache_tokens=16384 if draft_model else 65536,
        drafters=drafters,
        draft_model=draft_model,
    )
    runner, ready = build_runner(config, show_progress=True)
    tokenizer = TextTokenizer(ready.model_path)
    eos = ready.eos_token_ids
    # Two control planes over the one engine: one for the fixed settings, one for AUTO, so that
    # AUTO's acceptance estimates come from its own earlier requests, as on a server, and not
    # from the fixed settings having just run the same prompt.
    servers = {FIXED: InProcessServer(runner, ready, tokenizer), AUTO: InProcessServer(runner, ready, tokenizer)}
    print("timing the start-up profile of the step-cost models, as the server does ...", flush=True)
    profile = servers[FIXED].profile()
    for each in servers.values():
        each.warm(profile)
    if others := without_mlp(drafters):
        # AUTO as served without the speculator (--drafters without mlp), on an engine of its own:
        # what the speculator adds to AUTO, its per-step offers' cost included
        print("loading an engine without the speculator, for AUTO without it ...", flush=True)
        runner_without, ready_without = build_runner(replace(config, drafters=others), show_progress=False)
        servers[WITHOUT_MLP] = InProcessServer(runner_without, ready_without, tokenizer)
        servers[WITHOUT_MLP].warm(servers[WITHOUT_MLP].profile())
    hf = None
    if with_transformers:
        draft_path = resolve_model(draft_model, show_progress=False) if draft_model else ""
        hf = HFProcess(ready.model_path, dtype, eos, draft_path)
    try:
        report = measure(
            runner, ready, servers, hf, tokenizer, num_prompts, ks, concurrency, hf_lookup, draft_ks, workloads
        )
    finally:
        if hf is not None:
            hf.close()
    report.update(model=model, draft_model=draft_model, dtype=dtype)
    if out_path is not None:
        out_path.parent.mkdir(parents=True, exist_ok=True)
        out_path.write_text(json.dumps(report, indent=2) + "\n")
        print(f"wrote {out_path}")
    return report


def measure(
    runner: ModelRunner,
    ready: EngineReady,
    servers: dict[str, InProcessServer],
    hf: HFProcess | None,
    tokenizer: TextTokenizer,
    num_prompts: int,
    ks: list[int],
    concurrency: list[int],
    hf_lookup: int,
    draft_ks: tuple[int, ...],
    workloads: tuple[str, ...],
) -> dict[str, Any]:
    eos, dtype = ready.eos_token_ids, ready.dtype
    warmup = tokenizer.encode("def warm_up():")
    servers[FIXED].generate(warmup, 8, SpeculationMode.FIXED, 4)
    if hf is not None:
        hf.generate(warmup, 8)
    machine = machine_facts()
    roofline = roofline_tokens_per_s(runner.model.spec, runner.model.dtype, machine["memory_bandwidth_gbs"])
    report: dict[str, Any] = {
        "cpu": machine["cpu_model"],
        "device": ready.device,
        "num_prompts": num_prompts,
        "machine": machine,
        "roofline_tokens_per_s": round(roofline, 1),
        "batch_one": {},
        "triad_gbs_after": {},  # by workload: the triad again once it has run
        "batched": {},
    }
    print(
        f"{machine['cpu_model']} ({', '.join(machine['cpu_flags'])}), triad {machine['memory_bandwidth_gbs']} GB/s: "
        f"reading the weights once per token bounds batch-1 decoding at {roofline:.1f} tok/s in {dtype}"
    )
    mlp = runner.drafters.get("mlp")
    mlp_ks = list(range(1, mlp.num_heads + 1)) if isinstance(mlp, MLPDrafter) else []
    variants = our_variants(list(ready.drafters), ks, list(draft_ks), mlp_ks)
    for workload in workloads:
        items = build_workload(workload, num_prompts)
        prompts = [item.token_ids(tokenizer) for item in items]
        stats = batch_one(servers, hf, prompts, items[0].max_new_tokens, variants, hf_lookup)
        plain_tps = stats[PLAIN].tokens_per_s
        report["batch_one"][workload] = summarize(stats, roofline)
        if hf is not None:
            report["batch_one"][workload][PLAIN].update(versus_transformers(hf, prompts, stats))
        print_batch_one(f"{workload}, {dtype}, greedy, {report['cpu']}", report["batch_one"][workload])
        plain = stats[PLAIN]
        # The triad moves from run to run on a shared host (28-44 GB/s on one machine in a day):
        # taken again after the workload, it shows how far the share rests on the first reading.
        triad_after = round(memory_bandwidth_gbs(), 1)
        report["triad_gbs_after"][workload] = triad_after
        roofline_after = roofline_tokens_per_s(runner.model.spec, runner.model.dtype, triad_after)
        beside = shares_beside_triads(plain, runner.model.spec, runner.model.dtype)
        report["batch_one"][workload][PLAIN]["decode_fraction_of_roofline_beside_triads"] = beside
        print(
            f"ours plain: decoding at {plain.decode_tokens_per_s:.1f} tok/s after the first token, "
            f"{plain.decode_tokens_per_s / roofline:.0%} of the memory roofline ({roofline:.1f} tok/s); "
            f"{plain_tps / roofline:.0%} over whole requests, prefill included; with the triad taken "
            f"after this workload ({triad_after} GB/s) decoding is at "
            f"{plain.decode_tokens_per_s / roofline_after:.0%}\n"
            f"ours plain, each request against the triad around it ({min(plain.triads_gbs):.1f}-"
            f"{max(plain.triads_gbs):.1f} GB/s): decoding at {beside['median']:.0%} of the roofline, median of "
            f"{len(beside['shares'])} ({beside['min']:.0%}-{beside['max']:.0%})"
        )
    if not concurrency:
        return report
    batch_prompts = [item.token_ids(tokenizer) for item in build_workload("completion", max(concurrency))]
    for n in concurrency:
        tokens, seconds = batched_throughput(runner, batch_prompts, n, 64, eos)
        report["batched"][f"ours x{n}"] = throughput_row(tokens, seconds)
        # plain and AUTO through the server's scheduler and policy, alternating: a burst of n
        for label, row in burst_rounds(servers, batch_prompts[:n], BURST_ROUNDS).items():
            report["batched"][f"ours {label} x{n} (scheduler)"] = row
    if hf is not None:
        n = max(concurrency)
        report["batched"][f"transformers static x{n}"] = throughput_row(*hf.static_batch(batch_prompts[:n], 64))
    report["no_tax"] = no_tax(runner, batch_prompts, eos)
    print_batched(dtype, report["batched"])
    tax = report["no_tax"]
    print(
        f"\nk = 0 with the n-gram drafter vs no drafter, batch 16: {tax['ngram_k0_over_no_drafter']:.4f}x the "
        f"time per token ({tax['runs']} interleaved runs each); time inside the drafter: "
        f"{tax['drafter_share_of_time']:.3%} of the run"
    )
    return report


def shares_beside_triads(plain: VariantStats, spec: ModelSpec, dtype: torch.dtype) -> dict[str, Any]:
    """Each plain request's decoding against the roofline of the triad taken around it."""
    shares = [
        tps / roofline_tokens_per_s(spec, dtype, triad)
        for tps, triad in zip(plain.request_decode_tokens_per_s, plain.triads_gbs, strict=True)
    ]
    return {
        **spread(shares),
        "shares": [round(share, 3) for share in shares],
        "triads_gbs": [round(triad, 1) for triad in plain.triads_gbs],
    }


BURST_ROUNDS = 3


def burst_rounds(
    servers: dict[str, InProcessServer], prompts: list[list[int]], num_rounds: int
) -> dict[str, dict[str, float]]:
    """The prompts arriving together, 64 new tokens each, under OFF and AUTO (and AUTO without the
    speculator, where there is one) in turn, num_rounds times: throughput over all rounds, and how
    long it took until every request had its first token (the ramp-up, where chunked prefill and
    drafts compete)."""
    turns = {"plain": (FIXED, SpeculationMode.OFF), "auto": (AUTO, SpeculationMode.AUTO)}
    if WITHOUT_MLP in servers:
        turns[WITHOUT_MLP] = (WITHOUT_MLP, SpeculationMode.AUTO)
    totals = {label: [0, 0.0, 0.0] for label in turns}  # tokens, seconds, seconds to all started
    for _ in range(num_rounds):
        for label, (server, mode) in turns.items():
            started = time.perf_counter()
            outcomes, decode_s = servers[server].generate_batch(prompts, 64, mode)
            seconds = time.perf_counter() - started
            total = totals[label]
            total[0] += sum(len(outcome.output_ids) for outcome in outcomes)
            total[1] += seconds
            total[2] += seconds - decode_s
    return {
        label: {**throughput_row(int(tokens), seconds), "all_started_s": round(ramp_s / num_rounds, 2)}
        for label, (tokens, seconds, ramp_s) in totals.items()
    }


def throughput_row(tokens: int, seconds: float) -> dict[str, float]:
    return {"tokens": tokens, "seconds": round(seconds, 3), "tokens_per_s": round(tokens / seconds, 2)}


def print_batch_one(title: str, rows: dict[str, dict[str, Any]]) -> None:
    print(f"\nbatch 1, {title}")
    print(f"{'variant':34} {'tok/s':>8} {'speedup':>8} {'accepted/step':>14} {'diverged':>9}")
    for name, row in rows.items():
        mal = row["mean_accepted_length"]
        mal_text = f"{mal:.2f}" if mal is not None else "-"
        print(
            f"{name:34} {row['tokens_per_s']:8.1f} {row['speedup_vs_ours_plain']:7.2f}x {mal_text:>14} "
            f"{row['diverged_outputs']:>9}" + margins_text(row["divergence_logit_margins"])
        )
    if "diverged_from_transformers_plain" in rows[PLAIN]:
        ours = rows[PLAIN]
        print(
            f"ours plain vs transformers plain: {ours['diverged_from_transformers_plain']} outputs differ"
            + margins_text(ours["transformers_divergence_logit_margins"])
        )


def margins_text(margins: list[float]) -> str:
    return f"  (logit margins where they part: {', '.join(f'{m:.3f}' for m in margins)})" if margins else ""


def print_batched(dtype: str, rows: dict[str, dict[str, Any]]) -> None:
    print(
        f"\nbatched throughput, completion prompts, 64 new tokens, {dtype} (xN: plain, N admitted together; "
        f"through the scheduler: {BURST_ROUNDS} rounds, OFF and AUTO taking turns)"
    )
    for name, row in rows.items():
        ramp = f"  (all started after {row['all_started_s']:.2f} s)" if "all_started_s" in row else ""
        print(f"{name:34} {row['tokens_per_s']:8.1f} tok/s{ramp}")
