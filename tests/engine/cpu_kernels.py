"""The C++ CPU kernels, for the tests of each: skipped without a compiler, a failure if one is here
and the build breaks."""

from __future__ import annotations

import shutil

import pytest

from engine.model.cpu_kernels import cpu_kernels_built


def require_cpu_kernels() -> None:
    if shutil.which("c++") is None:
        pytest.skip("no C++ compiler here: the engine runs torch's operators instead")
    assert cpu_kernels_built(), "a C++ compiler is here but the kernels did not build (see the warning logged)"
