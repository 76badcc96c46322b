"""The per-client cap, held from a request's RPC start to its end."""

from __future__ import annotations

import pytest

from server.client_slots import ClientSlots
from server.errors import ResourceExhaustedError


def test_a_client_gets_its_slots_back_however_its_requests_end() -> None:
    slots = ClientSlots(max_per_client=2)
    with slots.hold("alice"), slots.hold("alice"):
        with (
            pytest.raises(ResourceExhaustedError, match="client 'alice' already has 2 requests in flight"),
            slots.hold("alice"),
        ):
            pass
        with slots.hold("bob"):
            assert slots.num_in_flight == {"alice": 2, "bob": 1}
    with pytest.raises(RuntimeError), slots.hold("alice"):
        raise RuntimeError("the request failed")
    assert not slots.num_in_flight


def test_zero_means_no_cap() -> None:
    slots = ClientSlots(max_per_client=0)
    with slots.hold("a"), slots.hold("a"), slots.hold("a"):
        assert slots.num_in_flight["a"] == 3
