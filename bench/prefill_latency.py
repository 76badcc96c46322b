"""How a long prompt's prefill slows a running stream, with and without the prefill cap.

One stream decodes (plain, through the server's scheduler in this process: bench/in_process.py);
after its first NUM_ALONE_TOKENS tokens a long prompt arrives. The stream's inter-token gaps
before and while the prompt is prefilled, and the prompt's wait for its first token, show the
trade `--max-prefill-slowdown` makes (server/prefill_cap.py). Part of `goodspeed bench longctx`.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from typing import Any

import anyio
from tqdm import tqdm

from api.speculation import SpeculationMode
from bench.in_process import InProcessServer
from engine.protocol import EngineReady, FinishReason, StepSample
from engine.runner import ModelRunner
from server.config import ServerConfig
from server.request_state import RequestState, Status
from server.tokenizer import TextTokenizer

NUM_ALONE_TOKENS = 32  # the stream's tokens timed before the long prompt arrives
STREAM_PROMPT_TOKENS = 64


def num_kv_tokens(num_long_tokens: int) -> int:
    """KV the measurement needs: the long prompt, and the stream at its longest."""
    return num_long_tokens + 1 + STREAM_PROMPT_TOKENS + ServerConfig().max_new_tokens_limit


def with_and_without_cap(
    runner: ModelRunner,
    ready: EngineReady,
    tokenizer: TextTokenizer,
    profile: dict[str, list[StepSample]],
    long_prompt: list[int],
    stream_source: list[int],
) -> list[dict[str, Any]]:
    """The measurement at the server's default cap, then with the cap off, then the stream alone
    as long as the longest of them ran; profile: the start-up profile (InProcessServer.profile)
    that warms each server."""
    stream_prompt = stream_source[:STREAM_PROMPT_TOKENS]

    def server(slowdown: float) -> InProcessServer:
        s = InProcessServer(runner, ready, tokenizer, ServerConfig(max_prefill_slowdown=slowdown))
        s.warm(profile)
        return s

    runs = [
        anyio.run(_interfere, server(slowdown), long_prompt, stream_prompt)
        for slowdown in (ServerConfig().max_prefill_slowdown, 0.0)
    ]
    # The stream's context grows by thousands of tokens while a capped prefill runs, and each of
    # its steps with it: "without the prefill" is the same stream alone over the same tokens.
    num_alone = max(NUM_ALONE_TOKENS + len(run.pop("gaps_during_s")) for run in runs)
    alone = anyio.run(_alone, server(0.0), stream_prompt, num_alone)
    for run in runs:
        same_tokens = alone[NUM_ALONE_TOKENS : NUM_ALONE_TOKENS + run["itl_during_prefill_ms"]["count"]]
        run["itl_alone_same_tokens_ms"] = percentiles(same_tokens)
        for stat in ("median", "mean"):
            run[f"itl_ratio_{stat}"] = run["itl_during_prefill_ms"][stat] / run["itl_alone_same_tokens_ms"][stat]
    return runs


def _start_stream(server: InProcessServer, stream_prompt: list[int]) -> RequestState:
    stream = server.new_state(stream_prompt, server.config.max_new_tokens_limit, SpeculationMode.OFF)
    server.scheduler.add(stream)
    while not stream.output_ids:
        server.step()
    return stream


def _gaps_until(server: InProcessServer, stream: RequestState, done: Callable[[], bool]) -> list[float]:
    """The stream's inter-token gaps, stepping the server until done()."""
    gaps, last, num_tokens = [], time.perf_counter(), len(stream.output_ids)
    while not done():
        server.step()
        if len(stream.output_ids) > num_tokens:
            now = time.perf_counter()
            gaps.append(now - last)
            last, num_tokens = now, len(stream.output_ids)
    return gaps


def _end_stream(server: InProcessServer, stream: RequestState) -> None:
    server.scheduler.abort(stream.req_id, FinishReason.CANCELLED, time.monotonic())
    server.release_finished()


async def _alone(server: InProcessServer, stream_prompt: list[int], num_gaps: int) -> list[float]:
    stream = _start_stream(server, stream_prompt)
    gaps = _gaps_until(server, stream, lambda: len(stream.output_ids) > num_gaps or stream.status is Status.FINISHED)
    _end_stream(server, stream)
    return gaps


async def _interfere(server: InProcessServer, long_prompt: list[int], stream_prompt: list[int]) -> dict[str, Any]:
    """Inter-token latency of one running stream (plain decoding) before and while a long prompt
    is prefilled, under the server's cap; and how long the long prompt waits for its first token."""
    stream = _start_stream(server, stream_prompt)
    long = server.new_state(long_prompt, 1, SpeculationMode.OFF)
    before = _gaps_until(server, stream, lambda: len(stream.output_ids) > NUM_ALONE_TOKENS)
    arrived = time.perf_counter()
    server.scheduler.add(long)
    cap = server.config.max_prefill_slowdown
    with tqdm(total=len(long_prompt), desc=f"prefill beside a stream, cap {cap or 'off'}", unit="tok") as bar:

        def is_prefilled() -> bool:
            bar.update(long.num_prompt_done - bar.n)
            return bool(long.output_ids)

        during = _gaps_until(server, stream, is_prefilled)
    first_token_s = time.perf_counter() - arrived
    _end_stream(server, stream)
    return {
        "max_prefill_slowdown": server.config.max_prefill_slowdown,
        "long_prompt_tokens": len(long_prompt),
        "itl_before_prefill_ms": percentiles(before),
        "itl_during_prefill_ms": percentiles(during),
        "gaps_during_s": during,
        "long_prompt_first_token_s": first_token_s,
    }


def percentiles(seconds: list[float]) -> dict[str, float]:
    ordered = sorted(seconds)
    return {
        "median": 1e3 * statistics.median(ordered),
        "mean": 1e3 * statistics.fmean(ordered),
        "p90": 1e3 * ordered[int(0.9 * (len(ordered) - 1))],
        "max": 1e3 * ordered[-1],
        "count": len(ordered),
    }


def print_interference(report: dict[str, Any]) -> None:
    runs = report["prefill_interference"]
    print(
        f"\na running stream's inter-token latency (plain decoding) while a prompt of "
        f"{runs[0]['long_prompt_tokens']} tokens is prefilled, and the same stream alone over the same tokens"
    )
    print(
        f"{'prefill cap':>11} {'tokens':>6} {'alone ms (mean/median)':>22} {'during ms (mean/median/p90/max)':>31} "
        f"{'ratio mean/median':>17} {'long TTFT s':>11}"
    )
    for run in runs:
        alone, during = run["itl_alone_same_tokens_ms"], run["itl_during_prefill_ms"]
        cap = f"{run['max_prefill_slowdown']:.1f}x" if run["max_prefill_slowdown"] else "off"
        alone_cell = f"{alone['mean']:.0f}/{alone['median']:.0f}"
        during_cell = f"{during['mean']:.0f}/{during['median']:.0f}/{during['p90']:.0f}/{during['max']:.0f}"
        ratios = f"{run['itl_ratio_mean']:.2f}/{run['itl_ratio_median']:.2f}"
        print(
            f"{cap:>11} {during['count']:6d} {alone_cell:>22} {during_cell:>31} {ratios:>17} "
            f"{run['long_prompt_first_token_s']:11.1f}"
        )
