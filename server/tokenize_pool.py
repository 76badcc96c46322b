"""Tokenization off the event loop, in two lanes.

Tokenizing takes about a microsecond a byte (a second for the largest prompt the default model's
context can hold), so it never runs on the event loop: streams and health checks would wait it
out. Prompts up to SMALL_PROMPT_CHARS characters, nearly all of them, go to a few worker threads and are
back within milliseconds. Larger ones go to threads of their own at the lowest CPU priority:
below the engine's, so a flood of large prompts takes the cores the engine leaves rather than
slowing every running stream, and apart from the small lane, so it cannot delay small prompts.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import sys
import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import TypeVar

import anyio
import anyio.to_thread

SMALL_PROMPT_CHARS = 32 << 10  # tokenized within about 30 ms
NUM_SMALL_THREADS = 2
LARGE_NICE = 19  # the lowest priority; the engine runs at --engine-nice (10)

T = TypeVar("T")


def _lower_priority(nice: int) -> None:
    # Linux gives each thread a nice value of its own; elsewhere this would renice the process.
    if sys.platform.startswith("linux"):
        with contextlib.suppress(OSError):
            os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), nice)


class TokenizerPool:
    def __init__(self, num_large_threads: int) -> None:
        self.small = anyio.CapacityLimiter(NUM_SMALL_THREADS)
        self.large = ThreadPoolExecutor(
            num_large_threads, "goodspeed-tokenize", initializer=_lower_priority, initargs=(LARGE_NICE,)
        )

    async def run(self, num_chars: int, fn: Callable[..., T], *args: object) -> T:
        if num_chars <= SMALL_PROMPT_CHARS:
            return await anyio.to_thread.run_sync(fn, *args, limiter=self.small)
        # anyio's worker threads are shared and cannot be given back their priority once lowered,
        # so the large lane is an executor of its own (grpc.aio means the loop is asyncio's).
        return await asyncio.wrap_future(self.large.submit(fn, *args))

    def close(self) -> None:
        self.large.shutdown(wait=False, cancel_futures=True)
