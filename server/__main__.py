"""`goodspeed serve` (also `python -m server`): parse flags, build the config, run the server."""

from __future__ import annotations

import argparse
import os
import sys

from api.speculation import LABELS, SpeculationMode
from engine.catalog import DEFAULT_MODEL
from engine.config import DRAFTERS, DTYPES, EngineConfig, parse_drafters
from engine.speculator.location import find_trained, not_found_message
from server.config import LOG_LEVELS, ServerConfig

# The public contract names AUTO `goodput` on this flag; it stays a synonym of `auto`.
AUTO_SYNONYM = "goodput"
ADMIN_TOKEN_ENV = "GOODSPEED_ADMIN_TOKEN"


def add_serve_arguments(parser: argparse.ArgumentParser) -> None:
    defaults, engine = ServerConfig(), EngineConfig()
    add = parser.add_argument
    add("--model", default=DEFAULT_MODEL, help="a known model name, a local HF directory or a hub id")
    add("--device", default=engine.device, help="cpu or cuda (cuda:N)")
    add("--dtype", default=engine.dtype, choices=DTYPES, help="float32 gives exact greedy speculation")
    add(
        "--drafters",
        help=f"who may propose draft tokens, comma-separated, from {', '.join(DRAFTERS)}, or none; the policy "
        "picks one per request and step (default: ngram and self, model too with --draft-model, mlp too "
        "when `goodspeed speculator train` has trained one for the model)",
    )
    add("--draft-model", default="", help="a small model sharing the target's tokenizer: the model drafter")
    add(
        "--self-spec-sinks",
        type=int,
        default=engine.self_spec_sink_tokens,
        help="the self drafter attends to a request's first this many tokens ...",
    )
    add(
        "--self-spec-window",
        type=int,
        default=engine.self_spec_window_tokens,
        help="... and to its last this many (MagicDec's budget is the sum)",
    )
    add(
        "--policy",
        default=defaults.speculation_mode.label,
        choices=[*LABELS, AUTO_SYNONYM],
        help="server-wide speculation: auto (the goodput policy; `goodput` means the same), fixed (k every step) "
        "or off",
    )
    add("--num-draft-tokens", type=int, default=defaults.num_draft_tokens, help="k for --policy fixed")
    add("--max-draft-tokens", type=int, default=engine.max_draft_tokens, help="the largest k any request may use")
    add("--host", default=defaults.host)
    add("--port", type=int, default=defaults.port)
    add("--metrics-port", type=int, default=defaults.metrics_port, help="Prometheus /metrics; 0 turns it off")
    add("--metrics-host", default=defaults.metrics_host, help="the metrics endpoint's bind address (default: --host)")
    add("--kv-cache-tokens", type=int, default=engine.kv_cache_tokens, help="KV budget shared by all requests")
    add("--max-running-requests", type=int, default=defaults.max_running_requests)
    add("--max-waiting-requests", type=int, default=defaults.max_waiting_requests)
    add(
        "--max-step-tokens",
        type=int,
        default=defaults.max_step_tokens,
        help="query tokens per engine step; prefill chunks fill what decoding leaves",
    )
    add(
        "--max-prefill-slowdown",
        type=float,
        default=defaults.max_prefill_slowdown,
        help="while requests decode, a step that also prefills takes at most this many times their own step "
        "(its chunks are cut to fit); 0: chunks fill the token budget",
    )
    add("--default-max-new-tokens", type=int, default=defaults.default_max_new_tokens)
    add("--max-new-tokens-limit", type=int, default=defaults.max_new_tokens_limit)
    add(
        "--max-prompt-bytes",
        type=int,
        default=defaults.max_prompt_bytes,
        help="longest prompt in UTF-8 bytes; 0 (default): what the model's context could hold",
    )
    add(
        "--max-message-bytes",
        type=int,
        default=defaults.max_message_bytes,
        help="gRPC's receive limit; a larger request is refused before it is read",
    )
    add(
        "--max-requests-per-client",
        type=int,
        default=defaults.max_requests_per_client,
        help="requests in flight per client (named by --client-id-header, else by the peer's address); 0: no limit",
    )
    add(
        "--client-id-header",
        default=defaults.client_id_header,
        help="the metadata key that names a client, as a proxy or mesh in front sets it; '' counts by address only",
    )
    add(
        "--tokenizer-threads",
        type=int,
        default=defaults.tokenizer_threads,
        help="threads that tokenize prompts over 32K characters, at the lowest CPU priority",
    )
    add(
        "--max-engine-restarts",
        type=int,
        default=defaults.max_engine_restarts,
        help="engine restarts allowed within 10 minutes; past them the server stays up, NOT_SERVING",
    )
    add("--threads", type=int, default=engine.num_threads, help="engine torch threads; 0 means all cores")
    add(
        "--engine-nice",
        type=int,
        default=engine.nice,
        help="niceness of the engine process, so gRPC stays responsive while it computes",
    )
    add(
        "--verify-model",
        action="store_true",
        help="check the sha256 of every cached model file before loading (about a second per GB)",
    )
    add(
        "--admin-token",
        help="require `authorization: Bearer TOKEN` on Admin calls; visible in `ps`, so prefer "
        f"--admin-token-file or ${ADMIN_TOKEN_ENV} (one of the three)",
    )
    add("--admin-token-file", default=defaults.admin_token_file, help="the admin token is this file's first line")
    add("--tls-cert", default=defaults.tls_cert, help="PEM certificate chain: gRPC over TLS (with --tls-key)")
    add("--tls-key", default=defaults.tls_key, help="PEM private key of --tls-cert")
    add(
        "--tls-client-ca",
        default=defaults.tls_client_ca,
        help="PEM CA certificates: clients must present a certificate they signed (mTLS)",
    )
    add("--drain-grace", type=float, default=defaults.drain_grace_s, help="seconds to finish requests on SIGTERM")
    add("--log-format", default=defaults.log_format, choices=["console", "json"])
    add(
        "--log-level",
        default=defaults.log_level,
        choices=LOG_LEVELS,
        help="debug: a line per AUTO step (what the chooser saw and chose) and per step (predicted vs measured time)",
    )


def config_from_args(args: argparse.Namespace) -> ServerConfig:
    has_speculator = find_trained(args.model) is not None
    drafters = parse_drafters(args.drafters, bool(args.draft_model), has_speculator)
    if "mlp" in drafters and not has_speculator:
        raise ValueError(not_found_message(args.model))
    engine = EngineConfig(
        model=args.model,
        device=args.device,
        dtype=args.dtype,
        kv_cache_tokens=args.kv_cache_tokens,
        max_draft_tokens=args.max_draft_tokens,
        drafters=drafters,
        draft_model=args.draft_model,
        self_spec_sink_tokens=args.self_spec_sinks,
        self_spec_window_tokens=args.self_spec_window,
        num_threads=args.threads,
        nice=args.engine_nice,
        verify_model=args.verify_model,
    )
    mode = SpeculationMode.AUTO if args.policy == AUTO_SYNONYM else SpeculationMode.parse(args.policy)
    return ServerConfig(
        engine=engine,
        host=args.host,
        port=args.port,
        metrics_port=args.metrics_port,
        metrics_host=args.metrics_host,
        max_running_requests=args.max_running_requests,
        max_waiting_requests=args.max_waiting_requests,
        max_step_tokens=args.max_step_tokens,
        max_prefill_slowdown=args.max_prefill_slowdown,
        default_max_new_tokens=args.default_max_new_tokens,
        max_new_tokens_limit=args.max_new_tokens_limit,
        max_prompt_bytes=args.max_prompt_bytes,
        max_message_bytes=args.max_message_bytes,
        max_requests_per_client=args.max_requests_per_client,
        client_id_header=args.client_id_header,
        tokenizer_threads=args.tokenizer_threads,
        max_engine_restarts=args.max_engine_restarts,
        speculation_mode=mode,
        num_draft_tokens=min(args.num_draft_tokens, args.max_draft_tokens),
        admin_token=admin_token_from(args),
        admin_token_file=args.admin_token_file,
        tls_cert=args.tls_cert,
        tls_key=args.tls_key,
        tls_client_ca=args.tls_client_ca,
        drain_grace_s=args.drain_grace,
        log_format=args.log_format,
        log_level=args.log_level,
    )


def admin_token_from(args: argparse.Namespace) -> str:
    """The token of --admin-token or the environment; more than one source (the file too) is an error."""
    sources: dict[str, str] = {
        "--admin-token": args.admin_token or "",
        "--admin-token-file": args.admin_token_file,
        f"${ADMIN_TOKEN_ENV}": os.environ.get(ADMIN_TOKEN_ENV, ""),
    }
    given = [name for name, value in sources.items() if value]
    if len(given) > 1:
        raise ValueError(f"the admin token comes from one source, got {', '.join(given)}")
    return sources["--admin-token"] or sources[f"${ADMIN_TOKEN_ENV}"]


def run(args: argparse.Namespace) -> int:
    # The control plane's numpy (the cost model's least squares) must not start a BLAS thread per
    # core: those threads spin after each call and take CPU from the engine (as in client/cli.py,
    # for `python -m server`).
    os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")
    # Tokenizers' own thread pool would run a large prompt at normal priority, beside the engine;
    # without it, encoding runs on the calling thread, whose priority server/tokenize_pool.py sets.
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    import anyio

    from server.app import serve
    from server.credentials import CredentialFileError
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
    except CredentialFileError as exc:
        print(f"goodspeed serve: error: {exc}", file=sys.stderr)
        return 2
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
