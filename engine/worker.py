"""The engine process: load the model, announce readiness, then run one plan at a time."""

from __future__ import annotations

import logging
import os
import signal
import sys
import time
import traceback
from collections.abc import Callable
from typing import Any

import torch

from engine.config import EngineConfig
from engine.drafters import Drafter, make_drafter
from engine.drafters.draft_model import DraftModelDrafter, check_compatible
from engine.drafters.mlp import MLPDrafter
from engine.drafters.self_spec import SelfSpecDrafter
from engine.fetch import resolve_model
from engine.kv_cache import KVCache
from engine.link import Doorbell, QueueEnd
from engine.model.loader import load_transformer
from engine.model.spec import ModelSpec
from engine.model.transformer import AttentionWindow, Transformer
from engine.profile import profile_steps
from engine.protocol import (
    EngineError,
    EngineInput,
    EngineOutput,
    EngineReady,
    ProfileRequest,
    ProfileResult,
    Shutdown,
    StepPlan,
)
from engine.runner import ModelRunner
from engine.speculator.store import load_trained

log = logging.getLogger("goodspeed.engine")

# How often a waiting engine checks that its parent is still alive.
PARENT_CHECK_S = 2.0


def read_eos_token_ids(path: str) -> list[int]:
    from transformers import AutoConfig, GenerationConfig

    try:
        eos: Any = GenerationConfig.from_pretrained(path).eos_token_id
    except OSError:
        eos = None
    if eos is None:
        eos = AutoConfig.from_pretrained(path).eos_token_id
    if eos is None:
        return []
    return [int(e) for e in eos] if isinstance(eos, list | tuple) else [int(eos)]


def build_runner(config: EngineConfig, show_progress: bool = True) -> tuple[ModelRunner, EngineReady]:
    started = time.perf_counter()
    torch.set_num_threads(config.num_threads or os.cpu_count() or 1)
    device = torch.device(config.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("--device cuda was asked for, but torch sees no CUDA device")
    dtype = getattr(torch, config.dtype)
    path = resolve_model(config.model, show_progress=show_progress, verify=config.verify_model)
    model = load_transformer(path, dtype, device, show_progress, config.kernel_row_limit, keep_row_limit=True)
    kv_cache = KVCache(model.spec, config.kv_cache_tokens, dtype, device)
    drafters = build_drafters(config, model, kv_cache, path, show_progress)
    runner = ModelRunner(model, kv_cache, drafters, config.max_draft_tokens)
    ready = EngineReady(
        model_name=config.model,
        model_type=model.spec.model_type,
        vocab_size=model.spec.vocab_size,
        max_model_len=model.spec.max_position_embeddings,
        eos_token_ids=read_eos_token_ids(path),
        kv_capacity_tokens=kv_cache.capacity_tokens,
        max_draft_tokens=config.max_draft_tokens,
        drafters=[drafter.name for drafter in drafters],
        model_drafters=[drafter.name for drafter in drafters if drafter.runs_model],
        prefill_drafters=[drafter.name for drafter in drafters if drafter.runs_model and drafter.sees_prefill],
        prior_acceptance={drafter.name: drafter.prior_acceptance for drafter in drafters},
        device=str(device),
        dtype=config.dtype,
        load_s=time.perf_counter() - started,
        model_path=path,
        kernel_row_limit=model.kernel_row_limit,
        offer_model_drafters=[drafter.name for drafter in drafters if drafter.offers_run_model],
    )
    return runner, ready


def build_drafters(
    config: EngineConfig, target: Transformer, kv_cache: KVCache, target_path: str, show_progress: bool
) -> list[Drafter]:
    """The configured drafters in order; kv_cache: the target's, which self-speculation reads."""
    window = AttentionWindow(config.self_spec_sink_tokens, config.self_spec_window_tokens)
    drafters: list[Drafter] = []
    for name in config.drafters:
        if name == "model":
            drafters.append(build_draft_model(config, target, target_path, show_progress))
        elif name == "self":
            drafters.append(SelfSpecDrafter(target, kv_cache, window))
        elif name == "mlp":
            # as trained (float32); the drafter keeps the copy it serves with (speculator/served.py)
            speculator = load_trained(config.model, torch.float32, target.device)
            drafters.append(MLPDrafter(speculator, target.spec.vocab_size, target.spec.hidden_size, target.dtype))
        else:
            drafters.append(make_drafter(name, config.ngram_min, config.ngram_max))
    return drafters


def build_draft_model(
    config: EngineConfig, target: Transformer, target_path: str, show_progress: bool
) -> DraftModelDrafter:
    from transformers import AutoConfig

    draft_path = resolve_model(config.draft_model, show_progress=show_progress, verify=config.verify_model)
    draft_spec = ModelSpec.from_hf_config(AutoConfig.from_pretrained(draft_path))
    check_compatible(target.spec, target_path, draft_spec, draft_path)  # before reading its weights
    draft = load_transformer(draft_path, target.dtype, target.device, show_progress=show_progress)
    return DraftModelDrafter(draft, KVCache(draft.spec, config.kv_cache_tokens, target.dtype, target.device))


def run_engine(
    config: EngineConfig, inbox: QueueEnd[EngineInput], outbox: QueueEnd[EngineOutput], doorbell: Doorbell
) -> None:
    """Main loop of the engine process. Blocks on its inbox when idle; exits on Shutdown."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s engine %(levelname)s %(message)s")
    # Ctrl-C reaches the whole process group; the server drains and then tells the engine to stop
    # (or the engine sees its parent gone), so the engine itself ignores SIGINT.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    if config.nice:
        # The engine keeps every core busy while it computes; a lower priority lets the control
        # plane hand chunks to gRPC without waiting for a time slice (measured: 16 streams, chunk
        # written 4.0 -> 2.4 ms after its step, throughput unchanged).
        os.nice(config.nice)

    def send(message: EngineOutput) -> None:
        outbox.put(message)
        doorbell.ring()

    try:
        # Progress bars redraw with carriage returns: fine on a terminal, clutter in a log file.
        runner, ready = build_runner(config, show_progress=sys.stderr.isatty())
    except Exception as exc:
        log.error("engine failed to start: %s", exc)
        send(EngineError(f"engine failed to start: {exc}", traceback.format_exc()))
        return
    send(ready)
    log.info(
        "engine ready: %s on %s (%s), %d KV tokens",
        ready.model_name,
        ready.device,
        ready.dtype,
        ready.kv_capacity_tokens,
    )
    try:
        serve_plans(runner, inbox, send)
    except BrokenPipeError:
        log.warning("the control plane is gone; engine exits")


def serve_plans(runner: ModelRunner, inbox: QueueEnd[EngineInput], send: Callable[[EngineOutput], None]) -> None:
    """Runs plans until Shutdown, a failed step, or the parent's exit."""
    parent_pid = os.getppid()
    sent_at = time.perf_counter()
    while True:
        message = inbox.get(timeout=PARENT_CHECK_S)
        if message is None:
            if os.getppid() != parent_pid:
                log.warning("parent process is gone; engine exits")
                return
            continue
        if isinstance(message, Shutdown):
            return
        if isinstance(message, ProfileRequest):
            send(ProfileResult(profile_steps(runner, message.shapes, message.repeats, message.drafter)))
            continue
        if isinstance(message, StepPlan):
            try:
                result = runner.step(message, idle_s=time.perf_counter() - sent_at)
            except Exception as exc:
                log.exception("engine step %d failed", message.step_id)
                send(EngineError(f"engine step {message.step_id} failed: {exc}", traceback.format_exc()))
                return
            send(result)
            sent_at = time.perf_counter()
