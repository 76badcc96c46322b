"""The Admin servicer: the server-wide speculation policy at run time, behind the admin token."""

from __future__ import annotations

import secrets

import grpc

from api.metadata import AUTHORIZATION_HEADER, bearer
from api.pb import generation_pb2 as pb
from api.pb import generation_pb2_grpc as pb_grpc
from api.speculation import SpeculationMode
from server.errors import InvalidArgumentError, UnauthenticatedError
from server.policy import PolicySettings, PolicyUpdate
from server.service import Services


def policy_to_pb(settings: PolicySettings) -> pb.Policy:
    return pb.Policy(
        mode=settings.mode.name,
        num_draft_tokens=settings.num_draft_tokens,
        max_draft_tokens=settings.max_draft_tokens,
        drafter=settings.drafter,
    )


class AdminService(pb_grpc.AdminServicer):
    def __init__(self, services: Services, admin_token: str) -> None:
        self.services = services
        self.admin_token = admin_token

    def _authorize(self, context: grpc.aio.ServicerContext) -> None:
        if not self.admin_token:
            return
        metadata = dict(context.invocation_metadata() or ())
        given = str(metadata.get(AUTHORIZATION_HEADER, ""))
        if not secrets.compare_digest(given, bearer(self.admin_token)):
            raise UnauthenticatedError("Admin calls need the header `authorization: Bearer <admin token>`")

    async def GetPolicy(self, request: pb.GetPolicyRequest, context: grpc.aio.ServicerContext) -> pb.Policy:
        self._authorize(context)
        return policy_to_pb(self.services.get().loop.policy_snapshot.settings)

    async def SetPolicy(self, request: pb.SetPolicyRequest, context: grpc.aio.ServicerContext) -> pb.Policy:
        """Reaches the policy as a message through the control loop, applied between two steps."""
        self._authorize(context)
        loop = self.services.get().loop
        return policy_to_pb(await loop.set_policy(policy_update_from_pb(request.policy)))


def policy_update_from_pb(policy: pb.Policy) -> PolicyUpdate:
    if policy.mode not in SpeculationMode._value2member_map_:
        raise InvalidArgumentError("policy.mode", f"unknown mode {policy.mode}; use AUTO, OFF or FIXED")
    return PolicyUpdate(
        mode=SpeculationMode(policy.mode) or None,  # UNSPECIFIED keeps the current mode
        num_draft_tokens=policy.num_draft_tokens if policy.HasField("num_draft_tokens") else None,
        max_draft_tokens=policy.max_draft_tokens if policy.HasField("max_draft_tokens") else None,
        drafter=policy.drafter if policy.HasField("drafter") else None,
    )
