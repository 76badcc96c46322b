"""`goodspeed speculator train MODEL`: trains an MLP speculator into the model cache."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from engine.catalog import DEFAULT_MODEL


def add_speculator(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    from engine.speculator.train_config import TrainConfig

    speculator = sub.add_parser("speculator", help="train an MLP speculator for a model (the mlp drafter)")
    verbs = speculator.add_subparsers(dest="verb", required=True)
    train = verbs.add_parser(
        "train",
        help="two stages on third-party code installed here: its hidden states, then the model's own "
        "generations; resumes an interrupted run",
    )
    defaults = TrainConfig(model=DEFAULT_MODEL)
    add = train.add_argument
    add("model", nargs="?", default=DEFAULT_MODEL, help="a known model name or a local HF directory")
    add("--time-budget-min", type=float, default=defaults.time_budget_s / 60, help="stop each phase at its share")
    add("--seed", type=int, default=defaults.seed)
    add("--num-heads", type=int, default=defaults.num_heads, help="the most tokens it proposes a step")
    add("--num-classes", type=int, default=defaults.num_classes, help="the most frequent tokens the heads name")
    add("--inner-dim", type=int, default=defaults.inner_dim, help="the heads' width (0: the model's hidden size)")
    add("--dtype", default=defaults.dtype, choices=["float32", "bfloat16"], help="the target's, while it reads")
    add("--code-chunks", type=int, default=defaults.num_code_chunks, help=f"of {defaults.chunk_tokens} tokens")
    add("--prompts", type=int, default=defaults.num_prompts, help=f"generations of {defaults.new_tokens} tokens")
    add("--stage1-steps", type=int, default=defaults.stage1_steps)
    add("--stage2-steps", type=int, default=defaults.stage2_steps)
    add("--warm-start", action="store_true", help="start the heads from the model's embeddings (experimental)")
    add("--fresh", action="store_true", help="discard an interrupted run's data and checkpoint")
    add("--output", default="bench-results/speculator-train.json", help="the figures, as JSON")


def run_speculator(args: argparse.Namespace) -> int:
    import shutil

    from engine.speculator.train import train_speculator, work_dir
    from engine.speculator.train_config import TrainConfig

    try:
        config = TrainConfig(
            model=args.model,
            num_heads=args.num_heads,
            num_classes=args.num_classes,
            inner_dim=args.inner_dim,
            dtype=args.dtype,
            num_code_chunks=args.code_chunks,
            num_prompts=args.prompts,
            stage1_steps=args.stage1_steps,
            stage2_steps=args.stage2_steps,
            seed=args.seed,
            time_budget_s=args.time_budget_min * 60,
            warm_start=args.warm_start,
        )
    except ValueError as exc:
        print(f"goodspeed speculator train: error: {exc}", file=sys.stderr)
        return 2
    if args.fresh:
        shutil.rmtree(work_dir(config.model), ignore_errors=True)
    try:
        manifest = train_speculator(config, Path(args.output))
    except RuntimeError as exc:
        print(f"goodspeed speculator train: error: {exc}", file=sys.stderr)
        return 1
    print_figures(manifest)
    print(f"figures written to {args.output}")
    return 0


def print_figures(manifest: dict[str, Any]) -> None:
    stages = {name: {k: v for k, v in figures.items() if k != "curve"} for name, figures in manifest["stages"].items()}
    summary = {key: manifest[key] for key in ("phase_seconds", "held_out", "cut_by_budget")}
    print(json.dumps(summary | {"stages": stages}, indent=1))
    print("learning curve: held-out tokens per greedy step at k = 1, 2, ... and head top-1 accuracy")
    print(f"{'stage':>5} {'step':>5} {'train min':>9}  {'generations':<24} {'code':<24} generations top-1")
    for name, figures in manifest["stages"].items():
        for point in figures["curve"]:
            generations, code = point["generations"], point["code"]
            print(
                f"{name:>5} {point['step']:>5} {point['training_seconds'] / 60:>9.1f}  "
                f"{fmt(generations['tokens_per_step_by_k']):<24} {fmt(code['tokens_per_step_by_k']):<24} "
                f"{fmt(generations['top1_by_head'])}"
            )


def fmt(values: list[float]) -> str:
    return " / ".join(f"{v:.2f}" for v in values)


def speculator_lines() -> list[str]:
    """For `goodspeed models list`: each trained speculator in the cache, with its held-out figures."""
    from engine.speculator.location import trained_speculators

    lines = []
    for model, manifest in trained_speculators():
        generations = manifest.get("held_out", {}).get("generations", {})
        per_step = generations.get("tokens_per_step_by_k", [])
        # trained before 2026-12-05, that figure was a mean over positions, which overstates steps
        is_old = "tokens_per_position_by_k" not in generations
        kind = " (an older mean over positions, which overstates steps)" if is_old else ""
        figures = f"{len(per_step)} heads, held-out tokens/step by k {per_step}{kind}" if per_step else "no figures"
        lines.append(f"  speculator for {model}: trained {manifest.get('trained_at', '?')}, {figures}")
    return lines
