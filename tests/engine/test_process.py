"""The engine process, driven through its shared-memory queues (a tiny random model: these tests
are about the mechanics, not the outputs)."""

from __future__ import annotations

import os
import signal
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from engine.config import EngineConfig
from engine.ipc import EngineDiedError, EngineProcess
from engine.protocol import (
    BatchShape,
    EngineError,
    EngineReady,
    FinishReason,
    NewRequest,
    ProfileRequest,
    ProfileResult,
    ProfileShape,
    ScheduledRequest,
    StepPlan,
    StepResult,
)
from tests.tiny_models import make_tiny_llama

pytestmark = pytest.mark.slow

KV_TOKENS = 512


def start_engine(model: Path | str) -> EngineProcess:
    engine = EngineProcess(EngineConfig(model=str(model), kv_cache_tokens=KV_TOKENS, num_threads=1))
    engine.start()
    return engine


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("tiny-llama")
    make_tiny_llama(path)
    return path


@pytest.fixture(scope="module")
def engine(tiny_model: Path) -> Iterator[tuple[EngineProcess, EngineReady]]:
    engine = start_engine(tiny_model)
    ready = engine.recv(timeout=120)
    assert isinstance(ready, EngineReady), ready
    yield engine, ready
    engine.shutdown()
    assert engine.process.exitcode == 0, engine.process.exitcode


def step(engine: EngineProcess, plan: StepPlan) -> StepResult:
    engine.send(plan)
    result = engine.recv(timeout=30)
    assert isinstance(result, StepResult), result
    assert result.step_id == plan.step_id
    return result


def assert_kv_free(engine: EngineProcess, step_id: int, num_tokens: int) -> None:
    """The engine can hold a request of num_tokens KV tokens now (and forgets it again)."""
    probe = NewRequest("probe", [5], num_tokens - 1, stop_token_ids=[])
    result = step(engine, StepPlan(step_id, [probe], [ScheduledRequest("probe", 1)]))
    assert [o.finish_reason for o in result.outputs] == [FinishReason.NONE], result.outputs[0].error
    step(engine, StepPlan(step_id + 1, finished_req_ids=["probe"]))


def test_ready_reports_the_model_and_kv_capacity(engine: tuple[EngineProcess, EngineReady]) -> None:
    _, ready = engine
    assert ready.kv_capacity_tokens == KV_TOKENS
    assert ready.vocab_size == 128 and ready.eos_token_ids == [127]
    assert ready.model_type == "llama" and ready.device == "cpu"


def test_abort_mid_generation_frees_the_kv(engine: tuple[EngineProcess, EngineReady]) -> None:
    proc, _ = engine
    new = [NewRequest("keep", [5, 6, 7, 8], 20, stop_token_ids=[]), NewRequest("drop", [9, 10, 11], 100)]
    result = step(proc, StepPlan(0, new, [ScheduledRequest("keep", 4), ScheduledRequest("drop", 3)]))
    assert all(len(o.new_token_ids) == 1 for o in result.outputs)
    both = [ScheduledRequest("keep", num_draft_tokens=2), ScheduledRequest("drop", num_draft_tokens=2)]
    for step_id in (1, 2):
        result = step(proc, StepPlan(step_id, scheduled=both))
        assert {o.req_id for o in result.outputs} == {"keep", "drop"}
    # abort "drop": the same plan frees it and keeps "keep" running
    step(proc, StepPlan(3, scheduled=[both[0]], finished_req_ids=["drop"]))
    assert_kv_free(proc, 4, KV_TOKENS - (4 + 20))
    step_id, reason = 6, FinishReason.NONE
    while reason == FinishReason.NONE:
        result = step(proc, StepPlan(step_id, scheduled=[both[0]]))
        reason, step_id = result.outputs[0].finish_reason, step_id + 1
    assert reason == FinishReason.LENGTH
    assert_kv_free(proc, step_id, KV_TOKENS)


def test_profile_times_uniform_and_mixed_batches(engine: tuple[EngineProcess, EngineReady]) -> None:
    proc, _ = engine
    uniform, mixed, too_big = ProfileShape(2, 3, 16), ProfileShape(1, 2, 16, num_plain_seqs=3), ProfileShape(9, 8, 60)
    proc.send(ProfileRequest([uniform, mixed, too_big], repeats=1))
    result = proc.recv(timeout=60)
    assert isinstance(result, ProfileResult), result
    # (query tokens, KV tokens attended) per sequence; the third shape does not fit in the KV cache.
    assert [s.shape for s in result.samples] == [BatchShape.of([(3, 19)] * 2), BatchShape.of([(2, 18)] + [(1, 17)] * 3)]
    assert all(s.step_s > 0 for s in result.samples)
    assert result.samples[1].shape.num_multi_token_seqs == 1
    assert_kv_free(proc, 20, KV_TOKENS)  # the profile gave its KV regions back


def test_unknown_or_oversized_requests_get_an_error_not_a_crash(engine: tuple[EngineProcess, EngineReady]) -> None:
    proc, _ = engine
    plan = StepPlan(
        10,
        [NewRequest("huge", [1, 2, 3], KV_TOKENS)],
        [ScheduledRequest("huge", 3), ScheduledRequest("ghost", 1)],
    )
    result = step(proc, plan)
    errors = {o.req_id: o.error for o in result.outputs}
    assert all(o.finish_reason == FinishReason.ERROR for o in result.outputs)
    assert "needs 515 KV tokens" in errors["huge"]
    assert errors["ghost"] == "unknown request"
    assert step(proc, StepPlan(11)).outputs == []  # still serving


def test_ctrl_c_is_left_to_the_server(engine: tuple[EngineProcess, EngineReady]) -> None:
    proc, _ = engine
    assert proc.process.pid is not None
    os.kill(proc.process.pid, signal.SIGINT)  # what a terminal's Ctrl-C sends the whole group
    time.sleep(0.5)
    assert proc.process.is_alive()
    assert step(proc, StepPlan(30)).outputs == []


def test_idle_engine_uses_no_cpu(engine: tuple[EngineProcess, EngineReady]) -> None:
    proc, _ = engine

    def cpu_seconds() -> float:
        fields = Path(f"/proc/{proc.process.pid}/stat").read_text().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / 100  # utime + stime, in clock ticks of 1/100 s

    before = cpu_seconds()
    time.sleep(1.5)
    assert cpu_seconds() - before < 0.05


def test_killed_engine_is_noticed_at_once(tiny_model: Path) -> None:
    proc = start_engine(tiny_model)
    assert isinstance(proc.recv(timeout=120), EngineReady)
    died_with: list[int | None] = []
    proc.on_death(died_with.append)
    killed_at = time.perf_counter()
    proc.process.kill()
    message = proc.recv(timeout=10)
    assert time.perf_counter() - killed_at < 1.0
    assert isinstance(message, EngineError) and "exit code -9" in message.message
    assert died_with == [-9]
    with pytest.raises(EngineDiedError):
        proc.send(StepPlan(0))


def test_a_model_that_cannot_load_reports_why(tmp_path: Path) -> None:
    proc = start_engine(tmp_path / "missing-model")
    message = proc.recv(timeout=120)
    assert isinstance(message, EngineError)
    assert "engine failed to start" in message.message and "unknown model" in message.message
    proc.shutdown()
