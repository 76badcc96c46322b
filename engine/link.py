"""The two primitives the engine link is made of, used by both processes: typed msgpack frames
over a faster-fifo queue, and the doorbell pipe the engine rings after each result (engine/ipc.py
says why). The engine process imports only these, not the control plane's side of the link.

This module must not import torch, grpc or anyio.
"""

from __future__ import annotations

import multiprocessing.connection
import os
from queue import Empty
from typing import Any, Generic, TypeVar

import faster_fifo
import msgspec

QUEUE_BYTES = 16 * 1024 * 1024
FOREVER_S = 1e9

T = TypeVar("T")


def _raw_bytes(data: bytes) -> bytes:
    return data


def new_queue() -> faster_fifo.Queue:
    # Module-level functions, not codec objects, so the queue pickles into the spawned process.
    return faster_fifo.Queue(QUEUE_BYTES, loads=bytes, dumps=_raw_bytes)


class QueueEnd(Generic[T]):
    """Typed messages over one faster-fifo queue."""

    def __init__(self, queue: faster_fifo.Queue, message_type: Any) -> None:
        self.queue = queue
        self.encoder = msgspec.msgpack.Encoder()
        self.decoder: msgspec.msgpack.Decoder[T] = msgspec.msgpack.Decoder(message_type)

    def put(self, message: Any, timeout: float = 10.0) -> None:
        self.queue.put(self.encoder.encode(message), timeout=timeout)

    def get(self, timeout: float | None = None) -> T | None:
        """The next message, or None when `timeout` seconds pass first (0: do not wait)."""
        try:
            if timeout == 0:
                data = self.queue.get(block=False)
            else:
                data = self.queue.get(timeout=FOREVER_S if timeout is None else timeout)
        except Empty:
            return None
        return self.decoder.decode(data)


class Doorbell:
    """The engine's end of the doorbell pipe."""

    def __init__(self, connection: multiprocessing.connection.Connection) -> None:
        self.fd = connection.fileno()
        self._connection = connection  # keeps the descriptor open

    def ring(self) -> None:
        os.write(self.fd, b"\0")
