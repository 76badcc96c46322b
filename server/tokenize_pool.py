"""Tokenization off the event loop, in two lanes.

Tokenizing takes about a microsecond a byte (a second for the largest prompt the default model's
context can hold), so it never runs on the event loop: streams and health checks would wait it
out. Prompts up to SMALL_PROMPT_CHARS characters, nearly all of them, go to a few worker threads
and are back within milliseconds. Larger ones go to threads of their own at the lowest CPU
priority: below the engine's, so a flood of large prompts takes the cores the engine leaves
rather than slowing every running stream, and apart from the small lane, so it cannot delay
small prompts. The large lane's queue is bounded; beyond it a request is refused at once.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import sys
import threading
from concurrent.futures import Future, ThreadPoolExecutor
from functools import partial

import anyio
import anyio.to_thread

from server.errors import InvalidArgumentError, ResourceExhaustedError
from server.request import ChatMessage
from server.tokenizer import ChatTemplateError, TextTokenizer, TooManyTokensError

SMALL_PROMPT_CHARS = 32 << 10  # tokenized within about 30 ms
NUM_SMALL_THREADS = 2
LARGE_NICE = 19  # the lowest priority; the engine runs at --engine-nice (10)
LARGE_QUEUE_PER_THREAD = 4  # large prompts waiting for a thread, beyond the one it works on


def _lower_priority(nice: int) -> None:
    # Linux gives each thread a nice value of its own; elsewhere this would renice the process.
    if sys.platform.startswith("linux"):
        with contextlib.suppress(OSError):
            os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), nice)


class TokenizerPool:
    def __init__(self, tokenizer: TextTokenizer, num_large_threads: int) -> None:
        self.tokenizer = tokenizer
        self.small = anyio.CapacityLimiter(NUM_SMALL_THREADS)
        self.large = ThreadPoolExecutor(
            num_large_threads, "goodspeed-tokenize", initializer=_lower_priority, initargs=(LARGE_NICE,)
        )
        self.max_large = num_large_threads * (1 + LARGE_QUEUE_PER_THREAD)
        self.num_large = 0  # queued or being tokenized

    async def encode(self, text: str, messages: tuple[ChatMessage, ...], max_tokens: int | None = None) -> list[int]:
        """The ids of a text or of chat messages; more than max_tokens is an InvalidArgumentError."""
        num_chars = len(text) + sum(len(m.content) for m in messages)
        if num_chars <= SMALL_PROMPT_CHARS:
            return await anyio.to_thread.run_sync(
                tokenize, self.tokenizer, text, messages, max_tokens, limiter=self.small
            )
        if self.num_large >= self.max_large:
            raise ResourceExhaustedError(
                f"{self.num_large} prompts of over {SMALL_PROMPT_CHARS} characters are being tokenized, the most "
                "the server queues (--tokenizer-threads); retry later"
            )
        # anyio's worker threads are shared and cannot be given back their priority once lowered,
        # so this lane is an executor of its own (grpc.aio: the loop is asyncio's). A job counts
        # until it is done, even when its caller has gone.
        self.num_large += 1
        job = self.large.submit(tokenize, self.tokenizer, text, messages, max_tokens)
        job.add_done_callback(partial(self._large_done, asyncio.get_running_loop()))
        return await asyncio.wrap_future(job)

    def _large_done(self, loop: asyncio.AbstractEventLoop, _: Future[list[int]]) -> None:
        def count_down() -> None:
            self.num_large -= 1

        with contextlib.suppress(RuntimeError):  # the loop has closed
            loop.call_soon_threadsafe(count_down)

    def close(self) -> None:
        self.large.shutdown(wait=False, cancel_futures=True)


def tokenize(
    tokenizer: TextTokenizer, text: str, messages: tuple[ChatMessage, ...], max_tokens: int | None = None
) -> list[int]:
    try:
        if not messages:
            return tokenizer.encode(text, max_tokens)
        return tokenizer.encode_chat([{"role": m.role, "content": m.content} for m in messages], max_tokens)
    except ChatTemplateError as exc:
        raise InvalidArgumentError("messages", str(exc)) from exc
    except TooManyTokensError as exc:
        field = "messages" if messages else "prompt"
        raise InvalidArgumentError(
            field, f"is {exc.num_tokens} tokens; the model's context is {(max_tokens or 0) + 1} tokens"
        ) from None
