"""Property-based fuzzing of the request surface against the real server (hypothesis).

Every field over its whole range, odd strings, unknown enum values, and raw bytes that may not
decode at all: each call must end OK, INVALID_ARGUMENT or RESOURCE_EXHAUSTED (never UNKNOWN,
INTERNAL or a hang), and the server must be healthy and idle afterwards. The examples are drawn
from a fixed seed (derandomize), so a CI run is repeatable. The server's limits keep valid
requests to a few tokens, so thousands of calls fit in about a minute.
"""

from __future__ import annotations

from collections.abc import Iterator

import grpc
import pytest
from grpc_health.v1 import health_pb2
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from api.pb import generation_pb2 as pb
from client.client import Client
from tests.e2e.conftest import RunningServer, serving

pytestmark = [pytest.mark.model, pytest.mark.slow]

VOCAB_SIZE = 49152  # the default model's
ALLOWED = {grpc.StatusCode.OK, grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.RESOURCE_EXHAUSTED}
FUZZ = settings(
    derandomize=True, deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture]
)

texts = st.text(st.characters(exclude_categories=("Cs",)), max_size=64)  # protobuf strings hold no surrogates
int32s = st.integers(-(2**31), 2**31 - 1)
float32s = st.floats(width=32)
roles = st.one_of(st.sampled_from(["system", "user", "assistant", "", "tool", "User"]), texts)
messages = st.lists(st.builds(pb.ChatMessage, role=roles, content=texts), max_size=4)


@st.composite
def generate_requests(draw: st.DrawFn) -> pb.GenerateRequest:
    request = pb.GenerateRequest(
        prompt=draw(st.one_of(st.just(""), texts)),
        messages=draw(messages),
        stop=draw(st.lists(st.text(st.characters(exclude_categories=("Cs",)), max_size=300), max_size=10)),
        request_id=draw(texts),
    )
    optional = {
        "max_new_tokens": int32s,
        "temperature": float32s,
        "top_p": float32s,
        "top_k": int32s,
        "seed": st.integers(0, 2**64 - 1),
    }
    for name, values in optional.items():
        value = draw(st.one_of(st.none(), values))
        if value is not None:
            setattr(request, name, value)
    if draw(st.booleans()):
        request.speculation.CopyFrom(pb.Speculation(mode=draw(st.integers(-3, 6)), num_draft_tokens=draw(int32s)))
    return request


@st.composite
def legal_requests(draw: st.DrawFn) -> pb.GenerateRequest:
    """Valid, but at the edges: tiny and huge temperatures, any top_k and seed, every mode."""
    chat = st.lists(st.builds(pb.ChatMessage, role=st.sampled_from(["system", "user", "assistant"]), content=texts))
    request = pb.GenerateRequest(
        max_new_tokens=draw(st.integers(1, 4)),
        temperature=draw(
            st.one_of(st.just(0.0), st.floats(0, allow_nan=False, allow_infinity=False, width=32, exclude_min=True))
        ),
        top_p=draw(st.floats(0, 1, width=32, exclude_min=True)),
        top_k=draw(st.integers(0, 2**31 - 1)),
        seed=draw(st.integers(0, 2**64 - 1)),
        stop=draw(st.lists(st.text(st.characters(exclude_categories=("Cs",)), min_size=1, max_size=20), max_size=3)),
    )
    if draw(st.booleans()):
        request.prompt = draw(texts.filter(bool))
    else:
        request.messages.extend(draw(chat.filter(bool)))
    mode = draw(st.sampled_from([pb.SPECULATION_MODE_UNSPECIFIED, pb.AUTO, pb.OFF, pb.FIXED]))
    request.speculation.CopyFrom(
        pb.Speculation(mode=mode, num_draft_tokens=draw(st.integers(1, 8)) if mode == pb.FIXED else 0)
    )
    return request


@pytest.fixture(scope="module")
def fuzzed(smollm2_path: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningServer]:
    # Valid requests make at most 4 tokens; small limits keep the start-up profile short.
    flags = "--default-max-new-tokens 2 --max-new-tokens-limit 4 --max-running-requests 4 --max-step-tokens 64"
    yield from serving(tmp_path_factory, "fuzz", flags)


@pytest.fixture(scope="module")
def channel(fuzzed: RunningServer) -> Iterator[grpc.Channel]:
    with grpc.insecure_channel(fuzzed.target) as opened:
        yield opened


def code_of(call: object) -> grpc.StatusCode:
    try:
        call()  # type: ignore[operator]
    except grpc.RpcError as exc:
        return exc.code()  # type: ignore[no-any-return]
    return grpc.StatusCode.OK


@settings(FUZZ, max_examples=1500)
@given(request=generate_requests(), is_stream=st.booleans())
def test_generate_with_any_fields(channel: grpc.Channel, request: pb.GenerateRequest, is_stream: bool) -> None:
    if is_stream:
        stream = channel.unary_stream(
            "/goodspeed.v1.Generation/GenerateStream",
            request_serializer=pb.GenerateRequest.SerializeToString,
            response_deserializer=pb.GenerateChunk.FromString,
        )
        code = code_of(lambda: list(stream(request, timeout=60)))
    else:
        unary = channel.unary_unary(
            "/goodspeed.v1.Generation/Generate",
            request_serializer=pb.GenerateRequest.SerializeToString,
            response_deserializer=pb.GenerateResponse.FromString,
        )
        code = code_of(lambda: unary(request, timeout=60))
    event(code.name)
    assert code in ALLOWED, (code, request)


@settings(FUZZ, max_examples=200)
@given(request=legal_requests())
def test_legal_extremes_generate_sane_output(channel: grpc.Channel, request: pb.GenerateRequest) -> None:
    unary = channel.unary_unary(
        "/goodspeed.v1.Generation/Generate",
        request_serializer=pb.GenerateRequest.SerializeToString,
        response_deserializer=pb.GenerateResponse.FromString,
    )
    response = unary(request, timeout=60)
    assert 1 <= len(response.token_ids) == response.usage.completion_tokens <= request.max_new_tokens
    assert all(0 <= t < VOCAB_SIZE for t in response.token_ids)
    assert response.seed == request.seed
    assert response.finish_reason in (pb.LENGTH, pb.EOS, pb.STOP)


@settings(FUZZ, max_examples=500)
@given(text=st.one_of(st.just(""), texts), chat=messages)
def test_tokenize_with_any_fields(channel: grpc.Channel, text: str, chat: list[pb.ChatMessage]) -> None:
    tokenize = channel.unary_unary(
        "/goodspeed.v1.Generation/Tokenize",
        request_serializer=pb.TokenizeRequest.SerializeToString,
        response_deserializer=pb.TokenizeResponse.FromString,
    )
    code = code_of(lambda: tokenize(pb.TokenizeRequest(text=text, messages=chat), timeout=60))
    event(code.name)
    assert code in ALLOWED


METHODS = [
    "Generation/Generate",
    "Generation/GenerateStream",
    "Generation/Tokenize",
    "Generation/GetStats",
    "Admin/SetPolicy",
]


@settings(FUZZ, max_examples=1000)
@given(data=st.binary(max_size=128), method=st.sampled_from(METHODS))
def test_raw_bytes_to_every_method(channel: grpc.Channel, data: bytes, method: str) -> None:
    path = f"/goodspeed.v1.{method}"
    if method.endswith("Stream"):
        code = code_of(lambda: list(channel.unary_stream(path)(data, timeout=60)))
    else:
        code = code_of(lambda: channel.unary_unary(path)(data, timeout=60))
    event(code.name)
    assert code in ALLOWED, (code, data.hex())


def test_the_server_is_healthy_idle_and_quiet_after_the_fuzzing(fuzzed: RunningServer) -> None:
    with Client(fuzzed.target) as client:
        reply = client.health.Check(health_pb2.HealthCheckRequest(), timeout=10)
        assert reply.status == health_pb2.HealthCheckResponse.SERVING
        stats = client.stats()
    assert stats.requests_running == stats.requests_waiting == stats.kv_tokens_used == 0
    assert "Traceback" not in fuzzed.log()
