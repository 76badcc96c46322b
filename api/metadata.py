"""gRPC metadata keys that clients send and the server reads."""

from __future__ import annotations

# Diagnostics: a GenerateStream call with this header gets, in its trailing metadata under
# STEP_END_TRAILER, the CLOCK_MONOTONIC time (ns, comma-separated) at which the engine step that
# made each chunk ended. Comparable with time.monotonic_ns() on the server's host only.
STEP_TIMING_HEADER = "goodspeed-step-timing"
STEP_END_TRAILER = "goodspeed-step-end-ns"
# Who a request is from, for the server's per-client limit (--max-requests-per-client); without
# it the server counts requests by the peer's address. A proxy in front of goodspeed sets it.
CLIENT_ID_HEADER = "goodspeed-client"
# Admin calls carry `authorization: Bearer <admin token>` when the server has a token.
AUTHORIZATION_HEADER = "authorization"


def bearer(token: str) -> str:
    return f"Bearer {token}"
