"""A reference system (transformers, llama.cpp) in a process of its own, called over a pipe.

A benchmark interleaves it with goodspeed prompt by prompt. In its own process it keeps its own
allocator, threads and caches, as a user running it alone would, and cannot warm or slow ours.
Each call blocks until the reply, so only one of the two computes at a time.
"""

from __future__ import annotations

import multiprocessing
from collections.abc import Callable
from multiprocessing.connection import Connection
from typing import Any


def serve(conn: Connection, factory: Callable[..., Any], args: tuple[Any, ...]) -> None:
    """The reference process: build the reference, say so, then answer (method, args) calls until None."""
    try:
        reference = factory(*args)
    except Exception as exc:  # reported to the parent, which raises it
        conn.send(("error", f"{type(exc).__name__}: {exc}"))
        return
    conn.send(("ok", None))
    while (call := conn.recv()) is not None:
        method, call_args = call
        try:
            conn.send(("ok", getattr(reference, method)(*call_args)))
        except Exception as exc:
            conn.send(("error", f"{type(exc).__name__}: {exc}"))


class ReferenceProcess:
    """factory(*args) built in a spawned process; `call` runs one of its methods there. factory
    must be importable by name (a class or a module-level function)."""

    def __init__(self, name: str, factory: Callable[..., Any], *args: Any) -> None:
        self.name = name
        context = multiprocessing.get_context("spawn")
        self.conn, child = context.Pipe()
        self.process = context.Process(target=serve, args=(child, factory, args), name=name, daemon=True)
        self.process.start()
        child.close()
        self._reply()

    def _reply(self) -> Any:
        status, value = self.conn.recv()
        if status != "ok":
            raise RuntimeError(f"the {self.name} process failed: {value}")
        return value

    def call(self, method: str, *args: Any) -> Any:
        self.conn.send((method, args))
        return self._reply()

    def close(self) -> None:
        if self.process.is_alive():
            self.conn.send(None)
            self.process.join(timeout=30)
        if self.process.is_alive():
            self.process.kill()
