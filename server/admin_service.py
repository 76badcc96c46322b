"""The Admin servicer: the server-wide speculation policy at run time, behind the admin token."""

from __future__ import annotations

import secrets

import grpc

from client.pb import generation_pb2 as pb
from client.pb import generation_pb2_grpc as pb_grpc
from server.errors import InvalidArgumentError, UnauthenticatedError
from server.policy import PolicySettings
from server.request import SpeculationMode
from server.service import Services


def policy_to_pb(settings: PolicySettings) -> pb.Policy:
    return pb.Policy(
        mode=settings.mode.name,
        num_draft_tokens=settings.num_draft_tokens,
        max_draft_tokens=settings.max_draft_tokens,
    )


class AdminService(pb_grpc.AdminServicer):
    def __init__(self, services: Services, admin_token: str) -> None:
        self.services = services
        self.admin_token = admin_token

    def _authorize(self, context: grpc.aio.ServicerContext) -> None:
        if not self.admin_token:
            return
        metadata = dict(context.invocation_metadata() or ())
        given = str(metadata.get("authorization", ""))
        if not secrets.compare_digest(given, f"Bearer {self.admin_token}"):
            raise UnauthenticatedError("Admin calls need the header `authorization: Bearer <admin token>`")

    async def GetPolicy(self, request: pb.GetPolicyRequest, context: grpc.aio.ServicerContext) -> pb.Policy:
        self._authorize(context)
        return policy_to_pb(self.services.get().loop.policy.settings)

    async def SetPolicy(self, request: pb.SetPolicyRequest, context: grpc.aio.ServicerContext) -> pb.Policy:
        self._authorize(context)
        ctx = self.services.get()
        policy = request.policy
        current = ctx.loop.policy.settings
        if policy.mode not in SpeculationMode._value2member_map_:
            raise InvalidArgumentError("policy.mode", f"unknown mode {policy.mode}; use AUTO, OFF or FIXED")
        settings = PolicySettings(
            mode=SpeculationMode(policy.mode) or current.mode,
            num_draft_tokens=policy.num_draft_tokens
            if policy.HasField("num_draft_tokens")
            else current.num_draft_tokens,
            max_draft_tokens=policy.max_draft_tokens
            if policy.HasField("max_draft_tokens")
            else current.max_draft_tokens,
        ).validated(ctx.ready.max_draft_tokens)
        ctx.loop.policy.settings = settings
        return policy_to_pb(settings)
