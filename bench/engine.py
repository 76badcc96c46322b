"""`goodspeed bench engine`: batch-1 speculation and batched throughput of the engine, side by
side with transformers on the same prompts, model and dtype, in one run.

For each prompt every variant runs back to back (ours: plain and n-gram with each k; then
transformers `generate`, plain and with prompt lookup), so slow drifts of a noisy machine hit
all variants alike; ratios are computed from the same run. Tokens/s counts generated tokens over
the wall time of the whole request, prefill included, summed over prompts.
"""

from __future__ import annotations

import json
import platform
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, TypeVar

import torch

from bench.machine import cpu_model
from bench.workloads import WorkloadItem, build_workload
from engine.config import EngineConfig
from engine.drafters.base import Draft, Drafter, DraftRequest
from engine.fetch import resolve_model
from engine.offline import Job, run_alone, run_jobs
from engine.protocol import Offer
from engine.runner import ModelRunner
from engine.worker import build_drafter, build_runner
from server.tokenizer import TextTokenizer

T = TypeVar("T")


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

    @property
    def tokens_per_s(self) -> float:
        return self.num_tokens / self.seconds if self.seconds else 0.0

    @property
    def mean_accepted_length(self) -> float:
        """Tokens per decoding step, the bonus/recovered token included (plain decoding = 1)."""
        return self.num_tokens / self.num_steps if self.num_steps else 0.0

    def summary(self) -> dict[str, Any]:
        return {
            "tokens": self.num_tokens,
            "seconds": round(self.seconds, 3),
            "tokens_per_s": round(self.tokens_per_s, 2),
            "mean_accepted_length": round(self.mean_accepted_length, 3) if self.num_steps else None,
            "drafted": self.num_drafted,
            "accepted": self.num_accepted,
            "diverged_outputs": self.num_diverged,
            "divergence_logit_margins": [round(m, 4) for m in self.divergence_margins],
        }


class HFReference:
    """transformers `generate`, greedy, on the same weights and dtype (and the draft model's, for
    assisted generation)."""

    def __init__(self, model_path: str, dtype: torch.dtype, eos_ids: list[int], draft_path: str = "") -> None:
        from transformers import AutoModelForCausalLM

        self.model: Any = AutoModelForCausalLM.from_pretrained(model_path, dtype=dtype)
        self.assistant: Any = AutoModelForCausalLM.from_pretrained(draft_path, dtype=dtype) if draft_path else None
        self.eos_ids = eos_ids

    @torch.inference_mode()
    def generate(
        self, prompt_ids: list[int], max_new_tokens: int, prompt_lookup: int = 0, is_assisted: bool = False
    ) -> tuple[list[int], float]:
        extra: dict[str, Any] = {"prompt_lookup_num_tokens": prompt_lookup} if prompt_lookup else {}
        if is_assisted:
            extra["assistant_model"] = self.assistant
        started = time.perf_counter()
        out = self.model.generate(
            torch.tensor([prompt_ids]),
            attention_mask=torch.ones(1, len(prompt_ids), dtype=torch.long),
            max_new_tokens=max_new_tokens,
            do_sample=False,
            eos_token_id=self.eos_ids,
            pad_token_id=self.eos_ids[0],
            **extra,
        )
        return out[0, len(prompt_ids) :].tolist(), time.perf_counter() - started

    @torch.inference_mode()
    def top2_margin(self, token_ids: list[int]) -> float:
        """How close the model's next-token choice after token_ids is to a tie."""
        logits = self.model(torch.tensor([token_ids])).logits[0, -1].float()
        top2 = torch.topk(logits, 2).values
        return float(top2[0] - top2[1])

    @torch.inference_mode()
    def static_batch(self, prompts: list[list[int]], max_new_tokens: int) -> tuple[int, float]:
        """Left-padded static batch; returns (generated tokens, seconds)."""
        width = max(len(p) for p in prompts)
        pad = self.eos_ids[0]
        input_ids = torch.tensor([[pad] * (width - len(p)) + p for p in prompts])
        mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts])
        started = time.perf_counter()
        out = self.model.generate(
            input_ids,
            attention_mask=mask,
            max_new_tokens=max_new_tokens,
            do_sample=False,
            eos_token_id=self.eos_ids,
            pad_token_id=pad,
        )
        seconds = time.perf_counter() - started
        return sum(len(trim_at_eos(row, self.eos_ids)) for row in out[:, width:].tolist()), seconds


def trim_at_eos(token_ids: list[int], eos_ids: list[int]) -> list[int]:
    for i, token_id in enumerate(token_ids):
        if token_id in eos_ids:
            return token_ids[: i + 1]
    return token_ids


def record(stats: VariantStats, output: list[int], seconds: float, steps: int, drafted: int, accepted: int) -> None:
    stats.num_tokens += len(output)
    stats.seconds += seconds
    stats.num_steps += steps
    stats.num_drafted += drafted
    stats.num_accepted += accepted
    stats.outputs.append(output)


def batch_one(
    runner: ModelRunner,
    hf: HFReference | None,
    prompts: list[list[int]],
    max_new_tokens: int,
    variants: dict[str, tuple[Drafter, int]],
    eos_ids: list[int],
    hf_lookup: int,
) -> dict[str, VariantStats]:
    """variants: name -> (drafter, k) of ours; transformers' plain, prompt lookup and (with a
    draft model) assisted generation run after ours on each prompt."""
    stats = {name: VariantStats(name) for name in variants}
    hf_variants: dict[str, tuple[int, bool]] = {}
    if hf is not None:
        hf_variants = {"transformers plain": (0, False), f"transformers prompt lookup {hf_lookup}": (hf_lookup, False)}
        if hf.assistant is not None:
            hf_variants["transformers assisted (draft model)"] = (0, True)
    stats.update({name: VariantStats(name) for name in hf_variants})
    loaded = runner.drafter
    try:
        for i, ids in enumerate(prompts):
            for name, (drafter, k) in variants.items():
                runner.drafter = drafter
                job = run_alone(runner, Job(f"{i}-{name}", ids, max_new_tokens, num_draft_tokens=k), eos_ids)
                record(
                    stats[name], job.output_ids, job.elapsed_s, job.num_decode_steps, job.num_drafted, job.num_accepted
                )
            for name, (lookup, is_assisted) in hf_variants.items():
                assert hf is not None
                output, seconds = hf.generate(ids, max_new_tokens, lookup, is_assisted)
                record(stats[name], output, seconds, 0, 0, 0)
    finally:
        runner.drafter = loaded
    plain = stats["ours plain"].outputs
    for name, variant in stats.items():
        reference = stats["transformers plain"].outputs if name.startswith("transformers") else plain
        variant.num_diverged = sum(a != b for a, b in zip(variant.outputs, reference, strict=True))
        if hf is not None:
            variant.divergence_margins = divergence_margins(hf, prompts, variant.outputs, reference)
    return stats


def our_variants(
    runner: ModelRunner, ks: list[int], draft: Drafter | None, draft_ks: list[int]
) -> dict[str, tuple[Drafter, int]]:
    variants: dict[str, tuple[Drafter, int]] = {"ours plain": (runner.drafter, 0)}
    variants.update({f"ours ngram k={k}": (runner.drafter, k) for k in ks})
    if draft is not None:
        variants.update({f"ours draft model k={k}": (draft, k) for k in draft_ks})
    return variants


def divergence_margins(
    hf: HFReference, prompts: list[list[int]], outputs: list[list[int]], references: list[list[int]]
) -> list[float]:
    """For each output that differs from its reference: the transformers model's top-1 minus
    top-2 logit where they first differ (small = a near-tie that rounding can flip)."""
    return [
        hf.top2_margin(ids + common_prefix(a, b))
        for ids, a, b in zip(prompts, outputs, references, strict=True)
        if a != b
    ]


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
    from engine.drafters import NoDrafter

    ngram, none = TimedDrafter(runner.drafter), NoDrafter()
    seconds: dict[str, list[float]] = {"ngram k=0": [], "no drafter": []}
    ngram_seconds = 0.0
    for _ in range(repeats):
        for name, drafter in (("ngram k=0", ngram), ("no drafter", none)):
            runner.drafter = drafter
            tokens, elapsed = batched_throughput(runner, prompts, 16, 64, eos_ids)
            seconds[name].append(elapsed / tokens)
            if drafter is ngram:
                ngram_seconds += elapsed
    runner.drafter = ngram.inner
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
) -> dict[str, Any]:
    config = EngineConfig(model=model, dtype=dtype, kv_cache_tokens=16384 if draft_model else 65536)
    runner, ready = build_runner(config, show_progress=True)
    draft = None
    if draft_model:
        draft = build_drafter(
            replace(config, drafter="model", draft_model=draft_model), runner.model, ready.model_path, True
        )
    tokenizer = TextTokenizer(ready.model_path)
    eos = ready.eos_token_ids
    draft_path = resolve_model(draft_model, show_progress=False) if draft_model else ""
    hf = HFReference(ready.model_path, getattr(torch, dtype), eos, draft_path) if with_transformers else None
    warmup = tokenizer.encode("def warm_up():")
    run_alone(runner, Job("warmup", warmup, 8, num_draft_tokens=4), eos)
    if hf is not None:
        hf.generate(warmup, 8)
    report: dict[str, Any] = {
        "model": model,
        "draft_model": draft_model,
        "cpu": cpu_model(),
        "dtype": dtype,
        "device": ready.device,
        "num_prompts": num_prompts,
        "machine": {"cpu_count": torch.get_num_threads(), "platform": platform.platform()},
        "batch_one": {},
        "batched": {},
    }
    workloads: dict[str, list[WorkloadItem]] = {
        "editing": build_workload("editing", num_prompts),
        "completion": build_workload("completion", num_prompts),
    }
    for workload, items in workloads.items():
        prompts = [item.token_ids(tokenizer) for item in items]
        variants = our_variants(runner, ks, draft, list(draft_ks))
        stats = batch_one(runner, hf, prompts, items[0].max_new_tokens, variants, eos, hf_lookup)
        plain_tps = stats["ours plain"].tokens_per_s
        report["batch_one"][workload] = {
            name: {**s.summary(), "speedup_vs_ours_plain": round(s.tokens_per_s / plain_tps, 3)}
            for name, s in stats.items()
        }
        if hf is not None:
            ours, theirs = stats["ours plain"].outputs, stats["transformers plain"].outputs
            row = report["batch_one"][workload]["ours plain"]
            row["diverged_from_transformers_plain"] = sum(a != b for a, b in zip(ours, theirs, strict=True))
            row["transformers_divergence_logit_margins"] = [
                round(m, 4) for m in divergence_margins(hf, prompts, ours, theirs)
            ]
        print_batch_one(f"{workload}, {dtype}, greedy, {report['cpu']}", report["batch_one"][workload])
    batch_prompts = [item.token_ids(tokenizer) for item in build_workload("completion", max(concurrency))]
    for n in concurrency:
        tokens, seconds = batched_throughput(runner, batch_prompts, n, 64, eos)
        report["batched"][f"ours x{n}"] = throughput_row(tokens, seconds)
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
    if out_path is not None:
        out_path.parent.mkdir(parents=True, exist_ok=True)
        out_path.write_text(json.dumps(report, indent=2) + "\n")
        print(f"wrote {out_path}")
    return report


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
    if "diverged_from_transformers_plain" in rows["ours plain"]:
        ours = rows["ours plain"]
        print(
            f"ours plain vs transformers plain: {ours['diverged_from_transformers_plain']} outputs differ"
            + margins_text(ours["transformers_divergence_logit_margins"])
        )


def margins_text(margins: list[float]) -> str:
    return f"  (logit margins where they part: {', '.join(f'{m:.3f}' for m in margins)})" if margins else ""


def print_batched(dtype: str, rows: dict[str, dict[str, Any]]) -> None:
    print(f"\nbatched decode throughput, completion prompts, 64 new tokens, {dtype}, plain decoding")
    for name, row in rows.items():
        print(f"{name:34} {row['tokens_per_s']:8.1f} tok/s")
