"""The async side of the engine link: the only place blocking queue reads become awaitables.

Each step sends a plan and waits for its result in a worker thread, so the event loop keeps
serving RPCs while the engine computes. If the engine process dies, its watcher thread cancels
the wait at once, without relying on the queue (see engine/ipc.py).
"""

from __future__ import annotations

import anyio
import anyio.from_thread
import anyio.lowlevel
import anyio.to_thread

from engine.config import EngineConfig
from engine.ipc import EngineDiedError, EngineProcess
from engine.protocol import EngineError, EngineOutput, EngineReady, StepPlan, StepResult

STARTUP_TIMEOUT_S = 1800.0  # the first start downloads and converts the model
DEATH_GRACE_S = 1.0


class EngineStartError(RuntimeError):
    """The engine process could not load its model."""


class EngineClient:
    def __init__(self, config: EngineConfig) -> None:
        self.config = config
        self.process: EngineProcess | None = None
        self.ready: EngineReady | None = None
        self._limiter = anyio.CapacityLimiter(1)
        self._wait_scope: anyio.CancelScope | None = None

    async def start(self) -> EngineReady:
        """Spawns the engine and waits until its model is loaded."""
        process = EngineProcess(self.config)
        self.process = process
        token = anyio.lowlevel.current_token()
        process.start()
        process.on_death(lambda _code: anyio.from_thread.run_sync(self._cancel_wait, token=token))
        message = await self._receive(wait_s=STARTUP_TIMEOUT_S)
        if isinstance(message, EngineError):
            raise EngineStartError(message.message)
        if not isinstance(message, EngineReady):
            raise EngineStartError(f"expected EngineReady from the engine, got {type(message).__name__}")
        self.ready = message
        return message

    async def step(self, plan: StepPlan) -> StepResult:
        if self.process is None:
            raise EngineDiedError("the engine is not running")
        self.process.send(plan)
        message = await self._receive()
        if isinstance(message, StepResult):
            return message
        if isinstance(message, EngineError):
            raise EngineDiedError(message.message)
        raise EngineDiedError(f"expected a StepResult, got {type(message).__name__}")

    async def stop(self) -> None:
        if self.process is not None:
            with anyio.CancelScope(shield=True):
                await anyio.to_thread.run_sync(self.process.shutdown, abandon_on_cancel=True)

    async def _receive(self, wait_s: float | None = None) -> EngineOutput:
        assert self.process is not None
        process = self.process
        with anyio.CancelScope() as scope:
            self._wait_scope = scope
            if process.died.is_set():
                self._cancel_wait()
            message = await anyio.to_thread.run_sync(
                process.recv, wait_s, limiter=self._limiter, abandon_on_cancel=True
            )
        self._wait_scope = None
        if scope.cancelled_caught:
            raise EngineDiedError(f"engine process exited (exit code {process.process.exitcode})")
        if message is None:
            raise EngineDiedError(f"no answer from the engine within {wait_s} s")
        return message

    def _cancel_wait(self) -> None:
        """The engine died. Its watcher posts an EngineError, which normally wakes the reader within
        milliseconds, with the engine's own last words ahead of it; give that a second before
        abandoning a reader that may be stuck on a queue the dead process left locked."""
        if self._wait_scope is not None:
            self._wait_scope.deadline = min(self._wait_scope.deadline, anyio.current_time() + DEATH_GRACE_S)
