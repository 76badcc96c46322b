"""Where the control loop leaves a request's chunks for the RPC handler that streams them.

The loop must never wait on a slow client, and a chunk must never be dropped, so this is a list
plus an event rather than a bounded stream: the producer appends without blocking, and the
consumer takes everything that has arrived. Its size is bounded by the request's own
max_new_tokens (one chunk per step, at least one token per chunk).
"""

from __future__ import annotations

from collections import deque

import anyio

from server.request import Chunk


class Mailbox:
    def __init__(self) -> None:
        self._chunks: deque[Chunk] = deque()
        self._arrived = anyio.Event()

    def put(self, chunk: Chunk) -> None:
        self._chunks.append(chunk)
        self._arrived.set()

    async def take(self) -> list[Chunk]:
        """Waits for at least one chunk, then returns all that have arrived."""
        while not self._chunks:
            await self._arrived.wait()
            self._arrived = anyio.Event()
        chunks = list(self._chunks)
        self._chunks.clear()
        return chunks
