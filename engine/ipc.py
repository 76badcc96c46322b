"""The link between the control plane and the engine process.

Two faster-fifo queues: ring buffers in shared memory guarded by a process-shared mutex and
condition variable. Measured here, a round trip costs 116 us against 232 us for
multiprocessing.Queue (which pickles and goes through a pipe and a feeder thread), and a reader
with nothing to read sleeps on the condition variable, so an idle engine uses no CPU. Frames are
msgspec msgpack bytes, never pickle.

Two ways to wait for a result:
- `recv` blocks on the result queue (benchmarks, tests). A watcher thread waits on the process
  sentinel and posts an EngineError the moment the engine exits, so `recv` learns of a death at once.
- the async control plane waits on a *doorbell*, a pipe the engine writes one byte to after each
  result, with `poll` to take the result. An event loop can wait on a pipe without a thread hop,
  and only the engine holds the pipe's write end, so its death shows as end-of-file on the same
  descriptor, with no need to touch a queue a killed engine may have left locked.

This module is shared by both sides, so it must not import torch, grpc or anyio. The engine
process's own code needs only engine/link.py; this module starts it through `_engine_main`.
"""

from __future__ import annotations

import contextlib
import multiprocessing
import multiprocessing.connection
import os
import threading
from collections.abc import Callable

import faster_fifo

from engine.config import EngineConfig
from engine.link import Doorbell, QueueEnd, new_queue
from engine.protocol import EngineError, EngineInput, EngineOutput, Shutdown


class EngineDiedError(RuntimeError):
    """The engine process is gone."""


def _engine_main(
    config: EngineConfig,
    plans: faster_fifo.Queue,
    results: faster_fifo.Queue,
    doorbell: multiprocessing.connection.Connection,
) -> None:
    from engine.worker import run_engine  # torch is imported here, in the engine process only

    run_engine(config, QueueEnd(plans, EngineInput), QueueEnd(results, EngineOutput), Doorbell(doorbell))


class EngineProcess:
    """Starts the engine in a spawned process and talks to it; used from one thread at a time."""

    def __init__(self, config: EngineConfig) -> None:
        self.config = config
        plans, results = new_queue(), new_queue()
        self._plans: QueueEnd[EngineInput] = QueueEnd(plans, EngineInput)
        self._results: QueueEnd[EngineOutput] = QueueEnd(results, EngineOutput)
        context = multiprocessing.get_context("spawn")
        self._doorbell, doorbell_writer = context.Pipe(duplex=False)
        self._doorbell_writer: multiprocessing.connection.Connection | None = doorbell_writer
        self.process = context.Process(
            target=_engine_main, args=(config, plans, results, doorbell_writer), name="goodspeed-engine", daemon=True
        )
        self.died = threading.Event()
        self._on_death: list[Callable[[int | None], None]] = []

    def start(self) -> None:
        self.process.start()
        if self._doorbell_writer is not None:
            self._doorbell_writer.close()  # now only the engine holds it: end-of-file means it is gone
            self._doorbell_writer = None
        os.set_blocking(self._doorbell.fileno(), False)
        threading.Thread(target=self._watch, name="goodspeed-engine-watch", daemon=True).start()

    @property
    def doorbell_fd(self) -> int:
        return self._doorbell.fileno()

    def answer_doorbell(self) -> bool:
        """Takes the pending rings; False once the engine has closed its end (it is gone)."""
        try:
            return bool(os.read(self.doorbell_fd, 65536))
        except BlockingIOError:
            return True

    def poll(self) -> EngineOutput | None:
        """The next result if one has arrived; never waits."""
        return self._results.get(timeout=0)

    def on_death(self, callback: Callable[[int | None], None]) -> None:
        """Calls callback(exitcode) from the watcher thread when the process exits."""
        self._on_death.append(callback)
        if self.died.is_set():
            callback(self.process.exitcode)

    def _watch(self) -> None:
        multiprocessing.connection.wait([self.process.sentinel])
        self.process.join(timeout=1.0)
        self.died.set()
        for callback in list(self._on_death):
            callback(self.process.exitcode)
        # Wake a reader blocked on the result queue.
        self._results.put(EngineError(f"engine process exited (exit code {self.process.exitcode})"), timeout=1.0)

    def send(self, message: EngineInput) -> None:
        if self.died.is_set():
            raise EngineDiedError(f"engine process exited (exit code {self.process.exitcode})")
        self._plans.put(message)

    def recv(self, timeout: float | None = None) -> EngineOutput | None:
        """The next message from the engine; None if `timeout` passes first."""
        return self._results.get(timeout)

    def shutdown(self, timeout: float = 10.0) -> None:
        """Asks the engine to exit, then makes sure it has.

        Only the watcher thread reaps the process (two threads waiting on one child race), so
        this waits for its `died` event rather than joining.
        """
        if self.process.pid is None:
            return  # never started
        if not self.died.is_set():
            with contextlib.suppress(Exception):  # a full or broken queue: terminate below
                self._plans.put(Shutdown(), timeout=1.0)
            self.died.wait(timeout)
        if not self.died.is_set():
            self.process.terminate()
            self.died.wait(2.0)
        if not self.died.is_set():
            self.kill()

    def kill(self) -> None:
        self.process.kill()
        self.died.wait(5.0)
