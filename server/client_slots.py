"""How many requests each client has in flight, and the cap that keeps one from filling the server.

A request holds its client's slot from the moment its RPC starts, before its prompt is even
tokenized, until the RPC ends: so one client can fill neither the tokenizer, nor the queue, nor
the KV budget. Who a client is comes from the service (a header, or the peer's address).
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager

from server.errors import ResourceExhaustedError


class ClientSlots:
    def __init__(self, max_per_client: int) -> None:
        self.max_per_client = max_per_client  # 0: no cap
        self.num_in_flight: Counter[str] = Counter()

    @contextmanager
    def hold(self, client_id: str) -> Iterator[None]:
        """One slot of client_id's for the duration; ResourceExhaustedError when it has none left."""
        num_held = self.num_in_flight[client_id]
        if self.max_per_client and num_held >= self.max_per_client:
            raise ResourceExhaustedError(
                f"client {client_id!r} already has {num_held} requests in flight, the most one client may have "
                "(--max-requests-per-client); retry when some have finished"
            )
        self.num_in_flight[client_id] += 1
        try:
            yield
        finally:
            self.num_in_flight[client_id] -= 1
            if not self.num_in_flight[client_id]:
                del self.num_in_flight[client_id]
