"""The server's scheduler and speculation policy driving an engine in this process.

`bench engine` runs every one of our batch-1 variants through this: the same planning, policy
and bookkeeping a served request gets (AUTO included, with its start-up profile), without gRPC
and without the process boundary, so what is compared with transformers is the engine and the
control plane's decisions, not transport.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import anyio

from api.speculation import SpeculationMode
from engine.profile import profile_steps
from engine.protocol import EngineReady, SamplingParams, StepSample
from engine.runner import ModelRunner
from server.app import build_policy, configure_logging, scheduler_limits, start_up_profile_shapes
from server.config import ServerConfig
from server.policy.profile import REPEATS
from server.request import GenerationRequest, SpeculationSummary
from server.request_state import RequestState, Status
from server.scheduler import Scheduler
from server.text_stream import TextStream
from server.tokenizer import TextTokenizer


@dataclass(frozen=True, slots=True)
class Outcome:
    output_ids: list[int]
    seconds: float  # arrival to last token
    speculation: SpeculationSummary  # the request's, as its response would report it


class InProcessServer:
    """One server's control plane (its own policy, with what it learns) over a shared runner."""

    def __init__(self, runner: ModelRunner, ready: EngineReady, tokenizer: TextTokenizer) -> None:
        configure_logging("console", "warning")  # the policy's per-step debug lines would drown the table
        self.runner, self.ready, self.tokenizer = runner, ready, tokenizer
        self.policy = build_policy(ServerConfig(), ready)
        self.scheduler = Scheduler(scheduler_limits(ServerConfig(), ready), self.policy)
        self.num_requests = 0

    def profile(self) -> dict[str, list[StepSample]]:
        """The server's start-up profile: the target's steps ("") and each draft model's forwards."""
        shapes = start_up_profile_shapes(ServerConfig(), self.ready)
        return {
            drafter: profile_steps(self.runner, shapes, REPEATS, drafter)
            for drafter in ["", *self.ready.model_drafters]
        }

    def warm(self, profile: dict[str, list[StepSample]]) -> None:
        for drafter, samples in profile.items():
            self.policy.warm([(s.shape, s.step_s) for s in samples], drafter)

    def generate(
        self,
        prompt_ids: list[int],
        max_new_tokens: int,
        mode: SpeculationMode = SpeculationMode.AUTO,
        num_draft_tokens: int = 0,
        drafter: str = "",
    ) -> Outcome:
        """One greedy request, alone, as the server would run it."""
        return anyio.run(self._generate, prompt_ids, max_new_tokens, mode, num_draft_tokens, drafter)

    async def _generate(
        self, prompt_ids: list[int], max_new_tokens: int, mode: SpeculationMode, num_draft_tokens: int, drafter: str
    ) -> Outcome:
        self.num_requests += 1
        req_id = f"bench-{self.num_requests}"
        request = GenerationRequest(
            request_id=req_id,
            prompt="(token ids)",
            max_new_tokens=max_new_tokens,
            speculation_mode=mode,
            num_draft_tokens=num_draft_tokens,
            drafter=drafter,
        )
        state = RequestState(
            req_id=req_id,
            request=request,
            prompt_ids=prompt_ids,
            sampling=SamplingParams(),
            stop_token_ids=list(self.ready.eos_token_ids),
            text=TextStream(self.tokenizer, ()),
        )
        started = time.perf_counter()
        self.scheduler.add(state)
        while state.status != Status.FINISHED:
            plan = self.scheduler.schedule()
            if plan is None:
                raise RuntimeError("the scheduler has nothing to run for an unfinished request")
            result = self.runner.step(plan)
            self.scheduler.update(result)
            self.scheduler.observe_step(result)
            self.scheduler.take_finished()
        seconds = time.perf_counter() - started
        plan = self.scheduler.schedule()  # tells the engine what ended, if anything
        if plan is not None:
            self.runner.step(plan)
        return Outcome(list(state.output_ids), seconds, state.speculation)
