"""Where a figure was taken: CPU model, core count, platform (machines of one kind differ)."""

from __future__ import annotations

import os
import platform
from pathlib import Path


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def machine_facts() -> dict[str, str | int]:
    return {"cpu_model": cpu_model(), "num_cpus": os.cpu_count() or 0, "platform": platform.platform()}
