"""The server process: one root task group owning the gRPC server, the engine and the control loop.

Start-up: the port opens at once with health NOT_SERVING; the engine process loads the model
(downloading it the first time); then the control loop starts and health turns SERVING.
SIGTERM or SIGINT drains: health NOT_SERVING, new requests get UNAVAILABLE, the listener closes
(GOAWAY on open connections), running and waiting requests finish (up to --drain-grace seconds),
then the engine is shut down.
"""

from __future__ import annotations

import logging
import signal
import sys
import time
from types import MappingProxyType
from typing import TextIO

import anyio
import anyio.to_thread
import grpc
import structlog
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_health.v1.health import aio as health_aio

from api.pb import generation_pb2 as pb
from api.pb import generation_pb2_grpc as pb_grpc
from engine.protocol import EngineReady, ProfileShape
from server.admin_service import AdminService
from server.client_slots import ClientSlots
from server.config import ServerConfig
from server.credentials import read_admin_token, server_credentials
from server.engine_client import EngineClient
from server.interceptor import ErrorInterceptor
from server.loop import ControlLoop
from server.policy import PolicySettings, SpeculationPolicy
from server.policy.profile import REPEATS, profile_shapes
from server.reflection import enable_reflection
from server.request import Limits
from server.scheduler import SchedulerLimits
from server.service import GenerationService, ServiceContext, Services
from server.stats import ServerStats
from server.tokenize_pool import TokenizerPool
from server.tokenizer import TextTokenizer

log = structlog.get_logger("goodspeed.server")

GENERATION_SERVICE = pb.DESCRIPTOR.services_by_name["Generation"].full_name
ADMIN_SERVICE = pb.DESCRIPTOR.services_by_name["Admin"].full_name
HEALTH_SERVICE = health_pb2.DESCRIPTOR.services_by_name["Health"].full_name
HEALTH_SERVICES = ("", GENERATION_SERVICE)


def configure_logging(log_format: str, log_level: str, stream: TextIO | None = None) -> None:
    """structlog writes to stream (default stdout), in colour only when it is a terminal: colour codes
    are noise in a log file or a collector."""
    stream = stream or sys.stdout
    level = logging.getLevelNamesMapping()[log_level.upper()]
    renderer = (
        structlog.processors.JSONRenderer()
        if log_format == "json"
        else structlog.dev.ConsoleRenderer(colors=stream.isatty())
    )
    structlog.configure(
        processors=[
            structlog.processors.add_log_level,
            structlog.processors.TimeStamper(fmt="iso"),
            structlog.processors.format_exc_info,
            renderer,
        ],
        wrapper_class=structlog.make_filtering_bound_logger(level),
        logger_factory=structlog.PrintLoggerFactory(stream),
        cache_logger_on_first_use=True,
    )
    logging.basicConfig(level=max(logging.INFO, level), format="%(asctime)s %(name)s %(levelname)s %(message)s")


def build_grpc_server(config: ServerConfig, services: Services, admin_token: str) -> grpc.aio.Server:
    server = grpc.aio.server(
        interceptors=[ErrorInterceptor()],
        options=[
            ("grpc.max_receive_message_length", config.max_message_bytes),
            # Replies are bounded by what a request may hold: Tokenize's ids, at most one a byte and
            # three bytes each, are the largest.
            ("grpc.max_send_message_length", 4 * config.max_message_bytes),
            ("grpc.keepalive_permit_without_calls", 1),
            ("grpc.http2.min_ping_interval_without_data_ms", 10_000),
        ],
        maximum_concurrent_rpcs=config.max_waiting_requests + config.max_running_requests + 256,
    )
    pb_grpc.add_GenerationServicer_to_server(GenerationService(services), server)  # type: ignore[no-untyped-call]
    pb_grpc.add_AdminServicer_to_server(AdminService(services, admin_token), server)  # type: ignore[no-untyped-call]
    enable_reflection(server, (GENERATION_SERVICE, ADMIN_SERVICE, HEALTH_SERVICE))
    return server


def add_port(server: grpc.aio.Server, address: str, credentials: grpc.ServerCredentials | None) -> None:
    """Listens on address, with TLS when credentials are given; OSError when it cannot."""
    try:
        if credentials is None:
            port = server.add_insecure_port(address)
        else:
            port = server.add_secure_port(address, credentials)
    except RuntimeError:  # gRPC's only word for it is "Failed to bind"; its own log line has the cause
        port = 0
    if port == 0:
        hint = "" if credentials is None else ", or --tls-key is not the key of --tls-cert"
        raise OSError(f"could not listen on {address}: the address is taken or not local{hint}")


async def set_health(health: health_aio.HealthServicer, is_serving: bool) -> None:
    status = health_pb2.HealthCheckResponse.SERVING if is_serving else health_pb2.HealthCheckResponse.NOT_SERVING
    for name in HEALTH_SERVICES:
        await health.set(name, status)


async def serve(config: ServerConfig) -> None:
    # Read before anything starts, so a bad file is a plain start-up error (CredentialFileError).
    credentials = server_credentials(config)
    admin_token = read_admin_token(config)
    configure_logging(config.log_format, config.log_level)
    stats = ServerStats(max_draft_tokens=config.engine.max_draft_tokens)
    if config.metrics_port:
        stats.metrics.serve(config.metrics_port, config.metrics_bind_host)
    services = Services()
    server = build_grpc_server(config, services, admin_token)
    health = health_aio.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health, server)
    await set_health(health, False)
    address = f"{config.host}:{config.port}"
    add_port(server, address, credentials)
    await server.start()
    log.info(
        "listening",
        address=address,
        tls="off" if credentials is None else "mtls" if config.tls_client_ca else "tls",
        metrics=f"{config.metrics_bind_host}:{config.metrics_port}" if config.metrics_port else None,
        model=config.engine.model,
    )
    engine = EngineClient(config.engine)
    try:
        ready = await engine.start()
        async with anyio.create_task_group() as tg:
            stop = anyio.Event()
            tg.start_soon(watch_signals, stop)
            log.info(
                "engine ready",
                model=ready.model_name,
                device=ready.device,
                dtype=ready.dtype,
                kv_tokens=ready.kv_capacity_tokens,
                load_s=round(ready.load_s, 1),
            )
            policy = build_policy(config, ready)
            await warm_policy(config, engine, policy)
            loop = build_loop(config, engine, policy, stats, health)
            await tg.start(loop.run)
            services.context = await build_context(config, loop, ready, stats)
            stats.metrics.kv_tokens_capacity.set(ready.kv_capacity_tokens)
            await set_health(health, True)
            log.info("serving", address=address)
            await stop.wait()
            await drain(config, server, health, loop)
            tg.cancel_scope.cancel()
    finally:
        with anyio.CancelScope(shield=True):
            await server.stop(0)
            await engine.stop()
            if services.context is not None:
                services.context.tokenizer_pool.close()
            log.info("stopped")


async def build_context(
    config: ServerConfig, loop: ControlLoop, ready: EngineReady, stats: ServerStats
) -> ServiceContext:
    tokenizer = TextTokenizer(ready.model_path)
    limits = Limits(
        config.max_new_tokens_limit,
        ready.max_draft_tokens,
        config.max_stop_sequences,
        config.max_stop_length,
        max_prompt_bytes=await max_prompt_bytes(config, tokenizer, ready.max_model_len),
        max_messages=ready.max_model_len,  # each message renders to a token at least
        drafters=tuple(ready.drafters),
    )
    return ServiceContext(
        loop=loop,
        tokenizer=tokenizer,
        ready=ready,
        limits=limits,
        stats=stats,
        default_max_new_tokens=config.default_max_new_tokens,
        tokenizer_pool=TokenizerPool(tokenizer, config.tokenizer_threads),
        client_slots=ClientSlots(config.max_requests_per_client),
        client_id_header=config.client_id_header,
    )


async def max_prompt_bytes(config: ServerConfig, tokenizer: TextTokenizer, max_model_len: int) -> int:
    """The configured limit, or the most bytes a prompt that fits the context can have (a token
    covers at most its longest token's bytes, plus one a decoder may drop), within gRPC's limit."""
    if config.max_prompt_bytes:
        return config.max_prompt_bytes
    max_token_bytes = await anyio.to_thread.run_sync(tokenizer.max_token_bytes)
    return min((max_token_bytes + 1) * max_model_len, config.max_message_bytes)


def scheduler_limits(config: ServerConfig, ready: EngineReady) -> SchedulerLimits:
    return SchedulerLimits(
        max_running=config.max_running_requests,
        max_waiting=config.max_waiting_requests,
        max_step_tokens=config.max_step_tokens,
        kv_capacity_tokens=ready.kv_capacity_tokens,
        max_prefill_slowdown=config.max_prefill_slowdown,
    )


def start_up_profile_shapes(config: ServerConfig, ready: EngineReady) -> list[ProfileShape]:
    """The shapes the start-up profile times, for the target and for each draft model."""
    return profile_shapes(config.max_running_requests, ready.max_draft_tokens, config.max_step_tokens)


def build_policy(config: ServerConfig, ready: EngineReady) -> SpeculationPolicy:
    settings = PolicySettings(config.speculation_mode, config.num_draft_tokens, ready.max_draft_tokens)
    drafters = tuple(ready.drafters)
    return SpeculationPolicy(
        settings.validated(ready.max_draft_tokens, drafters),
        ready.max_draft_tokens,
        drafters=drafters,
        model_drafters=tuple(ready.model_drafters),
        prefill_drafters=tuple(ready.prefill_drafters),
        offer_model_drafters=tuple(ready.offer_model_drafters),
        prior_acceptance=MappingProxyType(ready.prior_acceptance),
    )


async def warm_policy(config: ServerConfig, engine: EngineClient, policy: SpeculationPolicy) -> None:
    """Times synthetic steps on the engine, so the step-cost model (and each draft model's) is
    fitted before the first request."""
    assert engine.ready is not None
    shapes = start_up_profile_shapes(config, engine.ready)
    for drafter in ["", *engine.ready.model_drafters]:
        started = time.perf_counter()
        samples = await engine.profile(shapes, REPEATS, drafter)
        policy.warm([(sample.shape, sample.step_s) for sample in samples], drafter)
        snapshot = policy.snapshot()
        coefficients = snapshot.drafters[drafter].cost_coefficients if drafter else snapshot.cost_coefficients
        log.info(
            f"drafting-cost model of {drafter} warmed" if drafter else "step-cost model warmed",
            shapes=len(samples),
            seconds=round(time.perf_counter() - started, 1),
            coefficients_ms={name: round(value * 1000, 3) for name, value in coefficients.items()},
        )
        if drafter and not any(coefficients.values()):
            log.warning(
                "too few profile shapes fit the KV cache to price this drafter: AUTO leaves it out (FIXED "
                "requests naming it still run, and price it as they go); a larger --kv-cache-tokens helps",
                drafter=drafter,
                shapes=len(samples),
            )


def build_loop(
    config: ServerConfig,
    engine: EngineClient,
    policy: SpeculationPolicy,
    stats: ServerStats,
    health: health_aio.HealthServicer,
) -> ControlLoop:
    assert engine.ready is not None
    limits = scheduler_limits(config, engine.ready)

    async def on_serving_change(is_serving: bool) -> None:
        await set_health(health, is_serving)

    return ControlLoop(engine, limits, policy, stats, config.max_engine_restarts, on_serving_change)


async def watch_signals(stop: anyio.Event) -> None:
    with anyio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
        async for signum in signals:
            log.info("signal received; draining", signal=signal.Signals(signum).name)
            stop.set()
            return


async def drain(
    config: ServerConfig, server: grpc.aio.Server, health: health_aio.HealthServicer, loop: ControlLoop
) -> None:
    loop.drain()  # refuses new requests first, so none is admitted once health says NOT_SERVING
    await set_health(health, False)
    async with anyio.create_task_group() as tg:
        # Closes the listener and sends GOAWAY, while the calls already running go on: a proxy
        # that does not read health (nginx) fails to connect and moves on by itself, instead of
        # landing its clients' retries here again and again.
        tg.start_soon(server.stop, config.drain_grace_s + 1.0)
        with anyio.move_on_after(config.drain_grace_s) as scope:
            await loop.wait_idle()
        if scope.cancelled_caught:
            log.warning("drain grace passed with requests still running", running=loop.num_running)
        await server.stop(grace=1.0)  # what is left (health watches, last trailers) gets a second
