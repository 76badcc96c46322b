"""Python clients for goodspeed: `AsyncClient` (grpc.aio) and `Client` (blocking).

    async with AsyncClient("localhost:50051") as client:
        async for chunk in client.generate_stream("def fib(n):", max_new_tokens=64):
            print(chunk.text, end="", flush=True)

Both return the protobuf messages of goodspeed.v1 (see proto/goodspeed/v1/generation.proto).
For a TLS server pass `tls=TlsFiles(ca_cert=..., cert=..., key=...)` (client/tls.py; cert and key for mTLS).
"""

from __future__ import annotations

import time
from collections.abc import AsyncIterator, Iterator, Sequence
from typing import Any

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from api.metadata import AUTHORIZATION_HEADER, bearer
from api.pb import generation_pb2 as pb
from api.pb import generation_pb2_grpc as pb_grpc
from api.speculation import SpeculationMode
from client.balancing import channel_options, channel_target
from client.tls import TlsFiles, open_aio_channel, open_channel

Messages = Sequence[tuple[str, str] | dict[str, str]]


def build_request(
    prompt: str | None = None,
    *,
    messages: Messages | None = None,
    max_new_tokens: int | None = None,
    temperature: float | None = None,
    top_p: float | None = None,
    top_k: int | None = None,
    seed: int | None = None,
    stop: Sequence[str] = (),
    speculation: str | None = None,
    num_draft_tokens: int = 0,
    drafter: str = "",
    request_id: str = "",
) -> pb.GenerateRequest:
    """speculation: None (the server's default), "auto", "off" or "fixed" (with num_draft_tokens,
    and optionally a drafter that ModelInfo lists); ValueError for anything else."""
    chat = []
    for message in messages or ():
        role, content = (message["role"], message["content"]) if isinstance(message, dict) else message
        chat.append(pb.ChatMessage(role=role, content=content))
    request = pb.GenerateRequest(prompt=prompt or "", messages=chat, stop=list(stop), request_id=request_id)
    optional: dict[str, Any] = {
        "max_new_tokens": max_new_tokens,
        "temperature": temperature,
        "top_p": top_p,
        "top_k": top_k,
        "seed": seed,
    }
    for name, value in optional.items():
        if value is not None:
            setattr(request, name, value)
    if drafter and speculation is None:
        raise ValueError("a drafter is named only with speculation='fixed'")
    if speculation is not None:
        mode = SpeculationMode.parse(speculation)
        request.speculation.CopyFrom(pb.Speculation(mode=mode.name, num_draft_tokens=num_draft_tokens, drafter=drafter))
    return request


def auth_metadata(admin_token: str | None) -> list[tuple[str, str]]:
    return [(AUTHORIZATION_HEADER, bearer(admin_token))] if admin_token else []


class AsyncClient:
    def __init__(
        self,
        target: str = "localhost:50051",
        admin_token: str | None = None,
        options: Sequence[tuple[str, Any]] = (),
        *,
        tls: TlsFiles | None = None,
    ) -> None:
        """target: host:port, a comma-separated list of them, or dns:///name:port (several
        replicas: round-robin over the healthy ones, client/balancing.py); options: gRPC channel
        arguments, after ours; tls: the PEM files of a TLS server (None: plaintext)."""
        self.channel = open_aio_channel(channel_target(target), tls, [*channel_options(target), *options])
        self.stub = pb_grpc.GenerationStub(self.channel)  # type: ignore[no-untyped-call]
        self.admin = pb_grpc.AdminStub(self.channel)  # type: ignore[no-untyped-call]
        self.health = health_pb2_grpc.HealthStub(self.channel)
        self.admin_metadata = auth_metadata(admin_token)

    async def __aenter__(self) -> AsyncClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def close(self) -> None:
        await self.channel.close()

    async def generate(
        self, prompt: str | None = None, *, timeout: float | None = None, **kwargs: Any
    ) -> pb.GenerateResponse:
        response: pb.GenerateResponse = await self.stub.Generate(build_request(prompt, **kwargs), timeout=timeout)
        return response

    async def generate_stream(
        self, prompt: str | None = None, *, timeout: float | None = None, **kwargs: Any
    ) -> AsyncIterator[pb.GenerateChunk]:
        call = self.stub.GenerateStream(build_request(prompt, **kwargs), timeout=timeout)
        async for chunk in call:
            yield chunk

    async def tokenize(self, text: str = "", messages: Messages | None = None) -> list[int]:
        request = build_request(messages=messages)
        response = await self.stub.Tokenize(pb.TokenizeRequest(text=text, messages=request.messages))
        return list(response.token_ids)

    async def model_info(self) -> pb.ModelInfoResponse:
        response: pb.ModelInfoResponse = await self.stub.ModelInfo(pb.ModelInfoRequest())
        return response

    async def stats(self) -> pb.Stats:
        response: pb.Stats = await self.stub.GetStats(pb.GetStatsRequest())
        return response

    async def get_policy(self) -> pb.Policy:
        response: pb.Policy = await self.admin.GetPolicy(pb.GetPolicyRequest(), metadata=self.admin_metadata)
        return response

    async def set_policy(self, policy: pb.Policy) -> pb.Policy:
        request = pb.SetPolicyRequest(policy=policy)
        response: pb.Policy = await self.admin.SetPolicy(request, metadata=self.admin_metadata)
        return response

    async def wait_ready(self, timeout: float = 600.0) -> None:
        """Waits until the server's health check says SERVING."""
        import anyio

        with anyio.fail_after(timeout):
            while True:
                try:
                    reply = await self.health.Check(health_pb2.HealthCheckRequest(service=""), timeout=5)
                    if reply.status == health_pb2.HealthCheckResponse.SERVING:
                        return
                except grpc.aio.AioRpcError:
                    pass
                await anyio.sleep(0.2)


class Client:
    """The blocking twin of AsyncClient."""

    def __init__(
        self,
        target: str = "localhost:50051",
        admin_token: str | None = None,
        options: Sequence[tuple[str, Any]] = (),
        *,
        tls: TlsFiles | None = None,
    ) -> None:
        self.channel = open_channel(channel_target(target), tls, [*channel_options(target), *options])
        self.stub = pb_grpc.GenerationStub(self.channel)  # type: ignore[no-untyped-call]
        self.admin = pb_grpc.AdminStub(self.channel)  # type: ignore[no-untyped-call]
        self.health = health_pb2_grpc.HealthStub(self.channel)
        self.admin_metadata = auth_metadata(admin_token)

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        self.channel.close()

    def generate(
        self, prompt: str | None = None, *, timeout: float | None = None, **kwargs: Any
    ) -> pb.GenerateResponse:
        response: pb.GenerateResponse = self.stub.Generate(build_request(prompt, **kwargs), timeout=timeout)
        return response

    def generate_stream(
        self, prompt: str | None = None, *, timeout: float | None = None, **kwargs: Any
    ) -> Iterator[pb.GenerateChunk]:
        yield from self.stub.GenerateStream(build_request(prompt, **kwargs), timeout=timeout)

    def tokenize(self, text: str = "", messages: Messages | None = None) -> list[int]:
        request = build_request(messages=messages)
        return list(self.stub.Tokenize(pb.TokenizeRequest(text=text, messages=request.messages)).token_ids)

    def model_info(self) -> pb.ModelInfoResponse:
        response: pb.ModelInfoResponse = self.stub.ModelInfo(pb.ModelInfoRequest())
        return response

    def stats(self) -> pb.Stats:
        response: pb.Stats = self.stub.GetStats(pb.GetStatsRequest())
        return response

    def get_policy(self) -> pb.Policy:
        response: pb.Policy = self.admin.GetPolicy(pb.GetPolicyRequest(), metadata=self.admin_metadata)
        return response

    def set_policy(self, policy: pb.Policy) -> pb.Policy:
        response: pb.Policy = self.admin.SetPolicy(pb.SetPolicyRequest(policy=policy), metadata=self.admin_metadata)
        return response

    def wait_ready(self, timeout: float = 600.0) -> None:
        deadline = time.monotonic() + timeout
        while True:
            try:
                reply = self.health.Check(health_pb2.HealthCheckRequest(service=""), timeout=5)
                if reply.status == health_pb2.HealthCheckResponse.SERVING:
                    return
            except grpc.RpcError:
                pass
            if time.monotonic() > deadline:
                raise TimeoutError(f"the server was not SERVING within {timeout} s")
            time.sleep(0.2)
