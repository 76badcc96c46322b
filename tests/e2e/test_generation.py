"""The real server process on a real port, through the Python clients."""

from __future__ import annotations

import threading
import time
import urllib.request

import anyio
import grpc
import pytest

from api.metadata import STEP_END_TRAILER, STEP_TIMING_HEADER
from api.pb import generation_pb2 as pb
from bench import wire
from bench.workloads import completion_workload, editing_workload
from client.client import AsyncClient, Client, build_request
from server.policy.cost_model import FEATURES
from tests.e2e.conftest import RunningServer

pytestmark = [pytest.mark.model, pytest.mark.slow]


def test_unary_and_stream_agree(client: Client) -> None:
    prompt = completion_workload(1)[0].prompt
    response = client.generate(prompt, max_new_tokens=40)
    chunks = list(client.generate_stream(prompt, max_new_tokens=40))
    assert response.text and response.finish_reason in (pb.LENGTH, pb.EOS)
    assert response.usage.completion_tokens == len(response.token_ids) <= 40
    assert response.usage.prompt_tokens == len(client.tokenize(prompt))
    assert "".join(c.text for c in chunks) == response.text
    assert [t for c in chunks for t in c.token_ids] == list(response.token_ids)
    last = chunks[-1]
    assert last.finish_reason == response.finish_reason and last.usage == response.usage
    assert all(c.finish_reason == pb.FINISH_REASON_UNSPECIFIED for c in chunks[:-1])
    for chunk in chunks:
        assert chunk.token_ids, "one chunk per step, each with that step's tokens"
        assert chunk.accepted_tokens <= chunk.drafted_tokens
        if chunk.drafted_tokens:
            assert len(chunk.token_ids) <= chunk.accepted_tokens + 1
    spec = response.speculation
    assert spec.steps == len(spec.draft_lengths) and spec.accepted_tokens <= spec.drafted_tokens


def test_speculation_pays_on_editing_and_changes_nothing(client: Client) -> None:
    item = editing_workload(1)[0]
    messages = [(m["role"], m["content"]) for m in item.messages or []]
    plain = client.generate(messages=messages, max_new_tokens=64, speculation="off")
    fixed = client.generate(messages=messages, max_new_tokens=64, speculation="fixed", num_draft_tokens=6)
    assert fixed.token_ids == plain.token_ids
    assert plain.speculation.drafted_tokens == 0
    assert fixed.speculation.accepted_tokens > 0 and fixed.speculation.mean_accepted_length > 1.5
    assert set(fixed.speculation.draft_lengths) <= {6, 5, 4, 3, 2, 1, 0}


async def test_sixteen_concurrent_streams_match_each_alone(server: RunningServer) -> None:
    prompts = [item.prompt or "" for item in completion_workload(16)]
    async with AsyncClient(server.target) as client:
        alone = [(await client.generate(p, max_new_tokens=32)).token_ids for p in prompts]
        together: list[list[int]] = [[] for _ in prompts]

        async def stream(i: int) -> None:
            async for chunk in client.generate_stream(prompts[i], max_new_tokens=32):
                together[i] += chunk.token_ids

        async with anyio.create_task_group() as tg:
            for i in range(len(prompts)):
                tg.start_soon(stream, i)
        stats = await client.stats()
    assert [list(t) for t in alone] == together
    assert stats.requests_running == 0 and stats.kv_tokens_used == 0


def test_step_end_times_come_back_when_asked(client: Client) -> None:
    # Diagnostics for the chunk latency: each chunk's step end (CLOCK_MONOTONIC, this host),
    # before the moment the client read it.
    request = build_request(completion_workload(1)[0].prompt, max_new_tokens=12)
    arrived_ns = []
    call = client.stub.GenerateStream(request, metadata=((STEP_TIMING_HEADER, "1"),))
    for _ in call:
        arrived_ns.append(time.monotonic_ns())
    step_end_ns = [int(v) for v in dict(call.trailing_metadata())[STEP_END_TRAILER].split(",")]
    assert len(step_end_ns) == len(arrived_ns) > 1
    assert step_end_ns == sorted(step_end_ns)
    assert all(0 < end < arrived < end + 10**9 for end, arrived in zip(step_end_ns, arrived_ns, strict=True))
    plain = client.stub.GenerateStream(request)
    list(plain)
    assert STEP_END_TRAILER not in dict(plain.trailing_metadata())


def test_chunks_are_timed_on_the_wire(server: RunningServer) -> None:
    # `bench service` times each chunk to the packet that carries it out of the server.
    if not wire.can_capture():
        pytest.skip("capturing packets needs CAP_NET_RAW (root)")
    request = build_request(completion_workload(1)[0].prompt, max_new_tokens=12, request_id="wire-timed")
    chunks, arrived_ns = [], []
    with wire.capture(server.port) as captured, Client(server.target) as fresh:  # its connection opens inside
        call = fresh.stub.GenerateStream(request, metadata=((STEP_TIMING_HEADER, "1"),))
        for chunk in call:
            chunks.append(chunk)
            arrived_ns.append(time.monotonic_ns())
        step_end_ns = [int(v) for v in dict(call.trailing_metadata())[STEP_END_TRAILER].split(",")]
    sent = [(m.monotonic_ns, pb.GenerateChunk.FromString(m.data)) for m in captured.messages()]
    assert [chunk for _, chunk in sent] == chunks
    sent_ns = [at for at, _ in sent]
    assert all(end < at < read for end, at, read in zip(step_end_ns, sent_ns, arrived_ns, strict=True))


def test_chat_messages_and_stop_sequences(client: Client) -> None:
    messages = [("system", "You answer briefly."), ("user", "List three colours, one per line.")]
    plain = client.generate(messages=messages, max_new_tokens=48)
    assert plain.usage.prompt_tokens == len(client.tokenize(messages=messages))
    assert "\n" in plain.text.strip(), "the test needs an answer of several lines"
    stopped = client.generate(messages=messages, max_new_tokens=48, stop=["\n"])
    assert stopped.finish_reason == pb.STOP
    assert "\n" not in stopped.text and plain.text.startswith(stopped.text)


def test_seeded_sampling_repeats(client: Client) -> None:
    prompt = "Once upon a time"
    a = client.generate(prompt, max_new_tokens=24, temperature=0.9, top_p=0.95, seed=1234)
    b = client.generate(prompt, max_new_tokens=24, temperature=0.9, top_p=0.95, seed=1234)
    c = client.generate(prompt, max_new_tokens=24, temperature=0.9, top_p=0.95)
    assert a.token_ids == b.token_ids and a.seed == 1234
    assert c.seed != 0  # a seed was drawn and is reported, so the output can be reproduced
    d = client.generate(prompt, max_new_tokens=24, temperature=0.9, top_p=0.95, seed=c.seed)
    assert d.token_ids == c.token_ids


# SmolLM2 keeps writing (and repeating itself) for far more than a second on this one.
LONG_ANSWER = [pb.ChatMessage(role="user", content="Write a long poem about the sea.")]


def wait_until_idle(client: Client, timeout: float = 5.0) -> pb.Stats:
    deadline = time.monotonic() + timeout
    while True:
        stats = client.stats()
        if stats.requests_running == 0 and stats.requests_waiting == 0:
            return stats
        assert time.monotonic() < deadline, f"still busy: {stats}"
        time.sleep(0.02)


def test_cancel_mid_stream_frees_the_request(client: Client) -> None:
    before = client.stats().requests_finished
    call = client.stub.GenerateStream(pb.GenerateRequest(messages=LONG_ANSWER, max_new_tokens=2000))
    received = [next(call) for _ in range(3)]
    assert all(c.token_ids for c in received)
    call.cancel()
    stats = wait_until_idle(client)
    assert stats.requests_finished == before + 1 and stats.kv_tokens_used == 0


def test_deadline_exceeded(client: Client) -> None:
    with pytest.raises(grpc.RpcError) as excinfo:
        client.generate(messages=[(m.role, m.content) for m in LONG_ANSWER], max_new_tokens=2000, timeout=0.8)
    assert excinfo.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    stats = wait_until_idle(client)
    assert stats.kv_tokens_used == 0


BAD_REQUESTS = {
    "empty prompt": (pb.GenerateRequest(), "prompt"),
    "prompt and messages": (
        pb.GenerateRequest(prompt="hi", messages=[pb.ChatMessage(role="user", content="hi")]),
        "prompt",
    ),
    "prompt over the context": (pb.GenerateRequest(prompt="hello " * 9000), "prompt"),
    "prompt + max_new_tokens over the context": (
        pb.GenerateRequest(prompt="hello " * 4500, max_new_tokens=4096),
        "max_new_tokens",
    ),
    "max_new_tokens 0": (pb.GenerateRequest(prompt="hi", max_new_tokens=0), "max_new_tokens"),
    "max_new_tokens negative": (pb.GenerateRequest(prompt="hi", max_new_tokens=-3), "max_new_tokens"),
    "max_new_tokens over the limit": (pb.GenerateRequest(prompt="hi", max_new_tokens=100_000), "max_new_tokens"),
    "temperature negative": (pb.GenerateRequest(prompt="hi", temperature=-0.5), "temperature"),
    "temperature nan": (pb.GenerateRequest(prompt="hi", temperature=float("nan")), "temperature"),
    "temperature inf": (pb.GenerateRequest(prompt="hi", temperature=float("inf")), "temperature"),
    "top_p 0": (pb.GenerateRequest(prompt="hi", top_p=0.0), "top_p"),
    "top_p above 1": (pb.GenerateRequest(prompt="hi", top_p=1.5), "top_p"),
    "top_k negative": (pb.GenerateRequest(prompt="hi", top_k=-1), "top_k"),
    "unknown speculation mode": (
        pb.GenerateRequest(prompt="hi", speculation=pb.Speculation(mode=7)),
        "speculation.mode",
    ),
    "FIXED with k 0": (
        pb.GenerateRequest(prompt="hi", speculation=pb.Speculation(mode=pb.FIXED)),
        "speculation.num_draft_tokens",
    ),
    "FIXED with k too large": (
        pb.GenerateRequest(prompt="hi", speculation=pb.Speculation(mode=pb.FIXED, num_draft_tokens=99)),
        "speculation.num_draft_tokens",
    ),
    "too many stop sequences": (pb.GenerateRequest(prompt="hi", stop=[str(i) for i in range(9)]), "stop"),
    "empty stop sequence": (pb.GenerateRequest(prompt="hi", stop=["ok", ""]), "stop[1]"),
    "unknown chat role": (
        pb.GenerateRequest(messages=[pb.ChatMessage(role="wizard", content="hi")]),
        "messages[0].role",
    ),
}


@pytest.mark.parametrize("case", BAD_REQUESTS.values(), ids=BAD_REQUESTS.keys())
def test_bad_fields_are_invalid_argument_naming_the_field(client: Client, case: tuple[pb.GenerateRequest, str]) -> None:
    request, field = case
    for call in (client.stub.Generate, lambda r: list(client.stub.GenerateStream(r))):
        with pytest.raises(grpc.RpcError) as excinfo:
            call(request)
        assert excinfo.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert excinfo.value.details().startswith(f"{field}:"), excinfo.value.details()


def test_bad_requests_do_not_disturb_a_running_stream(client: Client) -> None:
    prompt = completion_workload(2)[1].prompt
    expected = client.generate(prompt, max_new_tokens=48).token_ids
    got: list[int] = []

    def consume() -> None:
        for chunk in client.generate_stream(prompt, max_new_tokens=48):
            got.extend(chunk.token_ids)

    thread = threading.Thread(target=consume)
    thread.start()
    for request, _ in BAD_REQUESTS.values():
        with pytest.raises(grpc.RpcError):
            client.stub.Generate(request)
    thread.join(60)
    assert got == list(expected)


def test_tokenize_model_info_and_stats(client: Client) -> None:
    assert client.tokenize("hello world") == [28120, 905]
    info = client.model_info()
    assert info.model == "smollm2-135m" and info.model_type == "llama" and info.max_model_len == 8192
    assert info.dtype == "float32" and info.drafter == "ngram" and info.eos_token_ids == [2]
    client.generate("def square(x):", max_new_tokens=8)
    stats = client.stats()
    assert stats.steps > 0 and stats.generated_tokens > 0 and stats.requests_finished > 0
    assert len(stats.accepted_per_position) == info.max_draft_tokens
    assert len(stats.drafts_per_length) == info.max_draft_tokens + 1
    assert stats.kv_tokens_capacity == info.kv_capacity_tokens and stats.mean_step_s > 0
    assert stats.cost_model_error > 0 and set(stats.cost_model_ms) == set(FEATURES)


def test_admin_policy_needs_the_token_and_takes_effect(server: RunningServer, client: Client) -> None:
    with Client(server.target) as anonymous, pytest.raises(grpc.RpcError) as excinfo:
        anonymous.get_policy()
    assert excinfo.value.code() == grpc.StatusCode.UNAUTHENTICATED
    original = client.get_policy()
    assert original.mode == pb.AUTO and original.max_draft_tokens == 8
    try:
        off = client.set_policy(pb.Policy(mode=pb.OFF))
        assert off.mode == pb.OFF and off.num_draft_tokens == original.num_draft_tokens
        item = editing_workload(1)[0]
        messages = [(m["role"], m["content"]) for m in item.messages or []]
        response = client.generate(messages=messages, max_new_tokens=24)
        assert response.speculation.drafted_tokens == 0
        with pytest.raises(grpc.RpcError) as excinfo:
            client.set_policy(pb.Policy(num_draft_tokens=50))
        assert excinfo.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert excinfo.value.details().startswith("policy.num_draft_tokens:")
        with pytest.raises(grpc.RpcError) as excinfo:
            client.set_policy(pb.Policy(drafter="medusa"))
        assert excinfo.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert excinfo.value.details() == "policy.drafter: unknown drafter 'medusa'; this server has ngram, self"
        assert client.set_policy(pb.Policy(drafter="ngram")).drafter == "ngram"
    finally:
        restored = client.set_policy(original)
    assert restored == original


def test_prometheus_metrics(server: RunningServer, client: Client) -> None:
    client.generate("def cube(x):", max_new_tokens=8, speculation="fixed", num_draft_tokens=2)
    text = urllib.request.urlopen(f"http://127.0.0.1:{server.metrics_port}/metrics", timeout=5).read().decode()
    for name in (
        "goodspeed_requests_total",
        "goodspeed_generated_tokens_total",
        "goodspeed_step_seconds_bucket",
        'goodspeed_spec_draft_tokens_total{drafter="ngram"}',
        'goodspeed_spec_draft_seconds_bucket{drafter="ngram"',
        'goodspeed_policy_acceptance_rate{draft_token="first",drafter="ngram"}',
        "goodspeed_kv_tokens_capacity",
        "goodspeed_request_seconds",
    ):
        assert name in text, name


def test_finished_requests_are_logged_with_their_figures(server: RunningServer, client: Client) -> None:
    client.generate("def log_me(x):", max_new_tokens=4, request_id="log-me-please")
    time.sleep(0.2)
    lines = [line for line in server.log().splitlines() if "log-me-please" in line]
    assert lines and "request finished" in lines[-1]
    for figure in ("completion_tokens", "ttft_s", "mean_accepted_length", "finish_reason"):
        assert figure in lines[-1]
