"""The gRPC servicers: protobuf in and out, domain objects inside.

Handlers validate and convert, hand the request to the control loop and stream its chunks.
They raise `ServiceError`s and never catch them: the interceptor maps them to status codes.
"""

from __future__ import annotations

import secrets
import time
import uuid
from collections import deque
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass

import grpc

from api.metadata import STEP_END_TRAILER, STEP_TIMING_HEADER
from api.pb import generation_pb2 as pb
from api.pb import generation_pb2_grpc as pb_grpc
from engine.protocol import EngineReady, FinishReason, SamplingParams
from server.client_slots import ClientSlots
from server.errors import InvalidArgumentError, UnavailableError
from server.loop import ControlLoop
from server.policy.snapshot import PolicySnapshot
from server.request import ChatMessage, Chunk, DrafterUsage, Final, GenerationRequest, Limits, validate_input
from server.request_state import RequestState, Status
from server.stats import ServerStats, mean
from server.text_stream import TextStream
from server.tokenize_pool import TokenizerPool
from server.tokenizer import TextTokenizer

MAX_CLIENT_ID_LENGTH = 128


@dataclass(frozen=True, slots=True)
class ServiceContext:
    """What the handlers need, built once the engine is ready."""

    loop: ControlLoop
    tokenizer: TextTokenizer
    ready: EngineReady
    limits: Limits
    stats: ServerStats
    default_max_new_tokens: int
    tokenizer_pool: TokenizerPool  # tokenizes and renders chat off the event loop
    client_slots: ClientSlots
    client_id_header: str  # the metadata key that names a client; "" or absent: the peer's address


@dataclass
class Services:
    """The servicers exist before the engine is ready (gRPC wants them before it starts)."""

    context: ServiceContext | None = None

    def get(self) -> ServiceContext:
        if self.context is None:
            raise UnavailableError("the model is still loading; retry shortly")
        return self.context


def messages_from_pb(messages: Sequence[pb.ChatMessage], limits: Limits) -> tuple[ChatMessage, ...]:
    if len(messages) > limits.max_messages:
        raise InvalidArgumentError("messages", f"at most {limits.max_messages} messages, got {len(messages)}")
    return tuple(ChatMessage(m.role, m.content) for m in messages)


def request_from_pb(message: pb.GenerateRequest, limits: Limits, default_max_new_tokens: int) -> GenerationRequest:
    return GenerationRequest(
        request_id=message.request_id or uuid.uuid4().hex[:16],
        prompt=message.prompt,
        messages=messages_from_pb(message.messages, limits),
        max_new_tokens=message.max_new_tokens if message.HasField("max_new_tokens") else default_max_new_tokens,
        temperature=message.temperature if message.HasField("temperature") else 0.0,
        top_p=message.top_p if message.HasField("top_p") else 1.0,
        top_k=message.top_k if message.HasField("top_k") else 0,
        seed=message.seed if message.HasField("seed") else None,
        stop=tuple(message.stop),
        speculation_mode=int(message.speculation.mode),
        num_draft_tokens=message.speculation.num_draft_tokens,
        drafter=message.speculation.drafter,
    )


def is_step_timing_asked(context: grpc.aio.ServicerContext) -> bool:
    return any(key == STEP_TIMING_HEADER for key, _ in context.invocation_metadata() or ())


def client_id_of(context: grpc.aio.ServicerContext, header: str) -> str:
    """Who sent the request, for the per-client limit: the header's value, else the peer's address."""
    for key, value in context.invocation_metadata() or ():
        if header and key == header:
            return f"{header}={str(value)[:MAX_CLIENT_ID_LENGTH]}"
    return peer_host(str(context.peer()))


def peer_host(peer: str) -> str:
    """gRPC's peer without the port: 'ipv4:10.0.0.7:53122' -> 'ipv4:10.0.0.7' (one host, many connections)."""
    kind, _, address = peer.partition(":")
    return f"{kind}:{address.rsplit(':', 1)[0]}" if kind in ("ipv4", "ipv6") else peer


def speculation_to_pb(final: Final) -> pb.SpeculationStats:
    spec = final.speculation
    return pb.SpeculationStats(
        steps=spec.num_steps,
        drafted_tokens=spec.num_drafted,
        accepted_tokens=spec.num_accepted,
        mean_accepted_length=spec.mean_accepted_length,
        draft_lengths=spec.draft_lengths,
        by_drafter={
            name: pb.DrafterUsage(steps=u.num_steps, drafted_tokens=u.num_drafted, accepted_tokens=u.num_accepted)
            for name, u in spec.by_drafter.items()
        },
    )


def chunk_to_pb(chunk: Chunk, request_id: str) -> pb.GenerateChunk:
    final = chunk.final
    if final is None:
        return pb.GenerateChunk(
            request_id=request_id,
            text=chunk.text,
            token_ids=chunk.token_ids,
            drafted_tokens=chunk.num_drafted,
            accepted_tokens=chunk.num_accepted,
        )
    return pb.GenerateChunk(
        request_id=request_id,
        text=chunk.text,
        token_ids=chunk.token_ids,
        drafted_tokens=chunk.num_drafted,
        accepted_tokens=chunk.num_accepted,
        finish_reason=finish_reason_to_pb(final.finish_reason),
        usage=usage_to_pb(final),
        speculation=speculation_to_pb(final),
        seed=final.seed,
    )


def usage_to_pb(final: Final) -> pb.Usage:
    return pb.Usage(prompt_tokens=final.num_prompt_tokens, completion_tokens=final.num_completion_tokens)


def finish_reason_to_pb(reason: FinishReason) -> str:
    """The proto enum's name; the engine's reasons share them (NONE and ERROR never reach a client)."""
    return reason.name if reason.name in pb.FinishReason.keys() else "FINISH_REASON_UNSPECIFIED"  # noqa: SIM118


class GenerationService(pb_grpc.GenerationServicer):
    def __init__(self, services: Services) -> None:
        self.services = services

    async def GenerateStream(
        self, request: pb.GenerateRequest, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[pb.GenerateChunk]:
        stats = self.services.get().stats
        step_end_ns: list[int] | None = [] if is_step_timing_asked(context) else None
        async for chunk, request_id in self._run(request, context):
            message = chunk_to_pb(chunk, request_id)
            if step_end_ns is not None:
                step_end_ns.append(round(chunk.step_finished_s * 1e9))
            handed_s = time.monotonic()
            yield message  # resumes once gRPC has written the message to the transport
            if chunk.step_finished_s:
                stats.observe_chunk_delay(handed_s - chunk.step_finished_s, time.monotonic() - chunk.step_finished_s)
        if step_end_ns is not None:
            context.set_trailing_metadata(((STEP_END_TRAILER, ",".join(map(str, step_end_ns))),))

    async def Generate(self, request: pb.GenerateRequest, context: grpc.aio.ServicerContext) -> pb.GenerateResponse:
        text: list[str] = []
        token_ids: list[int] = []
        final: Final | None = None
        request_id = ""
        async for chunk, chunk_request_id in self._run(request, context):
            text.append(chunk.text)
            token_ids += chunk.token_ids
            final, request_id = chunk.final, chunk_request_id
        assert final is not None  # _run always ends with the final chunk or raises
        return pb.GenerateResponse(
            request_id=request_id,
            text="".join(text),
            token_ids=token_ids,
            finish_reason=finish_reason_to_pb(final.finish_reason),
            usage=usage_to_pb(final),
            speculation=speculation_to_pb(final),
            seed=final.seed,
            time_to_first_token_s=final.time_to_first_token_s,
            total_s=final.total_s,
        )

    async def _run(
        self, request: pb.GenerateRequest, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[tuple[Chunk, str]]:
        ctx = self.services.get()
        with ctx.client_slots.hold(client_id_of(context, ctx.client_id_header)):
            state = await self._prepare(ctx, request, context)
            ctx.loop.submit(state)
            try:
                while True:
                    for chunk in await state.mailbox.take():
                        if chunk.error is not None:
                            raise chunk.error
                        yield chunk, state.request.request_id
                        if chunk.final is not None:
                            return
            finally:
                if state.status != Status.FINISHED:
                    is_late = state.deadline_s is not None and time.monotonic() >= state.deadline_s
                    ctx.loop.abort(state.req_id, FinishReason.DEADLINE if is_late else FinishReason.CANCELLED)

    async def _prepare(
        self, ctx: ServiceContext, request: pb.GenerateRequest, context: grpc.aio.ServicerContext
    ) -> RequestState:
        generation = request_from_pb(request, ctx.limits, ctx.default_max_new_tokens)
        generation.validate(ctx.limits)
        max_len = ctx.ready.max_model_len
        prompt_ids = await ctx.tokenizer_pool.encode(generation.prompt, generation.messages, max_tokens=max_len - 1)
        if len(prompt_ids) + generation.max_new_tokens > max_len:
            raise InvalidArgumentError(
                "max_new_tokens",
                f"the prompt ({len(prompt_ids)} tokens) plus max_new_tokens ({generation.max_new_tokens}) "
                f"exceeds the model's context of {max_len} tokens",
            )
        remaining = context.time_remaining()
        seed = generation.seed if generation.seed is not None else secrets.randbits(64)
        return RequestState(
            req_id=uuid.uuid4().hex,
            request=generation,
            prompt_ids=prompt_ids,
            sampling=SamplingParams(generation.temperature, generation.top_p, generation.top_k, seed),
            stop_token_ids=list(ctx.ready.eos_token_ids),
            text=TextStream(ctx.tokenizer, generation.stop),
            deadline_s=time.monotonic() + remaining if remaining is not None else None,
        )

    async def Tokenize(self, request: pb.TokenizeRequest, context: grpc.aio.ServicerContext) -> pb.TokenizeResponse:
        ctx = self.services.get()
        messages = messages_from_pb(request.messages, ctx.limits)
        validate_input(request.text, messages, ctx.limits, text_field="text")
        return pb.TokenizeResponse(token_ids=await ctx.tokenizer_pool.encode(request.text, messages))

    async def ModelInfo(self, request: pb.ModelInfoRequest, context: grpc.aio.ServicerContext) -> pb.ModelInfoResponse:
        ctx = self.services.get()
        ready = ctx.ready
        return pb.ModelInfoResponse(
            model=ready.model_name,
            model_type=ready.model_type,
            vocab_size=ready.vocab_size,
            max_model_len=ready.max_model_len,
            device=ready.device,
            dtype=ready.dtype,
            drafter=ready.drafters[0] if ready.drafters else "",
            drafters=ready.drafters,
            max_draft_tokens=ready.max_draft_tokens,
            max_new_tokens_limit=ctx.limits.max_new_tokens,
            kv_capacity_tokens=ready.kv_capacity_tokens,
            eos_token_ids=ready.eos_token_ids,
            max_prompt_bytes=ctx.limits.max_prompt_bytes,
            max_requests_per_client=ctx.client_slots.max_per_client,
        )

    async def GetStats(self, request: pb.GetStatsRequest, context: grpc.aio.ServicerContext) -> pb.Stats:
        ctx = self.services.get()
        stats, loop, policy = ctx.stats, ctx.loop, ctx.loop.policy_snapshot
        return pb.Stats(
            requests_running=loop.num_running,
            requests_waiting=loop.num_waiting,
            requests_finished=stats.num_finished,
            prompt_tokens=stats.num_prompt_tokens,
            generated_tokens=stats.num_generated_tokens,
            steps=stats.num_steps,
            drafted_tokens=stats.num_drafted,
            accepted_tokens=stats.num_accepted,
            accepted_per_position=stats.accepted_per_position,
            drafts_per_length=stats.drafts_per_length,
            mean_accepted_length=stats.mean_accepted_length,
            mean_step_s=mean(stats.recent_step_s),
            mean_draft_s=mean(stats.recent_draft_s),
            mean_overhead_fraction=mean(stats.recent_overhead),
            kv_tokens_used=loop.num_kv_tokens_used,
            kv_tokens_capacity=ctx.ready.kv_capacity_tokens,
            uptime_s=stats.uptime_s,
            engine_restarts=stats.num_engine_restarts,
            drafted_per_position=stats.drafted_per_position,
            mean_chunk_handed_s=mean(stats.recent_chunk_handed_s),
            mean_chunk_written_s=mean(stats.recent_chunk_written_s),
            acceptance_rate=policy.first_rate,
            continuation_rate=policy.continuation_rate,
            position_acceptance_rates=policy.position_rates,
            first_token_rate_by_match_len=policy.first_token_rates,
            goodput_tokens_per_s=policy.goodput,
            plain_goodput_tokens_per_s=policy.plain_goodput,
            cost_model_ms={name: value * 1000 for name, value in policy.cost_coefficients.items()},
            cost_model_error=policy.cost_model_error,
            policy_probes=policy.num_probes,
            engine_state=loop.engine_state.value,
            engine_error=loop.engine_error,
            drafters={name: drafter_stats_to_pb(stats, policy, name) for name in ctx.ready.drafters},
        )


def drafter_stats_to_pb(stats: ServerStats, policy: PolicySnapshot, name: str) -> pb.DrafterStats:
    counts = stats.by_drafter.get(name, DrafterUsage())
    figures = policy.drafters.get(name)
    return pb.DrafterStats(
        steps=counts.num_steps,
        drafted_tokens=counts.num_drafted,
        accepted_tokens=counts.num_accepted,
        acceptance_rate=figures.first_rate if figures else 0.0,
        continuation_rate=figures.continuation_rate if figures else 0.0,
        mean_draft_s=mean(stats.recent_draft_s_by_drafter.get(name, deque())),
        cost_model_ms={feature: value * 1000 for feature, value in figures.cost_coefficients.items()}
        if figures
        else {},
        cost_model_error=figures.cost_model_error if figures else 0.0,
    )
