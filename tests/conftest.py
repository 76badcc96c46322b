"""Shared fixtures. The real default model is downloaded and converted once into the goodspeed
cache (GOODSPEED_CACHE or ~/.cache/goodspeed) and reused by later runs. Trained speculators are
not: the session looks for them in a directory of its own, so one trained on this machine does
not change what a server started by a test serves (`trained_speculators` finds the real ones)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest


def pytest_report_header() -> str:
    from bench.machine import cpu_flags, cpu_model

    return f"cpu: {cpu_model()} ({' '.join(cpu_flags())})"  # the CPU kernels are built for it


@pytest.fixture(scope="session")
def smollm2_path() -> str:
    from engine.catalog import DEFAULT_MODEL, find_model
    from engine.fetch import pull

    entry = find_model(DEFAULT_MODEL)
    assert entry is not None
    return str(pull(entry, show_progress=False))


@pytest.fixture(scope="session")
def trained_speculators() -> Path:
    """Where this machine's trained speculators are (not where the session's tests look)."""
    return REAL_SPECULATORS


@pytest.fixture(scope="session", autouse=True)
def no_trained_speculators(tmp_path_factory: pytest.TempPathFactory) -> Iterator[None]:
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("GOODSPEED_SPECULATORS", str(tmp_path_factory.mktemp("speculators")))
        yield


def _real_speculators() -> Path:
    from engine.speculator.location import speculators_root

    return speculators_root()


REAL_SPECULATORS = _real_speculators()
