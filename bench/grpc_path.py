"""`goodspeed bench grpc`: batch-1 requests through a started server's gRPC port, against
transformers alone in a process of its own, interleaved prompt by prompt.

For each prompt: ours plain and ours AUTO (unary Generate, greedy), then transformers plain and
prompt lookup. Ours is timed at this client from sending the request to reading the reply, so it
includes what a user pays and transformers does not: tokenizing, the control loop, the engine's
queues, detokenizing and gRPC. transformers is timed around `generate` only, on the token ids the
server's Tokenize returns for the same prompt. One of the two computes at a time (the server is
idle while transformers runs), so the ratios compare each system alone on the machine.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from contextlib import ExitStack
from functools import partial
from pathlib import Path
from typing import Any

import torch
from tqdm import tqdm
from transformers import AutoConfig

from bench import llamacpp_process as llamacpp
from bench.engine import (
    VariantStats,
    divergence_margins,
    print_batch_one,
    record,
    summarize,
    versus_transformers,
)
from bench.hf_process import HFProcess
from bench.machine import machine_facts
from bench.roofline import roofline_tokens_per_s
from bench.server_process import start_server
from bench.workloads import WorkloadItem, build_workload
from client.client import Client
from engine.fetch import ModelFetchError, resolve_model
from engine.model.spec import ModelSpec

OURS = {"ours plain": "off", "ours auto": "auto"}


def generate(client: Client, item: WorkloadItem, speculation: str) -> tuple[list[int], float, int, int, int]:
    """One unary Generate -> (token ids, seconds at this client, steps, drafted, accepted)."""
    started = time.perf_counter()
    reply = client.generate(
        item.prompt, messages=item.messages, max_new_tokens=item.max_new_tokens, speculation=speculation
    )
    seconds = time.perf_counter() - started
    spec = reply.speculation
    return list(reply.token_ids), seconds, spec.steps + 1, spec.drafted_tokens, spec.accepted_tokens


def prompt_ids(client: Client, item: WorkloadItem) -> list[int]:
    return client.tokenize(item.prompt or "", messages=item.messages)


Reference = Callable[[list[int], int], tuple[list[int], float]]  # (prompt ids, max new tokens) -> (output, seconds)


def batch_one(
    client: Client, hf: HFProcess, references: dict[str, Reference], items: list[WorkloadItem], repeats: int
) -> tuple[dict[str, VariantStats], list[list[int]]]:
    """Ours, then each reference, prompt by prompt -> stats per variant, and the prompts' token ids
    in the order of the outputs. Ours are compared with ours plain, references with transformers
    plain (the first reference)."""
    stats = {name: VariantStats(name) for name in [*OURS, *references]}
    ids_per_item = [prompt_ids(client, item) for item in items]
    for _ in range(repeats):
        for item, ids in tqdm(list(zip(items, ids_per_item, strict=True)), desc="prompts", unit="prompt"):
            for name, speculation in OURS.items():
                record(stats[name], *generate(client, item, speculation))
            for name, reference in references.items():
                output, seconds = reference(ids, item.max_new_tokens)
                record(stats[name], output, seconds, 0, 0, 0)
    prompts = ids_per_item * repeats
    for name, variant in stats.items():
        baseline = stats["ours plain" if name in OURS else "transformers plain"].outputs
        variant.num_diverged = sum(a != b for a, b in zip(variant.outputs, baseline, strict=True))
        variant.divergence_margins = divergence_margins(hf, prompts, variant.outputs, baseline)
    return stats, prompts


def llama_cpp_ggufs(model: str, dtype: str, weight_types: list[str] | None) -> dict[str, Path]:
    """The GGUF llama.cpp runs for each weight type asked for; None: native and dtype where
    llama-cpp-python is installed, leaving out (and saying so) a file that cannot be had, as the
    catalog's cannot be fetched offline."""
    if weight_types is not None:
        return {weight_type: llamacpp.gguf_for(model, weight_type) for weight_type in weight_types}
    if not llamacpp.is_available():
        print("llama.cpp: not installed (pip install -e '.[llamacpp]'); measuring without it")
        return {}
    ggufs = {}
    for weight_type in ("native", dtype):
        try:
            ggufs[weight_type] = llamacpp.gguf_for(model, weight_type)
        except ModelFetchError as exc:
            print(f"llama.cpp {weight_type}: left out, its GGUF cannot be had ({exc})")
    return ggufs


def main(
    model: str,
    dtype: str,
    workloads: list[str],
    num_prompts: int,
    repeats: int,
    hf_lookup: int,
    llama_cpp_types: list[str] | None,
    out: Path,
) -> int:
    """llama_cpp_types: GGUFs for llama.cpp ("native", "float32", "bfloat16"); None: native and
    dtype where llama-cpp-python is installed."""
    model_path = resolve_model(model)
    spec = ModelSpec.from_hf_config(AutoConfig.from_pretrained(model_path))
    ggufs = llama_cpp_ggufs(model, dtype, llama_cpp_types)
    machine = machine_facts()
    roofline = roofline_tokens_per_s(spec, getattr(torch, dtype), machine["memory_bandwidth_gbs"])
    print(
        f"{machine['cpu_model']} ({', '.join(machine['cpu_flags'])}), triad {machine['memory_bandwidth_gbs']} GB/s: "
        f"reading the weights once per token bounds batch-1 decoding at {roofline:.1f} tok/s in {dtype}"
    )
    report: dict[str, Any] = {
        "model": model,
        "dtype": dtype,
        "cpu": machine["cpu_model"],
        "machine": machine,
        "roofline_tokens_per_s": round(roofline, 1),
        "num_prompts": num_prompts,
        "repeats": repeats,
        "llama_cpp_ggufs": {weight_type: path.name for weight_type, path in ggufs.items()},
        "batch_one": {},
    }
    server = start_server(out.parent / "logs", "--model", model, "--dtype", dtype)
    with ExitStack() as stack:
        stack.callback(server.stop)
        client = stack.enter_context(Client(server.target))
        eos_ids = list(client.model_info().eos_token_ids)
        hf = HFProcess(model_path, dtype, eos_ids)
        stack.callback(hf.close)
        references: dict[str, Reference] = {
            "transformers plain": hf.generate,
            f"transformers prompt lookup {hf_lookup}": partial(hf.generate, prompt_lookup=hf_lookup),
        }
        for weight_type, path in ggufs.items():
            llama = llamacpp.LlamaCppProcess(path, eos_ids)
            stack.callback(llama.close)
            references[f"llama.cpp {weight_type}"] = llama.generate
        warmup = WorkloadItem("warm-up", 8, prompt="def warm_up():")
        for speculation in OURS.values():
            generate(client, warmup, speculation)
        for reference in references.values():
            reference(prompt_ids(client, warmup), 8)
        for workload in workloads:
            stats, prompts = batch_one(client, hf, references, build_workload(workload, num_prompts), repeats)
            rows = report["batch_one"][workload] = summarize(stats, roofline)
            rows["ours plain"].update(versus_transformers(hf, prompts, stats))
            print_batch_one(f"{workload}, {dtype}, greedy, through gRPC, {machine['cpu_model']}", rows)
            print_ratios(rows, hf_lookup)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2) + "\n")
    print(f"wrote {out}")
    return 0


def print_ratios(rows: dict[str, dict[str, Any]], hf_lookup: int) -> None:
    def tps(name: str) -> float:
        return float(rows[name]["tokens_per_s"])

    lookup = f"transformers prompt lookup {hf_lookup}"
    ratios = [
        f"ours plain / transformers plain {tps('ours plain') / tps('transformers plain'):.2f}x",
        f"ours AUTO / transformers' prompt lookup {tps('ours auto') / tps(lookup):.2f}x",
    ]
    ratios += [f"ours plain / {name} {tps('ours plain') / tps(name):.2f}x" for name in rows if name.startswith("llama")]
    print("; ".join(ratios))
