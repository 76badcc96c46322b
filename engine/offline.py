"""Running requests to completion in-process, without the control plane.

A minimal scheduler for benchmarks and tests: admits jobs (all at once, or one every few steps),
prefills them (optionally in chunks), then decodes with a fixed number of draft tokens each.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

from engine.protocol import FinishReason, NewRequest, SamplingParams, ScheduledRequest, StepPlan
from engine.runner import ModelRunner


@dataclass
class Job:
    req_id: str
    prompt_ids: list[int]
    max_new_tokens: int
    num_draft_tokens: int = 0
    sampling: SamplingParams = field(default_factory=SamplingParams)
    prefill_chunk: int = 1 << 30
    drafter: str = ""  # who drafts for it; "" is the engine's first
    # filled while running
    output_ids: list[int] = field(default_factory=list)
    finish_reason: FinishReason = FinishReason.NONE
    num_decode_steps: int = 0
    num_drafted: int = 0
    num_accepted: int = 0
    started_s: float = 0.0
    finished_s: float = 0.0

    @property
    def elapsed_s(self) -> float:
        return self.finished_s - self.started_s


def run_jobs(runner: ModelRunner, jobs: list[Job], eos_ids: list[int], join_every: int = 0) -> list[Job]:
    """Runs jobs to completion in one continuous batch.

    join_every=0 admits every job in the first step; join_every=n admits one more job every n
    steps, so prefills share steps with running decodes.
    """
    waiting = list(jobs)
    running: dict[str, Job] = {}
    step_id = 0
    while waiting or running:
        new = []
        if waiting and (join_every == 0 or step_id % join_every == 0):
            admitted = waiting if join_every == 0 else waiting[:1]
            waiting = waiting[len(admitted) :]
            for job in admitted:
                job.started_s = time.perf_counter()
                new.append(NewRequest(job.req_id, job.prompt_ids, job.max_new_tokens, job.sampling, eos_ids))
                running[job.req_id] = job
        scheduled = []
        for job in running.values():
            seq = runner.seqs.get(job.req_id)
            if seq is None or seq.is_prefilling:
                scheduled.append(ScheduledRequest(job.req_id, num_prompt_tokens=job.prefill_chunk))
            else:
                scheduled.append(
                    ScheduledRequest(job.req_id, num_draft_tokens=job.num_draft_tokens, drafter=job.drafter)
                )
        result = runner.step(StepPlan(step_id, new_requests=new, scheduled=scheduled))
        step_id += 1
        for output in result.outputs:
            job = running[output.req_id]
            job.num_decode_steps += bool(output.new_token_ids)
            job.output_ids += output.new_token_ids
            job.num_drafted += output.num_drafted
            job.num_accepted += output.num_accepted
            if output.finish_reason != FinishReason.NONE:
                job.finish_reason = FinishReason(output.finish_reason)
                job.finished_s = time.perf_counter()
                del running[output.req_id]
    return jobs


def run_alone(runner: ModelRunner, job: Job, eos_ids: list[int]) -> Job:
    return run_jobs(runner, [job], eos_ids)[0]
