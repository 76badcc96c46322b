"""The engine process: load the model, announce readiness, then run one plan at a time."""

from __future__ import annotations

import logging
import os
import time
import traceback
from typing import Any

import torch

from engine.config import EngineConfig
from engine.drafters import make_drafter
from engine.fetch import resolve_model
from engine.ipc import QueueEnd
from engine.kv_cache import KVCache
from engine.model.loader import load_transformer
from engine.protocol import EngineError, EngineInput, EngineOutput, EngineReady, Shutdown, StepPlan
from engine.runner import ModelRunner

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
    path = resolve_model(config.model, show_progress=show_progress)
    model = load_transformer(path, dtype, device)
    kv_cache = KVCache(model.spec, config.kv_cache_tokens, dtype, device)
    drafter = make_drafter(config.drafter, config.ngram_min, config.ngram_max)
    runner = ModelRunner(model, kv_cache, drafter, config.max_draft_tokens)
    ready = EngineReady(
        model_name=config.model,
        model_type=model.spec.model_type,
        vocab_size=model.spec.vocab_size,
        max_model_len=model.spec.max_position_embeddings,
        eos_token_ids=read_eos_token_ids(path),
        kv_capacity_tokens=kv_cache.capacity_tokens,
        max_draft_tokens=config.max_draft_tokens,
        drafter=drafter.name,
        device=str(device),
        dtype=config.dtype,
        load_s=time.perf_counter() - started,
        model_path=path,
    )
    return runner, ready


def run_engine(config: EngineConfig, inbox: QueueEnd[EngineInput], outbox: QueueEnd[EngineOutput]) -> None:
    """Main loop of the engine process. Blocks on its inbox when idle; exits on Shutdown."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s engine %(levelname)s %(message)s")
    try:
        runner, ready = build_runner(config)
    except Exception as exc:
        outbox.put(EngineError(f"engine failed to start: {exc}", traceback.format_exc()))
        return
    outbox.put(ready)
    log.info(
        "engine ready: %s on %s (%s), %d KV tokens",
        ready.model_name,
        ready.device,
        ready.dtype,
        ready.kv_capacity_tokens,
    )
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
        if isinstance(message, StepPlan):
            try:
                outbox.put(runner.step(message, idle_s=time.perf_counter() - sent_at))
                sent_at = time.perf_counter()
            except Exception as exc:
                outbox.put(EngineError(f"engine step {message.step_id} failed: {exc}", traceback.format_exc()))
                return
