"""The `goodspeed` command line: serve, generate, models, bench."""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path
from typing import TYPE_CHECKING

from api.speculation import LABELS
from client.speculator_cli import add_speculator, run_speculator, speculator_lines

WORKLOAD_KINDS = (
    "editing",
    "completion",
    "mixed",
    "chat",
)  # bench/workloads.py builds them; named here to keep bench lazy
LONGCTX_PARTS = ("step-costs", "end-to-end", "interference")  # bench/longctx.py

if TYPE_CHECKING:
    from client.tls import TlsFiles


def add_serve(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    from server.__main__ import add_serve_arguments

    serve = sub.add_parser("serve", help="serve a model over gRPC (the default model with no flags)")
    add_serve_arguments(serve)


def add_generate(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    gen = sub.add_parser("generate", help="send one request to a running server")
    gen.add_argument("prompt", help="the prompt (raw text), or the user message with --chat")
    gen.add_argument(
        "--target",
        default="localhost:50051",
        help="server address; replicas: host:port,host:port or dns:///name:port (round-robin over the healthy)",
    )
    gen.add_argument("--chat", action="store_true", help="send the prompt as a chat message")
    gen.add_argument("--stream", action="store_true", help="print tokens as they arrive")
    gen.add_argument("--json", action="store_true", help="print the response (or each chunk) as JSON")
    gen.add_argument("--max-new-tokens", type=int)
    gen.add_argument("--temperature", type=float)
    gen.add_argument("--top-p", type=float)
    gen.add_argument("--top-k", type=int)
    gen.add_argument("--seed", type=int)
    gen.add_argument("--stop", action="append", default=[], help="a stop sequence (repeatable)")
    gen.add_argument("--speculation", choices=LABELS)
    gen.add_argument("--num-draft-tokens", type=int, default=0, help="k with --speculation fixed")
    gen.add_argument("--drafter", default="", help="with --speculation fixed: which drafter (ModelInfo lists them)")
    gen.add_argument("--timeout", type=float, help="deadline in seconds")
    add_tls_arguments(gen)


def add_tls_arguments(parser: argparse.ArgumentParser) -> None:
    """grpcurl's names for the PEM files of a TLS server."""
    parser.add_argument("--cacert", type=Path, help="PEM: the CA that signed the server's certificate (turns TLS on)")
    parser.add_argument("--cert", type=Path, help="PEM: this client's certificate, for mTLS (with --key)")
    parser.add_argument("--key", type=Path, help="PEM: the private key of --cert")


def tls_from_args(args: argparse.Namespace) -> TlsFiles | None:
    """None (plaintext) unless a TLS flag is given."""
    from client.tls import TlsFiles

    if args.cacert is None and args.cert is None and args.key is None:
        return None
    if (args.cert is None) != (args.key is None):
        raise ValueError("--cert and --key go together: give both or neither")
    return TlsFiles(ca_cert=args.cacert, cert=args.cert, key=args.key)


def run_generate(args: argparse.Namespace) -> int:
    import grpc
    from google.protobuf.json_format import MessageToJson

    from client.client import Client

    options = {
        "messages": [("user", args.prompt)] if args.chat else None,
        "max_new_tokens": args.max_new_tokens,
        "temperature": args.temperature,
        "top_p": args.top_p,
        "top_k": args.top_k,
        "seed": args.seed,
        "stop": args.stop,
        "speculation": args.speculation,
        "num_draft_tokens": args.num_draft_tokens,
        "drafter": args.drafter,
        "timeout": args.timeout,
    }
    prompt = None if args.chat else args.prompt
    try:
        client = Client(args.target, tls=tls_from_args(args))
    except (ValueError, OSError) as exc:
        print(f"goodspeed generate: error: {exc}", file=sys.stderr)
        return 2
    try:
        with client:
            if not args.stream:
                response = client.generate(prompt, **options)
                print(MessageToJson(response) if args.json else response.text)
                return 0
            for chunk in client.generate_stream(prompt, **options):
                if args.json:
                    print(MessageToJson(chunk, indent=None), flush=True)
                else:
                    print(chunk.text, end="", flush=True)
            if not args.json:
                print()
    except grpc.RpcError as exc:
        print(f"error: {exc.code().name}: {exc.details()}", file=sys.stderr)
        return 1
    return 0


def add_health(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    health = sub.add_parser("health", help="exit 0 if the server's health check says SERVING (for probes)")
    health.add_argument("--target", default="localhost:50051")
    health.add_argument("--timeout", type=float, default=3.0)
    add_tls_arguments(health)


def run_health(args: argparse.Namespace) -> int:
    import grpc
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    from client.tls import open_channel

    try:
        channel = open_channel(args.target, tls_from_args(args))
    except (ValueError, OSError) as exc:
        print(f"goodspeed health: error: {exc}", file=sys.stderr)
        return 2
    with channel:
        try:
            reply = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=args.timeout)
        except grpc.RpcError as exc:
            print(f"{args.target}: {exc.code().name}", file=sys.stderr)
            return 1
    status = health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status)
    print(f"{args.target}: {status}")
    return 0 if reply.status == health_pb2.HealthCheckResponse.SERVING else 1


def add_models(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    models = sub.add_parser("models", help="list, download or verify the known models")
    verbs = models.add_subparsers(dest="verb", required=True)
    verbs.add_parser("list", help="the known models and which are in the cache (or corrupt there)")
    pull = verbs.add_parser("pull", help="download, verify and convert a model into the cache")
    pull.add_argument("name")
    pull.add_argument("--force", action="store_true", help="convert again even if cached")
    verify = verbs.add_parser("verify", help="check the sha256 of every file of cached models")
    verify.add_argument("name", nargs="?", help="one model (default: every cached one)")


def run_models(args: argparse.Namespace) -> int:
    from engine.catalog import CATALOG, find_model
    from engine.fetch import ModelFetchError, cache_root, entry_state, is_cached, pull

    if args.verb == "list":
        print(f"cache: {cache_root()}")
        for model in CATALOG:
            state = entry_state(model.name)
            label = "cached" if state.is_ok else state.status.value
            print(f"  {model.name:22} {label:11} {model.description}")
            if state.reason:
                print(f"{'':25}{state.reason}")
        for line in speculator_lines():
            print(line)
        return 0
    if args.verb == "verify" and args.name is None:
        return verify_models([m.name for m in CATALOG if is_cached(m.name)])
    entry = find_model(args.name)
    if entry is None:
        known = ", ".join(m.name for m in CATALOG)
        print(f"error: unknown model {args.name!r}; known models: {known}", file=sys.stderr)
        return 2
    if args.verb == "verify":
        return verify_models([entry.name])
    try:
        path = pull(entry, force=args.force)
    except ModelFetchError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    print(f"{entry.name} is ready in {path}")
    return 0


def verify_models(names: list[str]) -> int:
    """The deep check (every file's sha256) of each model: 1 if any is corrupt or missing."""
    from engine.cache_check import EntryStatus
    from engine.fetch import entry_state

    if not names:
        print("no models are cached")
        return 0
    num_bad = 0
    for name in names:
        state = entry_state(name, is_deep=True, show_progress=True)
        if state.is_ok:
            print(f"{name}: ok")
            continue
        num_bad += 1
        if state.status is EntryStatus.NOT_CACHED:
            print(f"{name}: not cached; `goodspeed models pull {name}` downloads it")
            continue
        print(f"{name}: corrupt: {state.reason}")
        print(f"  fix: `goodspeed models pull {name} --force`, or let `goodspeed serve` repair it at start-up")
    return 1 if num_bad else 0


def add_bench(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    from engine.config import EngineConfig

    bench = sub.add_parser("bench", help="benchmarks that print a table and write JSON")
    kinds = bench.add_subparsers(dest="kind", required=True)
    engine = kinds.add_parser("engine", help="batch-1 speculation and batched throughput, vs transformers")
    engine.add_argument("--model", default="smollm2-135m")
    engine.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    engine.add_argument("--num-prompts", type=int, default=8)
    engine.add_argument("--k", type=int, nargs="+", default=[2, 4, 8], help="draft lengths to measure")
    engine.add_argument(
        "--concurrency",
        type=int,
        nargs="*",
        default=[1, 4, 16],
        help="batch sizes for throughput (plain, and plain and AUTO through the scheduler); none (the flag "
        "alone) skips that part",
    )
    engine.add_argument(
        "--workloads", nargs="+", default=["editing", "completion"], choices=WORKLOAD_KINDS, help="batch-1 workloads"
    )
    engine.add_argument("--no-transformers", action="store_true", help="skip the transformers baselines")
    engine.add_argument("--draft-model", default="", help="also measure this draft model (and transformers' assisted)")
    engine.add_argument(
        "--draft-k", type=int, nargs="+", default=[1, 2, 3, 4], help="draft lengths for the draft model"
    )
    engine.add_argument("--out", type=Path, default=None, help="JSON output (default bench-results/engine-DTYPE.json)")
    longctx = kinds.add_parser(
        "longctx", help="self-speculation at long context: step costs, then end to end on long source files"
    )
    longctx.add_argument("--model", default="smollm2-135m")
    longctx.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    longctx.add_argument("--contexts", type=int, nargs="+", default=[1024, 2048, 4096, 7680])
    longctx.add_argument("--batch", type=int, nargs="+", default=[1, 2, 4, 8])
    longctx.add_argument("--k", type=int, nargs="+", default=[1, 2, 3, 4], help="draft lengths to time")
    longctx.add_argument("--acceptance", type=float, default=0.8, help="per-token acceptance for the predicted speedup")
    engine_defaults = EngineConfig()
    longctx.add_argument(
        "--sink-tokens",
        type=int,
        default=engine_defaults.self_spec_sink_tokens,
        help="the window's sinks (as serve's --self-spec-sinks)",
    )
    longctx.add_argument(
        "--window-tokens",
        type=int,
        default=engine_defaults.self_spec_window_tokens,
        help="its recent tokens (--self-spec-window)",
    )
    longctx.add_argument("--ngram-k", type=int, default=4, help="k of the n-gram variant")
    longctx.add_argument("--max-new-tokens", type=int, default=64, help="decoded per request and variant")
    longctx.add_argument(
        "--repeats", type=int, default=3, help="end-to-end runs per variant, taking turns (medians reported)"
    )
    longctx.add_argument(
        "--parts",
        nargs="+",
        default=list(LONGCTX_PARTS),
        choices=LONGCTX_PARTS,
        help="step costs (synthetic KV, seconds); end to end (minutes); a stream's latency during a long prefill",
    )
    longctx.add_argument(
        "--out", type=Path, default=None, help="JSON output, PNG beside it (default bench-results/longctx-DTYPE.json)"
    )
    grpc_path = kinds.add_parser(
        "grpc", help="batch-1 requests through a started server's gRPC port, vs transformers alone"
    )
    grpc_path.add_argument("--model", default="smollm2-135m")
    grpc_path.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    grpc_path.add_argument("--workloads", nargs="+", default=["editing"], choices=WORKLOAD_KINDS)
    grpc_path.add_argument("--num-prompts", type=int, default=8)
    grpc_path.add_argument("--repeats", type=int, default=1, help="passes over the prompts")
    grpc_path.add_argument("--prompt-lookup", type=int, default=8, help="transformers' prompt_lookup_num_tokens")
    grpc_path.add_argument(
        "--llama-cpp",
        nargs="*",
        choices=["native", "float32", "bfloat16"],
        help="llama.cpp on these GGUFs (native: the catalog's own file); the flag alone skips llama.cpp "
        "(default: native and --dtype where llama-cpp-python is installed)",
    )
    grpc_path.add_argument("--out", type=Path, default=None, help="JSON output (default bench-results/grpc-DTYPE.json)")
    service = kinds.add_parser("service", help="control-plane overhead and reliability under cancels")
    service.add_argument("--target", help="a running server; by default one is started")
    service.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"], help="for a started server")
    service.add_argument("--streams", type=int, nargs="+", default=[16], help="concurrent streams to time")
    service.add_argument("--runs", type=int, default=3, help="timed runs per stream count and policy")
    service.add_argument("--max-new-tokens", type=int, default=128)
    service.add_argument("--requests", type=int, default=200)
    service.add_argument("--concurrency", type=int, default=32)
    service.add_argument("--cancel-share", type=float, default=0.3, help="share of requests the client cancels")
    service.add_argument("--out", type=Path, default=Path("bench-results") / "service.json")
    load = kinds.add_parser(
        "load", help="open-loop Poisson load (or closed loop at a fixed concurrency), per speculation policy"
    )
    load.add_argument(
        "--workload", default="editing", help="editing, completion, mixed, or a .jsonl workload file (see bench/data/)"
    )
    load.add_argument("--target", help="a running server; by default one is started")
    load.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"], help="for a started server")
    load.add_argument("--model", default="", help="for a started server (default: the server's)")
    load.add_argument("--draft-model", default="", help="for a started server: a draft model (the model drafter)")
    load.add_argument(
        "--policies",
        nargs="+",
        default=["off", "fixed1", "fixed2", "fixed4", "fixed8", "auto"],
        help="off, auto, fixedK (the server's drafter), or DRAFTERK: FIXED k with that drafter (ngram4, model2)",
    )
    loads = load.add_mutually_exclusive_group()
    loads.add_argument("--rates", type=float, nargs="+", help="requests per second (default: per workload)")
    loads.add_argument(
        "--concurrency", type=int, nargs="+", help="closed loop instead: requests kept in flight, one point each"
    )
    load.add_argument("--seconds-per-point", type=float, default=40.0, help="arrivals span about this long")
    load.add_argument("--min-requests", type=int, default=16)
    load.add_argument("--max-requests", type=int, default=40)
    load.add_argument(
        "--repeats", type=int, default=1, help="runs per point, each with other arrival times; requests are pooled"
    )
    load.add_argument(
        "--requests-per-client", type=int, default=4, help="closed loop: requests each of the clients sends"
    )
    load.add_argument("--seed", type=int, default=0)
    load.add_argument("--out-dir", type=Path, default=Path("bench-results"))
    hardening = kinds.add_parser(
        "hardening", help="stalls from huge prompts, and one client's streams against another's request"
    )
    hardening.add_argument("--target", help="a running server; by default one is started")
    hardening.add_argument("--hog-streams", type=int, default=1000, help="unread streams the greedy client opens")
    hardening.add_argument("--out", type=Path, default=Path("bench-results") / "hardening.json")
    balancing = kinds.add_parser(
        "balancing", help="replicas behind the client's round-robin: added latency, spread, throughput"
    )
    balancing.add_argument("--replicas", type=int, default=2, help="servers to start, one thread each")
    balancing.add_argument("--requests", type=int, default=16, help="concurrent streams per throughput run")
    balancing.add_argument("--max-new-tokens", type=int, default=64)
    balancing.add_argument("--out", type=Path, default=Path("bench-results") / "balancing.json")
    step_profile = kinds.add_parser("step-profile", help="where a plain decode step spends its time (torch profiler)")
    step_profile.add_argument("--model", default="smollm2-135m")
    step_profile.add_argument("--dtypes", nargs="+", default=["float32", "bfloat16"], choices=["float32", "bfloat16"])
    step_profile.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 16])
    step_profile.add_argument("--steps", type=int, default=20, help="profiled decode steps per batch size")
    step_profile.add_argument("--out", type=Path, default=Path("bench-results") / "step-profile.json")
    workload = kinds.add_parser("workload", help="write a HumanEval workload file (JSON lines)")
    workload.add_argument("workload_kind", choices=WORKLOAD_KINDS)
    workload.add_argument("--num-items", type=int, default=164)
    workload.add_argument("--out", type=Path, required=True)


def run_bench(args: argparse.Namespace) -> int:
    if args.kind == "load":
        from bench.load import LoadShape
        from bench.load import main as load_main

        try:
            shape = LoadShape(
                args.seconds_per_point, args.min_requests, args.max_requests, args.repeats, args.requests_per_client
            )
            if args.concurrency and min(args.concurrency) < 1:
                raise ValueError(f"concurrency: must be >= 1, got {args.concurrency}")
        except ValueError as exc:
            print(f"goodspeed bench load: error: {exc}", file=sys.stderr)
            return 2
        return load_main(
            args.workload,
            args.target,
            args.dtype,
            args.policies,
            args.rates,
            shape,
            args.seed,
            args.out_dir,
            args.concurrency,
            args.model,
            args.draft_model,
        )
    if args.kind == "hardening":
        from bench.hardening import main as hardening_main

        return hardening_main(args.target, args.hog_streams, args.out)
    if args.kind == "step-profile":
        from bench.step_profile import main as step_profile_main

        return step_profile_main(args.model, args.dtypes, args.batch_sizes, args.steps, args.out)
    if args.kind == "balancing":
        from bench.balancing import main as balancing_main

        return balancing_main(args.replicas, args.requests, args.max_new_tokens, args.out)
    if args.kind == "workload":
        from bench.workloads import build_workload, save_workload

        args.out.parent.mkdir(parents=True, exist_ok=True)
        save_workload(build_workload(args.workload_kind, args.num_items), args.out)
        print(f"wrote {args.out}")
        return 0
    if args.kind == "service":
        from bench.service import ServiceBench
        from bench.service import main as service_main

        bench = ServiceBench(
            args.streams, args.runs, args.max_new_tokens, args.requests, args.concurrency, args.cancel_share
        )
        return service_main(args.target, args.dtype, bench, args.out)
    if args.kind == "grpc":
        from bench.grpc_path import main as grpc_main

        return grpc_main(
            args.model,
            args.dtype,
            args.workloads,
            args.num_prompts,
            args.repeats,
            args.prompt_lookup,
            args.llama_cpp,
            args.out or Path("bench-results") / f"grpc-{args.dtype}.json",
        )
    if args.kind == "longctx":
        from bench.longctx import run_longctx_bench

        run_longctx_bench(
            args.model,
            args.dtype,
            args.contexts,
            args.batch,
            args.k,
            args.acceptance,
            args.sink_tokens,
            args.window_tokens,
            args.ngram_k,
            args.max_new_tokens,
            args.repeats,
            args.parts,
            args.out or Path("bench-results") / f"longctx-{args.dtype}.json",
        )
        return 0
    if args.kind == "engine":
        from bench.engine import run_engine_bench

        run_engine_bench(
            model=args.model,
            dtype=args.dtype,
            num_prompts=args.num_prompts,
            ks=args.k,
            concurrency=args.concurrency,
            with_transformers=not args.no_transformers,
            out_path=args.out or Path("bench-results") / f"engine-{args.dtype}.json",
            draft_model=args.draft_model,
            draft_ks=tuple(args.draft_k),
            workloads=tuple(args.workloads),
        )
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="goodspeed", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    add_serve(sub)
    add_generate(sub)
    add_health(sub)
    add_models(sub)
    add_speculator(sub)
    add_bench(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    # Before numpy loads: the control plane's least squares (the step-cost model's refits) must not
    # start OpenBLAS threads, which spin after each call on the cores the engine computes on. The
    # benchmarks run the control plane in this process: there a refit of 17 columns slowed plain
    # decoding steps 15% (bfloat16, 1,024 x 4, Intel Xeon) until they were limited.
    os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")
    args = build_parser().parse_args(argv)
    if args.command == "serve":
        from server.__main__ import run

        return run(args)
    if args.command == "generate":
        return run_generate(args)
    if args.command == "health":
        return run_health(args)
    if args.command == "models":
        return run_models(args)
    if args.command == "bench":
        return run_bench(args)
    if args.command == "speculator":
        return run_speculator(args)
    return 2


if __name__ == "__main__":
    sys.exit(main())
