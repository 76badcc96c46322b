"""The async side of the engine link: the only place where waiting on the engine becomes an await.

The event loop waits on the engine's doorbell pipe (see engine/ipc.py) and takes each result from
the shared-memory queue without a thread hop. End-of-file on the doorbell means the engine
process is gone. Nothing waits on the doorbell while the engine is idle, so the process watcher
also reports a death through `on_death`, called on the event loop, within moments of the exit.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
from collections.abc import Callable

import anyio
import anyio.to_thread

from engine.config import EngineConfig
from engine.ipc import EngineDiedError, EngineProcess
from engine.protocol import (
    EngineError,
    EngineOutput,
    EngineReady,
    ProfileRequest,
    ProfileResult,
    ProfileShape,
    StepPlan,
    StepResult,
    StepSample,
)

STARTUP_TIMEOUT_S = 1800.0  # the first start downloads and converts the model


class EngineStartError(RuntimeError):
    """The engine process could not load its model."""


class EngineClient:
    def __init__(self, config: EngineConfig) -> None:
        self.config = config
        self.process: EngineProcess | None = None
        self.ready: EngineReady | None = None
        self.generation = 0  # counts starts: a death report names the process it is about
        # Called on the event loop with (generation, what happened) when an engine process exits.
        self.on_death: Callable[[int, str], None] | None = None

    @property
    def is_alive(self) -> bool:
        return self.process is not None and not self.process.died.is_set()

    async def start(self) -> EngineReady:
        """Spawns the engine and waits until its model is loaded."""
        self.generation += 1
        self.process = EngineProcess(self.config)
        self.process.on_death(self._reporter(self.generation, asyncio.get_running_loop()))
        self.process.start()
        try:
            with anyio.fail_after(STARTUP_TIMEOUT_S):
                message = await self._receive()
        except EngineDiedError as exc:
            raise EngineStartError(str(exc)) from None
        except TimeoutError:
            raise EngineStartError(f"the engine did not load its model within {STARTUP_TIMEOUT_S:.0f} s") from None
        if isinstance(message, EngineError):
            raise EngineStartError(message.message)
        if not isinstance(message, EngineReady):
            raise EngineStartError(f"expected EngineReady from the engine, got {type(message).__name__}")
        self.ready = message
        # A restart loads the same model on the same CPU: it keeps the timed row limit, which
        # would cost seconds of every restart to time again.
        self.config = dataclasses.replace(self.config, kernel_row_limit=message.kernel_row_limit)
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

    async def profile(self, shapes: list[ProfileShape], repeats: int = 1, drafter: str = "") -> list[StepSample]:
        """Times synthetic steps (only while no request is running): of the target, or of the
        named drafter's model."""
        if self.process is None:
            raise EngineDiedError("the engine is not running")
        self.process.send(ProfileRequest(shapes, repeats, drafter))
        message = await self._receive()
        if isinstance(message, ProfileResult):
            return message.samples
        raise EngineDiedError(f"expected a ProfileResult, got {type(message).__name__}")

    def _reporter(self, generation: int, loop: asyncio.AbstractEventLoop) -> Callable[[int | None], None]:
        """The process watcher's callback (on its thread): hands the death to the event loop
        without waiting for it (grpc.aio means the loop is asyncio's)."""

        def report(exitcode: int | None) -> None:
            def call() -> None:
                if self.on_death is not None:
                    self.on_death(generation, f"the engine process exited (exit code {exitcode})")

            with contextlib.suppress(RuntimeError):  # the event loop has closed: nobody to tell
                loop.call_soon_threadsafe(call)

        return report

    async def stop(self) -> None:
        if self.process is not None:
            with anyio.CancelScope(shield=True):
                await anyio.to_thread.run_sync(self.process.shutdown, abandon_on_cancel=True)

    async def _receive(self) -> EngineOutput:
        assert self.process is not None
        process = self.process
        while True:
            message = process.poll()
            if message is not None:
                return message
            await anyio.wait_readable(process.doorbell_fd)
            if not process.answer_doorbell():
                await anyio.to_thread.run_sync(process.died.wait, 2.0)  # let the watcher reap it
                raise EngineDiedError(f"the engine process exited (exit code {process.process.exitcode})")
