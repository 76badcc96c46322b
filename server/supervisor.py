"""Restarting a dead engine, within a budget.

The control loop hears of a death (mid-step, or from the process watcher when idle), fails or
requeues what the engine held, and starts `restart_engine` as a task of its own, so it keeps
taking submits, aborts and deadlines while the new engine loads. The outcome comes back to the
loop as a `Restarted` message. A death during a restart is one more failed start: it counts
against the same budget, and the next attempt waits a little longer (a start that fails at once
would otherwise spend the whole budget in a second).
"""

from __future__ import annotations

import enum
import time
from dataclasses import dataclass

import anyio
import structlog

from server.engine_client import EngineClient, EngineStartError

log = structlog.get_logger("goodspeed.supervisor")

RESTART_WINDOW_S = 600.0
FIRST_BACKOFF_S = 0.5
MAX_BACKOFF_S = 8.0


class EngineState(enum.Enum):
    RUNNING = "running"
    RESTARTING = "restarting"
    FAILED = "failed"  # restarts used up: the server stays up, NOT_SERVING


@dataclass(frozen=True, slots=True)
class EngineDied:
    generation: int  # which start of the engine died (a late report of an old one is ignored)
    reason: str


@dataclass(frozen=True, slots=True)
class Restarted:
    error: str = ""  # empty: the engine runs again; else why the server gave up on it


class RestartBudget:
    """At most max_restarts starts within a sliding window."""

    def __init__(self, max_restarts: int, window_s: float = RESTART_WINDOW_S) -> None:
        self.max_restarts = max_restarts
        self.window_s = window_s
        self._starts: list[float] = []

    @property
    def num_used(self) -> int:
        return len(self._starts)

    def take(self, now: float) -> bool:
        self._starts = [t for t in self._starts if now - t < self.window_s]
        if len(self._starts) >= self.max_restarts:
            return False
        self._starts.append(now)
        return True


async def restart_engine(engine: EngineClient, budget: RestartBudget, reason: str) -> Restarted:
    """Starts the engine again until it loads or the budget is spent."""
    num_failures = 0
    while budget.take(time.monotonic()):
        await engine.stop()
        try:
            await engine.start()
            return Restarted()
        except EngineStartError as exc:
            reason = f"the engine failed while restarting: {exc}"
            log.error("engine restart failed", error=str(exc), restarts_in_window=budget.num_used)
        num_failures += 1
        await anyio.sleep(min(FIRST_BACKOFF_S * 2 ** (num_failures - 1), MAX_BACKOFF_S))
    await engine.stop()  # one stuck in its start is not left behind
    return Restarted(
        f"the engine died {budget.num_used + 1} times within {budget.window_s:.0f} s "
        f"(--max-engine-restarts {budget.max_restarts}); restart the server. Last: {reason}"
    )
