"""`goodspeed speculator train MODEL`: the two-stage recipe of the IBM speculator paper, on a CPU.

Phases, each resumable (its result is kept in a work directory beside the speculator's and a
rerun skips what is there; training checkpoints every few steps):

1. code states: the target reads chunks of third-party code (engine/speculator/corpus.py); its
   hidden states (bfloat16) and its own next-token choices are kept, with the held-out packages'
   chunks for evaluation;
2. generations: the target writes greedily from prompts cut from the training chunks, keeping
   the hidden state of each step it decodes (and from held-out prompts, for evaluation);
3. stage 1: fed the text's tokens, the heads learn what the target would write 2, 3, ... tokens
   on (teacher forcing; data.py says why its choices and not the text);
4. stage 2: the heads learn what this model writes;
5. evaluation: per-head top-1 accuracy on held-out code and held-out generations, and the
   tokens per step that accuracy implies for greedy decoding at each k.

The generations come before stage 1 (they do not depend on the heads) so that both stages can be
scored on the same held-out sets as they go: the manifest's learning curve, accuracy against
training time, which is what says whether more time or more data would pay.

The time budget is shared out by fixed fractions; a phase that reaches its share stops early
(the manifest says which did). With the same seed and no phase cut short, a run is repeatable.
"""

from __future__ import annotations

import json
import math
import os
import random
import shutil
import time
from collections.abc import Callable
from dataclasses import asdict
from itertools import islice
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from tqdm import tqdm

from engine.fetch import resolve_model
from engine.model.loader import load_transformer
from engine.model.transformer import Transformer
from engine.speculator import corpus
from engine.speculator.data import IGNORE, Records, generated, teacher_forced
from engine.speculator.location import speculator_dir
from engine.speculator.model import MLPSpeculator, SpeculatorConfig
from engine.speculator.store import TrainedSpeculator, save
from engine.speculator.train_config import TrainConfig

# Shares of the time budget, in order; a phase may use what earlier ones left.
# The model's own generations teach the heads most (stage 2 lifted held-out tokens per step
# from 1.51 to 1.71 where stage 1 had levelled off after ~750 steps; docs/speculator.md), so
# they get the larger shares.
PHASES = (("code states", 0.12), ("generations", 0.3), ("stage 1", 0.2), ("stage 2", 0.3), ("evaluation", 0.08))
CHECKPOINT_EVERY = 25  # training steps
CURVE_POINTS = 8  # held-out evaluations per stage, for the learning curve
EVAL_BATCH = 16  # records per evaluation forward


class Budget:
    """Deadlines per phase: phase i may run until its cumulative share of the budget has passed."""

    def __init__(self, total_s: float) -> None:
        self.started = time.monotonic()
        self.total_s = total_s
        self.cut: list[str] = []

    def deadline(self, phase: str) -> Callable[[], bool]:
        index = [name for name, _ in PHASES].index(phase)
        end = self.started + self.total_s * sum(share for _, share in PHASES[: index + 1])

        def is_past() -> bool:
            if time.monotonic() < end:
                return False
            if phase not in self.cut:
                self.cut.append(phase)
            return True

        return is_past


def work_dir(model: str) -> Path:
    directory = speculator_dir(model)
    return directory.with_name(directory.name + ".work")


def save_atomic(obj: Any, path: Path) -> None:
    staging = path.with_name(path.name + ".tmp")
    torch.save(obj, staging)
    os.replace(staging, path)


def top_classes(chunks: list[list[int]], num_classes: int, vocab_size: int) -> torch.Tensor:
    """The num_classes most frequent token ids of the chunks, most frequent first."""
    counts = torch.bincount(torch.tensor([t for c in chunks for t in c]), minlength=vocab_size)
    return torch.argsort(counts, descending=True, stable=True)[:num_classes]


def to_classes(ids: torch.Tensor, classes: torch.Tensor) -> torch.Tensor:
    """Target ids (IGNORE kept) -> speculator classes; classes: [V] the class of each target id."""
    return torch.where(ids == IGNORE, IGNORE, classes[ids.clamp(min=0)])


def head_logits(spec: MLPSpeculator, states: torch.Tensor, next_classes: torch.Tensor) -> torch.Tensor:
    """states: [B, L, hidden]; next_classes: [B, L], the classes of the tokens read after each
    position -> [heads, B, L - heads, C]."""
    n = states.shape[1] - spec.config.num_heads
    inputs = next_classes[:, : n + spec.config.num_heads - 1].clamp(min=0)
    logits: torch.Tensor = spec(states[:, :n].float(), inputs)
    return logits


def head_targets(label_classes: torch.Tensor, num_heads: int) -> torch.Tensor:
    """[B, L] -> [heads, B, L - heads]: head i at position t learns label_classes[t + i + 1]."""
    n = label_classes.shape[1] - num_heads
    return torch.stack([label_classes[:, i + 1 : i + 1 + n] for i in range(num_heads)])


def loss_of(
    spec: MLPSpeculator, states: torch.Tensor, next_classes: torch.Tensor, label_classes: torch.Tensor
) -> torch.Tensor:
    """[heads]: each head's mean cross-entropy over the positions it has a target for."""
    logits = head_logits(spec, states, next_classes)
    targets = head_targets(label_classes, spec.config.num_heads)
    losses = F.cross_entropy(logits.flatten(0, 2), targets.flatten(), ignore_index=IGNORE, reduction="none")
    counts = (targets != IGNORE).flatten(1).sum(dim=1).clamp(min=1)
    return losses.view(spec.config.num_heads, -1).sum(dim=1) / counts


def learning_rate(step: int, num_steps: int, peak: float) -> float:
    """Linear warm-up over the first 5% of steps, then a cosine down to a tenth of the peak."""
    warmup = max(1, num_steps // 20)
    if step < warmup:
        return peak * (step + 1) / warmup
    progress = (step - warmup) / max(1, num_steps - warmup)
    return peak * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(progress, 1.0))))


def train_stage(
    spec: MLPSpeculator,
    records: Records,
    classes: torch.Tensor,
    config: TrainConfig,
    stage: int,
    num_steps: int,
    checkpoint: Path,
    deadline: Callable[[], bool],
    held_out: dict[str, Records],
    seconds_before: float = 0.0,
) -> dict[str, Any]:
    """Resumes from the checkpoint when it is of this stage (or returns the figures it kept of
    this stage, when a later one had begun); returns the stage's figures, with its learning curve:
    the held-out sets' figures every num_steps / CURVE_POINTS steps and at its end, against the
    training seconds of both stages (seconds_before: stage 1's, in stage 2)."""
    optimizer = torch.optim.AdamW(spec.parameters(), lr=config.learning_rate, weight_decay=0.01)
    step, losses, seconds, curve = 0, [], 0.0, []
    finished: dict[int, dict[str, Any]] = {}  # figures of the stages done, carried in the checkpoint
    if checkpoint.is_file():
        state = torch.load(checkpoint, weights_only=False)
        finished = state.get("finished", {})
        if stage in finished:
            return finished[stage]
        if state["stage"] == stage:
            optimizer.load_state_dict(state["optimizer"])
            step, losses, seconds, curve = state["step"], state["losses"], state["seconds"], state.get("curve", [])

    def save_checkpoint() -> None:
        state = {"stage": stage, "step": step, "losses": losses, "seconds": seconds, "curve": curve}
        state |= {"finished": finished, "model": spec.state_dict(), "optimizer": optimizer.state_dict()}
        save_atomic(state, checkpoint)

    def add_curve_point() -> None:
        point = {"step": step, "training_seconds": round(seconds_before + seconds, 2)}
        curve.append(point | {name: evaluate(spec, held, classes) for name, held in held_out.items()})

    curve_every = max(1, num_steps // CURVE_POINTS)
    next_classes = to_classes(records.next_ids, classes)
    label_classes = to_classes(records.label_ids, classes)
    num_records = records.states.shape[0]
    progress = tqdm(total=num_steps, initial=step, desc=f"stage {stage}", unit="step")
    while step < num_steps and not deadline():
        started = time.perf_counter()
        rows = torch.randperm(num_records, generator=torch.Generator().manual_seed(config.seed * 1_000_003 + step))
        rows = rows[: config.batch_records]
        for group in optimizer.param_groups:
            group["lr"] = learning_rate(step, num_steps, config.learning_rate)
        head_losses = loss_of(spec, records.states[rows], next_classes[rows], label_classes[rows])
        optimizer.zero_grad(set_to_none=True)
        head_losses.sum().backward()  # type: ignore[no-untyped-call]
        torch.nn.utils.clip_grad_norm_(spec.parameters(), 1.0)
        optimizer.step()
        step += 1
        seconds += time.perf_counter() - started
        losses.append([round(float(x), 4) for x in head_losses.detach()])
        progress.update(1)
        progress.set_postfix(loss=f"{sum(losses[-1]) / len(losses[-1]):.3f}")
        if step % curve_every == 0:
            add_curve_point()
        if step % CHECKPOINT_EVERY == 0:
            save_checkpoint()
    progress.close()
    if step and (not curve or curve[-1]["step"] != step):  # cut short by the budget, or fewer steps than points
        add_curve_point()
    recent = losses[-20:]
    figures = {
        "steps": step,
        "positions": step * config.batch_records * (records.states.shape[1] - config.num_heads),
        "seconds": round(seconds, 1),
        "first_loss_by_head": losses[0] if losses else [],
        "final_loss_by_head": [round(sum(col) / len(col), 4) for col in zip(*recent, strict=True)] if recent else [],
        "curve": curve,
    }
    finished[stage] = figures
    save_checkpoint()
    return figures


@torch.no_grad()
def evaluate(spec: MLPSpeculator, records: Records, classes: torch.Tensor) -> dict[str, Any]:
    """Teacher-forced top-1 accuracy per head against what the target would write ("other" never
    counts as right, as it is never proposed), and the tokens per greedy step at each k: over each
    record, the chain of steps serving takes (greedy_chain_steps). On generations a greedy chain
    feeds each head its predecessor's pick, which is the token read whenever the prefix is right,
    so this is what verification would accept; on code the heads read the text, not the target's
    choices, so it is an estimate. tokens_per_position_by_k is the mean over every position of
    1 + the right prefix of heads, which overstates steps (greedy_chain_steps says why); the
    learning curves before 2026-12-05 reported it as tokens per step."""
    heads, other = spec.config.num_heads, spec.config.vocab_size - 1
    num_right = torch.zeros(heads)
    num_prefix = torch.zeros(heads)  # positions whose heads 0..j are all right
    num_positions = 0
    num_chain_positions, num_chain_steps = 0, [0] * heads  # per k
    next_classes = to_classes(records.next_ids, classes)
    label_classes = to_classes(records.label_ids, classes)
    for start in range(0, records.states.shape[0], EVAL_BATCH):
        rows = slice(start, start + EVAL_BATCH)
        logits = head_logits(spec, records.states[rows], next_classes[rows])
        logits[..., other] = float("-inf")
        targets = head_targets(label_classes[rows], heads)
        is_valid = targets[0] != IGNORE
        is_right = (logits.argmax(dim=-1) == targets) & is_valid  # [heads, B, n]
        num_right += is_right.flatten(1).sum(dim=1)
        num_prefix += is_right.cumprod(dim=0).flatten(1).sum(dim=1)
        num_positions += int(is_valid.sum())
        for b, record_valid in enumerate(is_valid):
            num_valid = int(record_valid.cumprod(dim=0).sum())  # up to its first end-of-sequence
            record_right = is_right[:, b].tolist()
            num_chain_positions += num_valid
            for k in range(1, heads + 1):
                num_chain_steps[k - 1] += greedy_chain_steps(record_right, num_valid, k)
    prefix = (num_prefix / max(num_positions, 1)).tolist()
    return {
        "positions": num_positions,
        "top1_by_head": [round(x / max(num_positions, 1), 4) for x in num_right.tolist()],
        "tokens_per_step_by_k": [round(num_chain_positions / max(steps, 1), 3) for steps in num_chain_steps],
        "tokens_per_position_by_k": [round(1 + sum(prefix[:k]), 3) for k in range(1, heads + 1)],
    }


def greedy_chain_steps(is_right: list[list[bool]], num_positions: int, k: int) -> int:
    """is_right[head][position] -> the steps a served greedy request takes over the first
    num_positions positions, drafting k tokens a step: a step at position p emits 1 + the heads
    right in a row there (at most k), and the next step starts after them. Averaging 1 + the
    right prefix over every position instead overstates this: a step that accepts tokens skips
    the positions in between, so the stretches where the heads are right take few steps and count
    for little. On HumanEval completion (6 prompts, float32) the average said 1.64 tokens a step
    at k = 3 where serving made 1.45, and this chain 1.45 (docs/speculator.md)."""
    num_steps = position = 0
    while position < num_positions:
        num_accepted = 0
        while num_accepted < k and is_right[num_accepted][position]:
            num_accepted += 1
        num_steps += 1
        position += 1 + num_accepted
    return num_steps


def train_speculator(
    config: TrainConfig,
    output: Path | None = None,
    encode: Callable[[str], list[int]] | None = None,
    source_dirs: list[Path] | None = None,
) -> dict[str, Any]:
    """Runs (or resumes) every phase, saves the speculator into the cache and returns its manifest.
    encode: the model's tokenizer unless given; source_dirs: site-packages unless given (both
    for tests on tiny models)."""
    from engine.worker import read_eos_token_ids

    budget = Budget(config.time_budget_s)
    torch.manual_seed(config.seed)
    path = resolve_model(config.model)
    target = load_transformer(path, getattr(torch, config.dtype), torch.device("cpu"))
    encode = encode or tokenizer_encode(path)
    work = work_dir(config.model)
    work.mkdir(parents=True, exist_ok=True)
    phase_s: dict[str, float] = {}

    files = corpus.source_files(source_dirs)
    training_files, held_out_files = corpus.split(files)
    fingerprint = corpus.fingerprint(files)
    code = phase(work / "code.pt", phase_s, "code states", lambda: read_code(target, encode, files, config, budget))
    if code["fingerprint"] != fingerprint or code["config"] != data_key(config):
        raise RuntimeError(
            f"{work} holds data from another corpus or configuration; delete it (or pass --fresh) to start over"
        )
    classes = torch.full((target.spec.vocab_size,), config.num_classes, dtype=torch.long)
    classes[code["token_ids"]] = torch.arange(config.num_classes)

    spec = MLPSpeculator(
        SpeculatorConfig(target.spec.hidden_size, config.num_classes + 1, config.num_heads, config.inner_dim)
    )
    if config.warm_start:
        warm_start(spec, target.weights.embed.float().cpu(), code["token_ids"])
    checkpoint = work / "checkpoint.pt"
    if checkpoint.is_file():
        spec.load_state_dict(torch.load(checkpoint, weights_only=False)["model"])
    code_records, held_code = Records(**code["train"]), Records(**code["held_out"])
    eos_ids = set(read_eos_token_ids(path))
    gens = phase(
        work / "generations.pt",
        phase_s,
        "generations",
        lambda: write_generations(target, code_records, held_code, eos_ids, config, budget),
    )
    gen_records, held_gen = Records(**gens["train"]), Records(**gens["held_out"])
    held_out_sets = {"code": held_code, "generations": held_gen}
    stage1 = train_stage(
        spec,
        code_records,
        classes,
        config,
        1,
        config.stage1_steps,
        checkpoint,
        budget.deadline("stage 1"),
        held_out_sets,
    )
    stage2 = train_stage(
        spec,
        gen_records,
        classes,
        config,
        2,
        config.stage2_steps,
        checkpoint,
        budget.deadline("stage 2"),
        held_out_sets,
        stage1["seconds"],
    )
    started = time.perf_counter()
    spec.eval()
    held_out = {"code": evaluate(spec, held_code, classes), "generations": evaluate(spec, held_gen, classes)}
    phase_s["evaluation"] = round(time.perf_counter() - started, 1)
    manifest = {
        "model": config.model,
        "train_config": asdict(config),
        "corpus": {
            "fingerprint": fingerprint,
            "num_files": len(training_files),
            "num_held_out_files": len(held_out_files),
            "held_out_packages": sorted(corpus.held_out_packages(files)),
            # of what the target writes on held-out code: what its drafts would have to name
            "class_coverage_held_out": coverage(code["token_ids"], held_code.label_ids),
        },
        "phase_seconds": phase_s,
        # positions read: code chunks x their length, generations x new tokens (EOS padding included)
        "data_positions": {"code": positions(code_records), "generations": positions(gen_records)},
        "stages": {"1": stage1, "2": stage2},
        "held_out": held_out,
        "cut_by_budget": budget.cut,
        "seconds": round(time.monotonic() - budget.started, 1),
        "trained_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    trained = TrainedSpeculator(spec, code["token_ids"], manifest)
    save(speculator_dir(config.model), trained)
    if output is not None:
        output.parent.mkdir(parents=True, exist_ok=True)
        output.write_text(json.dumps(manifest, indent=2) + "\n")
    shutil.rmtree(work)
    return manifest


@torch.no_grad()
def warm_start(spec: MLPSpeculator, embed: torch.Tensor, token_ids: torch.Tensor) -> None:
    """Starts the heads in the target's own space: every projection the identity (a head's state
    begins as the target's hidden state), the embeddings and the output rows of the named tokens
    the target's token embeddings (which SmolLM2 ties to its output layer), "other" at zero.
    embed: [V, hidden]; token_ids: [C - 1], the target id of each class."""
    if spec.config.width != spec.config.emb_dim:
        raise ValueError("a warm start needs the heads as wide as the target's hidden state (inner_dim 0)")
    named = embed[token_ids]  # [C - 1, hidden]
    for proj in spec.proj:
        proj.get_parameter("weight").copy_(torch.eye(spec.config.width))
    for module in (*spec.emb, *spec.head):
        weight = module.get_parameter("weight")
        weight.zero_()
        weight[: len(token_ids)] = named


def phase(path: Path, phase_s: dict[str, float], name: str, run: Callable[[], dict[str, Any]]) -> dict[str, Any]:
    """A data phase's result: loaded when an earlier run left it, else run and saved."""
    if path.is_file():
        loaded: dict[str, Any] = torch.load(path, weights_only=False)
        phase_s[name] = loaded["seconds"]
        return loaded
    started = time.perf_counter()
    result = run()
    result["seconds"] = phase_s[name] = round(time.perf_counter() - started, 1)
    save_atomic(result, path)
    return result


def data_key(config: TrainConfig) -> dict[str, Any]:
    """The settings the cached data depends on."""
    names = ("model", "num_classes", "dtype", "chunk_tokens", "num_code_chunks", "num_held_out_chunks", "seed")
    return {name: getattr(config, name) for name in names}


def tokenizer_encode(path: str) -> Callable[[str], list[int]]:
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(path)

    def encode(text: str) -> list[int]:
        ids: list[int] = tokenizer.encode(text, add_special_tokens=False)
        return ids

    return encode


def read_code(
    target: Transformer,
    encode: Callable[[str], list[int]],
    files: list[corpus.SourceFile],
    config: TrainConfig,
    budget: Budget,
) -> dict[str, Any]:
    training, held_out = corpus.split(files)
    length = config.chunk_tokens + 1
    chunks = list(islice(corpus.token_chunks(training, encode, length, config.seed), config.num_code_chunks))
    held = list(islice(corpus.token_chunks(held_out, encode, length, config.seed), config.num_held_out_chunks))
    token_ids = top_classes(chunks, config.num_classes, target.spec.vocab_size)
    deadline = budget.deadline("code states")
    train = teacher_forced(target, chunks, config.batch_records, deadline, "code states")
    held_records = teacher_forced(target, held, config.batch_records, lambda: False, "held-out code")
    return {
        "fingerprint": corpus.fingerprint(files),
        "config": data_key(config),
        "token_ids": token_ids,
        "train": train.as_dict(),
        "held_out": held_records.as_dict(),
    }


def write_generations(
    target: Transformer, code: Records, held_code: Records, eos_ids: set[int], config: TrainConfig, budget: Budget
) -> dict[str, Any]:
    """Prompts: prompt_tokens from a random place of a chunk (its next_ids are the chunk's text).
    The held-out prompts are drawn with their own generator, so that runs with more or fewer
    training prompts are scored on the same held-out generations."""

    def prompts(records: Records, count: int, rng: random.Random) -> list[list[int]]:
        out = []
        for _ in range(count):
            row = rng.randrange(records.next_ids.shape[0])
            start = rng.randrange(records.next_ids.shape[1] - config.prompt_tokens)
            out.append(records.next_ids[row, start : start + config.prompt_tokens].tolist())
        return out

    def write(records: Records, count: int, seed: int, deadline: Callable[[], bool], description: str) -> Records:
        chosen = prompts(records, count, random.Random(seed))
        return generated(target, chosen, config.new_tokens, eos_ids, config.generation_batch, deadline, description)

    train = write(code, config.num_prompts, config.seed + 2, budget.deadline("generations"), "generations")
    held = write(held_code, config.num_held_out_prompts, config.seed + 3, lambda: False, "held-out generations")
    return {"train": train.as_dict(), "held_out": held.as_dict()}


def positions(records: Records) -> int:
    return records.states.shape[0] * records.states.shape[1]


def coverage(token_ids: torch.Tensor, ids: torch.Tensor) -> float:
    """The share of ids (IGNORE left out) that the heads can name."""
    ids = ids[ids != IGNORE]
    named = torch.zeros(int(max(int(token_ids.max()), int(ids.max()))) + 1, dtype=torch.bool)
    named[token_ids] = True
    return round(float(named[ids].float().mean()), 4)
