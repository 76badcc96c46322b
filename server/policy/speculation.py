"""Chooses k for every decoding request of a step.

Per-request modes win: OFF means 0, FIXED means the request's own k. Requests that leave it to
the server get the server-wide mode. AUTO uses the server's k until the goodput policy lands
(issue 4): then it picks k from measured acceptance and step cost.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol

from server.policy.settings import PolicySettings
from server.request import SpeculationMode


class Decoding(Protocol):
    @property
    def req_id(self) -> str: ...
    @property
    def speculation_mode(self) -> int: ...
    @property
    def requested_draft_tokens(self) -> int: ...


class SpeculationPolicy:
    def __init__(self, settings: PolicySettings) -> None:
        self.settings = settings

    def choose(self, requests: Sequence[Decoding]) -> dict[str, int]:
        settings = self.settings
        chosen = {}
        for request in requests:
            mode = request.speculation_mode or settings.mode
            if mode == SpeculationMode.OFF:
                k = 0
            elif request.speculation_mode == SpeculationMode.FIXED:
                k = request.requested_draft_tokens
            else:  # the server's FIXED or AUTO
                k = settings.num_draft_tokens
            chosen[request.req_id] = min(k, settings.max_draft_tokens)
        return chosen
