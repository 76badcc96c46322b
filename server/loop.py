"""The control loop: the one task that owns the scheduler and drives the engine.

RPC handlers never touch scheduling state; they send the loop messages (submit, abort) through a
bounded stream, and read their request's chunks from its mailbox. Each iteration the loop takes
every pending message, ends expired requests, asks the scheduler for a plan, runs it on the
engine and applies the result. With nothing to do it blocks on its inbox.

The loop also supervises the engine. A death shows up mid-step (the result never comes) or, when
idle, as a message from the process watcher. Either way health turns NOT_SERVING, the requests
that had streamed output fail with UNAVAILABLE, and the engine restarts while the others (waiting,
or admitted but with nothing sent yet) keep their place.
A death during a restart counts against the same budget; once the budget is spent the server
stays up, NOT_SERVING, refusing requests with the reason, which GetStats also shows.
"""

from __future__ import annotations

import contextlib
import enum
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

import anyio
import anyio.lowlevel
import structlog
from anyio.abc import TaskStatus

from engine.ipc import EngineDiedError
from engine.protocol import FinishReason
from server.engine_client import EngineClient, EngineStartError
from server.errors import ResourceExhaustedError, UnavailableError
from server.policy import SpeculationPolicy
from server.request_state import RequestState
from server.scheduler import Scheduler, SchedulerLimits
from server.stats import ServerStats

log = structlog.get_logger("goodspeed.loop")

RESTART_WINDOW_S = 600.0


@dataclass(frozen=True, slots=True)
class Submit:
    state: RequestState


@dataclass(frozen=True, slots=True)
class Abort:
    req_id: str
    reason: FinishReason


@dataclass(frozen=True, slots=True)
class EngineDied:
    generation: int  # which start of the engine died (a late report of an old one is ignored)
    reason: str


Message = Submit | Abort | EngineDied


class EngineState(enum.Enum):
    RUNNING = "running"
    RESTARTING = "restarting"
    FAILED = "failed"  # restarts used up: the server stays up, NOT_SERVING


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
        self.policy = policy
        self.stats = stats
        self.max_engine_restarts = max_engine_restarts
        self.on_serving_change = on_serving_change
        # Room for every request the server can hold twice over (a submit and an abort each).
        inbox_size = 2 * (limits.max_waiting + limits.max_running) + 64
        self._send, self._inbox = anyio.create_memory_object_stream[Message](inbox_size)
        self.is_draining = False
        self.engine_state = EngineState.RUNNING
        self.engine_error = ""  # what happened to the engine last
        self._restarts: list[float] = []
        self._death: EngineDied | None = None  # reported, not yet handled
        self._idle = anyio.Event()
        engine.on_death = self._report_death

    # Called by RPC handlers, on the event loop thread.

    def submit(self, state: RequestState) -> None:
        if self.is_draining:
            raise UnavailableError("the server is shutting down; retry on another instance")
        if self.engine_state == EngineState.FAILED:
            raise UnavailableError(f"the server is not serving: {self.engine_error}")
        try:
            self._send.send_nowait(Submit(state))
        except anyio.WouldBlock:
            raise ResourceExhaustedError("the server's inbox is full; retry later") from None

    def abort(self, req_id: str, reason: FinishReason) -> None:
        with contextlib.suppress(anyio.WouldBlock, anyio.ClosedResourceError):  # the loop is gone or swamped
            self._send.send_nowait(Abort(req_id, reason))

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
        task_status.started()
        if not self.engine.is_alive:  # died before the loop was there to hear of it
            self._death = EngineDied(self.engine.generation, "the engine process exited while starting up")
        is_back_to_back = False
        while True:
            self._handle_pending()
            if self._death is not None:
                await self._recover(self._death.reason)
                is_back_to_back = False
                continue
            self.scheduler.expire(time.monotonic())
            self._record_finished()
            plan = self.scheduler.schedule()
            self._update_gauges()
            if plan is None:
                self._idle.set()
                self._handle(await self._inbox.receive())
                is_back_to_back = False
                continue
            try:
                result = await self.engine.step(plan)
            except EngineDiedError as exc:
                await self._recover(str(exc))
                is_back_to_back = False
                continue
            self.scheduler.update(result)
            # Let the RPC handlers send this step's chunks before the next step is planned: a
            # handler takes tens of microseconds, planning a batch of 16 about a millisecond.
            await anyio.lowlevel.checkpoint()
            self.policy.observe_step(result.shape, result.timings.step_s)
            self._update_policy_gauges()
            self.stats.observe_step(plan, result, self.scheduler.planned_draft_tokens, is_back_to_back)
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
                self._refuse(message.state, UnavailableError(f"the server is not serving: {self.engine_error}"))
                return
            try:
                self.scheduler.add(message.state)
            except ResourceExhaustedError as exc:
                self.stats.metrics.rejected.labels(code="RESOURCE_EXHAUSTED").inc()
                self._refuse(message.state, exc)
        elif isinstance(message, Abort):
            self.scheduler.abort(message.req_id, message.reason, time.monotonic())
        elif message.generation == self.engine.generation and self.engine_state == EngineState.RUNNING:
            self._death = message

    def _refuse(self, state: RequestState, error: Exception) -> None:
        state.mailbox.put(state.end(FinishReason.CANCELLED, time.monotonic(), error))

    def _record_finished(self) -> None:
        for state in self.scheduler.take_finished():
            self.stats.observe_finished(state)
            log_finished(state)

    def _update_policy_gauges(self) -> None:
        metrics, policy = self.stats.metrics, self.policy
        if policy.last_choice is not None:
            metrics.goodput.labels(plan="chosen").set(policy.last_choice.goodput)
            metrics.goodput.labels(plan="plain").set(policy.last_choice.plain_goodput)
        metrics.acceptance_rate.labels(draft_token="first").set(policy.acceptance.server_first_rate)
        metrics.acceptance_rate.labels(draft_token="rest").set(policy.acceptance.server_rest_rate)
        for match_len, rate in policy.acceptance.first_token_rates().items():
            metrics.first_token_rate.labels(match_len=str(match_len)).set(rate)
        metrics.cost_model_error.set(policy.cost_model.relative_error)
        metrics.draft_cost_factor.set(policy.draft_cost_factor.value)
        if policy.cost_model.num_samples % policy.cost_model.refit_every == 0:
            for feature, value in policy.cost_model.coefficients().items():
                metrics.cost_coefficient.labels(feature=feature).set(value)

    def _update_gauges(self) -> None:
        metrics = self.stats.metrics
        metrics.running.set(len(self.scheduler.running))
        metrics.waiting.set(len(self.scheduler.waiting))
        metrics.kv_tokens_used.set(self.scheduler.num_reserved_tokens)

    async def _recover(self, reason: str) -> None:
        """The engine died: fail what it held, restart it within the budget, keep the waiting requests."""
        self._death = None
        log.error("engine died", error=reason, running=len(self.scheduler.running))
        self.engine_state, self.engine_error = EngineState.RESTARTING, reason
        await self.on_serving_change(False)
        error = UnavailableError(f"the engine failed and is restarting: {reason}")
        self.scheduler.release_running(error, time.monotonic())
        self._record_finished()
        while not await self._restart():
            if self.engine_state == EngineState.FAILED:
                return
        self.engine_state = EngineState.RUNNING
        self.stats.num_engine_restarts += 1
        self.stats.metrics.engine_restarts.inc()
        if not self.is_draining:
            await self.on_serving_change(True)
        log.info("engine restarted", restarts=self.stats.num_engine_restarts)

    async def _restart(self) -> bool:
        """One restart, if the budget allows; False when it failed or the budget is spent."""
        now = time.monotonic()
        self._restarts = [t for t in self._restarts if now - t < RESTART_WINDOW_S]
        if len(self._restarts) >= self.max_engine_restarts:
            self._give_up()
            return False
        self._restarts.append(now)
        await self.engine.stop()
        try:
            await self.engine.start()
        except EngineStartError as exc:
            self.engine_error = f"the engine failed while restarting: {exc}"
            log.error("engine restart failed", error=str(exc), restarts_in_window=len(self._restarts))
            return False
        return True

    def _give_up(self) -> None:
        """The restart budget is spent: stay up and say why, refusing what waits and what comes."""
        self.engine_state = EngineState.FAILED
        self.engine_error = (
            f"the engine died {len(self._restarts) + 1} times within {RESTART_WINDOW_S:.0f} s "
            f"(--max-engine-restarts {self.max_engine_restarts}); restart the server. Last: {self.engine_error}"
        )
        log.critical("engine restarts used up; the server stays up but is NOT_SERVING", error=self.engine_error)
        self.scheduler.fail_all_waiting(UnavailableError(f"the server is not serving: {self.engine_error}"))
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
