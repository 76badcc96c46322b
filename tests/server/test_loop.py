"""The control loop's own messages, with an engine that is never asked to step (no model)."""

from __future__ import annotations

import anyio
import pytest

from api.speculation import SpeculationMode
from engine.protocol import StepPlan, StepResult
from server.errors import InvalidArgumentError
from server.loop import ControlLoop
from server.policy import PolicySettings, PolicyUpdate, SpeculationPolicy
from server.scheduler import SchedulerLimits
from server.stats import ServerStats


class IdleEngine:
    generation = 1
    is_alive = True
    on_death = None

    async def step(self, plan: StepPlan) -> StepResult:
        raise AssertionError("no request was submitted")


async def serving_change(is_serving: bool) -> None:
    pass


async def test_set_policy_reaches_the_policy_as_a_message_and_the_snapshot_follows() -> None:
    policy = SpeculationPolicy(PolicySettings(SpeculationMode.AUTO, 4, 8), 8)
    stats = ServerStats(max_draft_tokens=8)
    limits = SchedulerLimits(4, 4, 64, 1000)
    loop = ControlLoop(IdleEngine(), limits, policy, stats, 0, serving_change)  # type: ignore[arg-type]
    first = loop.policy_snapshot
    async with anyio.create_task_group() as tg:
        await tg.start(loop.run)
        off = await loop.set_policy(PolicyUpdate(SpeculationMode.OFF))
        assert off == PolicySettings(SpeculationMode.OFF, 4, 8) == loop.policy_snapshot.settings
        assert first.settings.mode == SpeculationMode.AUTO  # a published snapshot never changes
        with pytest.raises(InvalidArgumentError, match="policy.max_draft_tokens"):
            await loop.set_policy(PolicyUpdate(max_draft_tokens=9))
        assert loop.policy_snapshot.settings == off
        with anyio.move_on_after(0):  # the caller gives up before the loop answers: still applied
            await loop.set_policy(PolicyUpdate(num_draft_tokens=2))
        assert (await loop.set_policy(PolicyUpdate())).num_draft_tokens == 2  # and the loop still serves
        tg.cancel_scope.cancel()
