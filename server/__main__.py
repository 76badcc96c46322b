"""`goodspeed serve` (also `python -m server`): parse flags, build the config, run the server."""

from __future__ import annotations

import argparse
import os
import sys

from engine.catalog import DEFAULT_MODEL
from engine.config import DTYPES, EngineConfig
from server.config import LOG_LEVELS, SPECULATION_MODES, ServerConfig

DRAFTERS = ("ngram", "none")
POLICIES = {"goodput": "auto", "fixed": "fixed", "off": "off"}


def add_serve_arguments(parser: argparse.ArgumentParser) -> None:
    defaults, engine = ServerConfig(), EngineConfig()
    add = parser.add_argument
    add("--model", default=DEFAULT_MODEL, help="a known model name, a local HF directory or a hub id")
    add("--device", default=engine.device, help="cpu or cuda (cuda:N)")
    add("--dtype", default=engine.dtype, choices=DTYPES, help="float32 gives exact greedy speculation")
    add("--drafter", default=engine.drafter, choices=DRAFTERS)
    add(
        "--policy",
        default="goodput",
        choices=list(POLICIES),
        help="server-wide speculation: goodput (AUTO), fixed (FIXED k) or off",
    )
    add("--num-draft-tokens", type=int, default=defaults.num_draft_tokens, help="k for --policy fixed")
    add("--max-draft-tokens", type=int, default=engine.max_draft_tokens, help="the largest k any request may use")
    add("--host", default=defaults.host)
    add("--port", type=int, default=defaults.port)
    add("--metrics-port", type=int, default=defaults.metrics_port, help="Prometheus /metrics; 0 turns it off")
    add("--kv-cache-tokens", type=int, default=engine.kv_cache_tokens, help="KV budget shared by all requests")
    add("--max-running-requests", type=int, default=defaults.max_running_requests)
    add("--max-waiting-requests", type=int, default=defaults.max_waiting_requests)
    add(
        "--max-step-tokens",
        type=int,
        default=defaults.max_step_tokens,
        help="query tokens per engine step; prefill chunks fill what decoding leaves",
    )
    add("--default-max-new-tokens", type=int, default=defaults.default_max_new_tokens)
    add("--max-new-tokens-limit", type=int, default=defaults.max_new_tokens_limit)
    add("--threads", type=int, default=engine.num_threads, help="engine torch threads; 0 means all cores")
    add(
        "--engine-nice",
        type=int,
        default=engine.nice,
        help="niceness of the engine process, so gRPC stays responsive while it computes",
    )
    add(
        "--admin-token",
        default=os.environ.get("GOODSPEED_ADMIN_TOKEN", ""),
        help="require `authorization: Bearer TOKEN` on Admin calls (or set GOODSPEED_ADMIN_TOKEN)",
    )
    add("--drain-grace", type=float, default=defaults.drain_grace_s, help="seconds to finish requests on SIGTERM")
    add("--log-format", default=defaults.log_format, choices=["console", "json"])
    add(
        "--log-level",
        default=defaults.log_level,
        choices=LOG_LEVELS,
        help="debug: two lines per AUTO step (its choice; predicted vs measured time)",
    )


def config_from_args(args: argparse.Namespace) -> ServerConfig:
    engine = EngineConfig(
        model=args.model,
        device=args.device,
        dtype=args.dtype,
        kv_cache_tokens=args.kv_cache_tokens,
        max_draft_tokens=args.max_draft_tokens,
        drafter=args.drafter,
        num_threads=args.threads,
        nice=args.engine_nice,
    )
    mode = POLICIES[args.policy]
    assert mode in SPECULATION_MODES
    return ServerConfig(
        engine=engine,
        host=args.host,
        port=args.port,
        metrics_port=args.metrics_port,
        max_running_requests=args.max_running_requests,
        max_waiting_requests=args.max_waiting_requests,
        max_step_tokens=args.max_step_tokens,
        default_max_new_tokens=args.default_max_new_tokens,
        max_new_tokens_limit=args.max_new_tokens_limit,
        speculation_mode=mode,
        num_draft_tokens=min(args.num_draft_tokens, args.max_draft_tokens),
        admin_token=args.admin_token,
        drain_grace_s=args.drain_grace,
        log_format=args.log_format,
        log_level=args.log_level,
    )


def run(args: argparse.Namespace) -> int:
    # The control plane's numpy (the cost model's least squares) must not start a BLAS thread per
    # core: those threads spin after each call and take CPU from the engine.
    os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")
    import anyio

    from server.app import serve
    from server.engine_client import EngineStartError

    try:
        config = config_from_args(args)
    except ValueError as exc:
        print(f"goodspeed serve: error: {exc}", file=sys.stderr)
        return 2
    try:
        anyio.run(serve, config, backend="asyncio")
    except KeyboardInterrupt:
        pass
    except (EngineStartError, OSError) as exc:
        print(f"goodspeed serve: error: {exc}", file=sys.stderr)
        return 1
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="goodspeed serve", description="Serve a model over gRPC.")
    add_serve_arguments(parser)
    return run(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
