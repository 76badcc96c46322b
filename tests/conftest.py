"""Shared fixtures. The real default model is downloaded and converted once into the goodspeed
cache (GOODSPEED_CACHE or ~/.cache/goodspeed) and reused by later runs."""

from __future__ import annotations

import pytest


@pytest.fixture(scope="session")
def smollm2_path() -> str:
    from engine.catalog import DEFAULT_MODEL, find_model
    from engine.fetch import pull

    entry = find_model(DEFAULT_MODEL)
    assert entry is not None
    return str(pull(entry, show_progress=False))
