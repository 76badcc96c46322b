"""The control loop: the one task that owns the scheduler and drives the engine.

RPC handlers never touch scheduling state; they send the loop messages (submit, abort, a policy
change) through a bounded stream, read their request's chunks from its mailbox, and read what the
policy knows from the immutable snapshot the loop publishes after each step. Each iteration the
loop takes every pending message, ends expired requests, asks the scheduler for a plan, runs it on
the engine and applies the result. With nothing to do it blocks on its inbox.

The loop also supervises the engine. A death shows up mid-step (the result never comes) or, when
idle, as a message from the process watcher. Either way health turns NOT_SERVING, a restart task
starts (supervisor.py) while the loop goes on taking messages, and the running requests go back
to the head of the queue: those that had streamed output resume after it on the next engine
(their streams pause), the others start over; a request requeued once before fails with
UNAVAILABLE. Once the restart budget is spent the server stays up, NOT_SERVING,
refusing requests with the reason, which GetStats also shows.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

import anyio
import anyio.lowlevel
import structlog
from anyio.abc import TaskGroup, TaskStatus
from anyio.streams.memory import MemoryObjectSendStream

from engine.ipc import EngineDiedError
from engine.protocol import FinishReason
from server.engine_client import EngineClient
from server.errors import ResourceExhaustedError, ServiceError, UnavailableError
from server.policy import PolicySettings, PolicySnapshot, PolicyUpdate, SpeculationPolicy
from server.request_state import RequestState
from server.scheduler import Scheduler, SchedulerLimits
from server.stats import ServerStats
from server.supervisor import EngineDied, EngineState, RestartBudget, Restarted, restart_engine

log = structlog.get_logger("goodspeed.loop")


@dataclass(frozen=True, slots=True)
class Submit:
    state: RequestState


@dataclass(frozen=True, slots=True)
class Abort:
    req_id: str
    reason: FinishReason


@dataclass(frozen=True, slots=True)
class SetPolicy:
    update: PolicyUpdate
    reply: MemoryObjectSendStream[PolicySettings | ServiceError]


Message = Submit | Abort | SetPolicy | EngineDied | Restarted


class ControlLoop:
    def __init__(
        self,
        engine: EngineClient,
        limits: SchedulerLimits,
        policy: SpeculationPolicy,
        stats: ServerStats,
        max_engine_restarts: int,
        on_serving_change: Callable[[bool], Awaitable[None]],
    ) -> None:
        self.engine = engine
        self.scheduler = Scheduler(limits, policy)
        self.stats = stats
        self.restart_budget = RestartBudget(max_engine_restarts)
        self.on_serving_change = on_serving_change
        # Room for every request the server can hold twice over (a submit and an abort each).
        inbox_size = 2 * (limits.max_waiting + limits.max_running) + 64
        self._send, self._inbox = anyio.create_memory_object_stream[Message](inbox_size)
        self.is_draining = False
        self.engine_state = EngineState.RUNNING
        self.engine_error = ""  # what happened to the engine last
        self._death: EngineDied | None = None  # reported, not yet handled
        self._idle = anyio.Event()
        engine.on_death = self._report_death
        self.policy_snapshot: PolicySnapshot = policy.snapshot()  # replaced, never changed, after each step
        stats.metrics.show_policy(self.policy_snapshot)

    # Called by RPC handlers, on the event loop thread.

    def submit(self, state: RequestState) -> None:
        if self.is_draining:
            raise UnavailableError("the server is shutting down; retry on another instance")
        if self.engine_state == EngineState.FAILED:
            raise self._not_serving()
        try:
            self._send.send_nowait(Submit(state))
        except anyio.WouldBlock:
            raise ResourceExhaustedError("the server's inbox is full; retry later") from None

    def abort(self, req_id: str, reason: FinishReason) -> None:
        with contextlib.suppress(anyio.WouldBlock, anyio.ClosedResourceError):  # the loop is gone or swamped
            self._send.send_nowait(Abort(req_id, reason))

    async def set_policy(self, update: PolicyUpdate) -> PolicySettings:
        """Changes the server-wide policy between two steps; InvalidArgumentError names a bad field."""
        send, receive = anyio.create_memory_object_stream[PolicySettings | ServiceError](1)
        with receive:
            try:
                self._send.send_nowait(SetPolicy(update, send))
            except anyio.WouldBlock:
                send.close()
                raise ResourceExhaustedError("the server's inbox is full; retry later") from None
            outcome = await receive.receive()
        if isinstance(outcome, ServiceError):
            raise outcome
        return outcome

    @property
    def num_running(self) -> int:
        return len(self.scheduler.running)

    @property
    def num_waiting(self) -> int:
        return len(self.scheduler.waiting)

    @property
    def num_kv_tokens_used(self) -> int:
        return self.scheduler.num_reserved_tokens

    def _report_death(self, generation: int, reason: str) -> None:
        """From the engine client, on the event loop: wakes an idle loop; a busy one finds it in its step."""
        with contextlib.suppress(anyio.WouldBlock, anyio.ClosedResourceError):
            self._send.send_nowait(EngineDied(generation, reason))

    def drain(self) -> None:
        """Refuse new requests; the running and waiting ones are served to the end."""
        self.is_draining = True

    async def wait_idle(self) -> None:
        while self.scheduler.has_work:
            self._idle = anyio.Event()
            await self._idle.wait()

    # The loop itself.

    async def run(self, *, task_status: TaskStatus[None] = anyio.TASK_STATUS_IGNORED) -> None:
        async with anyio.create_task_group() as restarts:
            task_status.started()
            if not self.engine.is_alive:  # died before the loop was there to hear of it
                self._death = EngineDied(self.engine.generation, "the engine process exited while starting up")
            await self._serve(restarts)

    async def _serve(self, restarts: TaskGroup) -> None:
        is_back_to_back = False
        while True:
            self._handle_pending()
            if self._death is not None:
                await self._begin_recovery(restarts)
            self.scheduler.expire(time.monotonic())
            self._record_finished()
            plan = self.scheduler.schedule() if self.engine_state == EngineState.RUNNING else None
            self._update_gauges()
            if plan is None:
                self._idle.set()
                self._handle(await self._inbox.receive())
                is_back_to_back = False
                continue
            try:
                result = await self.engine.step(plan)
            except EngineDiedError as exc:
                self._death = EngineDied(self.engine.generation, str(exc))
                is_back_to_back = False
                continue
            self.scheduler.update(result)
            # Let the RPC handlers send this step's chunks before the next step is planned: a
            # handler takes tens of microseconds, planning a batch of 16 about a millisecond.
            await anyio.lowlevel.checkpoint()
            self.scheduler.observe_step(result)
            self._publish_policy()
            self.stats.observe_step(plan, result, self.scheduler.decoding, is_back_to_back)
            self._record_finished()
            is_back_to_back = True

    def _handle_pending(self) -> None:
        while True:
            try:
                message = self._inbox.receive_nowait()
            except anyio.WouldBlock:
                return
            self._handle(message)

    def _handle(self, message: Message) -> None:
        if isinstance(message, Submit):
            if self.engine_state == EngineState.FAILED:
                self._refuse(message.state, self._not_serving())
                return
            try:
                self.scheduler.add(message.state)
            except ResourceExhaustedError as exc:
                self.stats.metrics.rejected.labels(code="RESOURCE_EXHAUSTED").inc()
                self._refuse(message.state, exc)
        elif isinstance(message, Abort):
            self.scheduler.abort(message.req_id, message.reason, time.monotonic())
        elif isinstance(message, SetPolicy):
            self._set_policy(message)
        elif isinstance(message, EngineDied):
            if message.generation == self.engine.generation and self.engine_state == EngineState.RUNNING:
                self._death = message
        elif message.error:
            self._give_up(message.error)
        else:
            self.engine_state = EngineState.RUNNING
            if not self.engine.is_alive:  # died again before this message came: its report was ignored
                self._death = EngineDied(self.engine.generation, "the engine process exited right after its restart")
            self.stats.num_engine_restarts += 1
            self.stats.metrics.engine_restarts.inc()
            log.info("engine restarted", restarts=self.stats.num_engine_restarts)

    def _refuse(self, state: RequestState, error: Exception) -> None:
        state.end(FinishReason.CANCELLED, time.monotonic(), error)

    def _not_serving(self) -> UnavailableError:
        return UnavailableError(f"the server is not serving: {self.engine_error}")

    def _record_finished(self) -> None:
        for state in self.scheduler.take_finished():
            self.stats.observe_finished(state)
            log_finished(state)

    def _set_policy(self, message: SetPolicy) -> None:
        outcome: PolicySettings | ServiceError
        try:
            outcome = self.scheduler.apply_policy(message.update)
        except ServiceError as exc:
            outcome = exc
        else:
            self._publish_policy()
            log.info("policy set", mode=outcome.mode.name, k=outcome.num_draft_tokens, max_k=outcome.max_draft_tokens)
        with message.reply, contextlib.suppress(anyio.BrokenResourceError):  # the caller has gone: it is set anyway
            message.reply.send_nowait(outcome)

    def _publish_policy(self) -> None:
        previous, self.policy_snapshot = self.policy_snapshot, self.scheduler.policy.snapshot()
        self.stats.metrics.show_policy(self.policy_snapshot, previous)

    def _update_gauges(self) -> None:
        metrics = self.stats.metrics
        metrics.running.set(len(self.scheduler.running))
        metrics.waiting.set(len(self.scheduler.waiting))
        metrics.kv_tokens_used.set(self.scheduler.num_reserved_tokens)

    async def _begin_recovery(self, restarts: TaskGroup) -> None:
        """The engine died: release what it held and start restarting it; the loop goes on."""
        death, self._death = self._death, None
        assert death is not None
        log.error("engine died", error=death.reason, running=len(self.scheduler.running))
        self.engine_state, self.engine_error = EngineState.RESTARTING, death.reason
        await self.on_serving_change(False)
        self.scheduler.release_running(UnavailableError(f"the engine failed and is restarting: {death.reason}"))
        self._record_finished()
        restarts.start_soon(self._restart, death.reason)

    async def _restart(self, reason: str) -> None:
        outcome = await restart_engine(self.engine, self.restart_budget, reason)
        if not outcome.error and not self.is_draining:
            await self.on_serving_change(True)
        await self._send.send(outcome)  # never dropped: the loop keeps emptying its inbox

    def _give_up(self, error: str) -> None:
        """The restart budget is spent: stay up and say why, refusing what waits and what comes."""
        self.engine_state, self.engine_error = EngineState.FAILED, error
        log.critical("engine restarts used up; the server stays up but is NOT_SERVING", error=error)
        self.scheduler.fail_all_waiting(self._not_serving())
        self._record_finished()


def log_finished(state: RequestState) -> None:
    spec = state.speculation
    final = state.final(state.finished_s or time.monotonic())
    log.info(
        "request finished",
        request_id=state.request.request_id,
        finish_reason=FinishReason(state.finish_reason).name,
        prompt_tokens=final.num_prompt_tokens,
        completion_tokens=final.num_completion_tokens,
        ttft_s=round(final.time_to_first_token_s, 4),
        total_s=round(final.total_s, 4),
        steps=spec.num_steps,
        drafted=spec.num_drafted,
        accepted=spec.num_accepted,
        mean_accepted_length=round(spec.mean_accepted_length, 3),
    )
