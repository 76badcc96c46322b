"""One real server with mTLS, the admin token from a file and metrics bound to 127.0.0.1; our
clients, the CLI and the real grpcurl binary talk to it."""

from __future__ import annotations

import json
import subprocess
import urllib.request
from collections.abc import Iterator

import grpc
import pytest

from api.pb import generation_pb2 as pb
from client.cli import main as cli_main
from client.client import Client
from tests.certs import CertFiles, write_certs
from tests.e2e.conftest import RunningServer, start_server
from tests.e2e.test_grpcurl import grpcurl_binary

pytestmark = [pytest.mark.model, pytest.mark.slow]

ADMIN_TOKEN = "token-from-a-file"


@pytest.fixture(scope="module")
def certs(tmp_path_factory: pytest.TempPathFactory) -> CertFiles:
    return write_certs(tmp_path_factory.mktemp("certs"))


@pytest.fixture(scope="module")
def tls_server(
    smollm2_path: str, certs: CertFiles, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[RunningServer]:
    token_file = certs.ca_cert.parent / "admin-token"
    token_file.write_text(f"{ADMIN_TOKEN}\n")
    running = start_server(
        tmp_path_factory.mktemp("tls"),
        *certs.server_flags(),
        "--admin-token-file",
        str(token_file),
        "--metrics-host",
        "127.0.0.1",
        # Small limits keep the start-up profile short.
        "--max-running-requests",
        "2",
        "--max-step-tokens",
        "32",
        "--max-new-tokens-limit",
        "16",
        "--default-max-new-tokens",
        "16",
        tls=certs.client_tls(),
    )
    yield running
    assert running.stop() == 0, running.log()


def grpcurl_tls(
    server: RunningServer, certs: CertFiles, *args: str, data: object = None
) -> subprocess.CompletedProcess[str]:
    cmd = [str(grpcurl_binary()), "-cacert", str(certs.ca_cert), "-cert", str(certs.client_cert)]
    cmd += ["-key", str(certs.client_key)]
    if data is not None:
        cmd += ["-d", json.dumps(data)]
    cmd += [server.target, *args]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=120, check=False)


def test_generate_over_mtls(tls_server: RunningServer, certs: CertFiles) -> None:
    with Client(tls_server.target, tls=certs.client_tls()) as client:
        response = client.generate("def add(a, b):", max_new_tokens=8)
    assert response.usage.completion_tokens == 8 and response.text


@pytest.mark.parametrize("with_tls", [False, True], ids=["plaintext", "no-client-cert"])
def test_clients_without_a_certificate_are_refused(tls_server: RunningServer, certs: CertFiles, with_tls: bool) -> None:
    tls = certs.client_tls(with_client_cert=False) if with_tls else None
    with Client(tls_server.target, tls=tls) as client, pytest.raises(grpc.RpcError) as excinfo:
        client.generate("def add(a, b):", max_new_tokens=4, timeout=10)
    assert excinfo.value.code() == grpc.StatusCode.UNAVAILABLE


def test_grpcurl_over_mtls(tls_server: RunningServer, certs: CertFiles) -> None:
    health = grpcurl_tls(tls_server, certs, "grpc.health.v1.Health/Check")
    assert health.returncode == 0, health.stderr
    assert json.loads(health.stdout) == {"status": "SERVING"}
    data = {"prompt": "def add(a, b):", "max_new_tokens": 4}
    generated = grpcurl_tls(tls_server, certs, "goodspeed.v1.Generation/Generate", data=data)
    assert generated.returncode == 0, generated.stderr
    assert json.loads(generated.stdout)["usage"]["completion_tokens"] == 4


def test_admin_token_comes_from_the_file(tls_server: RunningServer, certs: CertFiles) -> None:
    with Client(tls_server.target, admin_token=ADMIN_TOKEN, tls=certs.client_tls()) as client:
        assert client.get_policy().mode in (pb.AUTO, pb.OFF, pb.FIXED)
    with (
        Client(tls_server.target, admin_token="wrong", tls=certs.client_tls()) as client,
        pytest.raises(grpc.RpcError) as excinfo,
    ):
        client.get_policy()
    assert excinfo.value.code() == grpc.StatusCode.UNAUTHENTICATED


def test_metrics_answer_on_127_0_0_1(tls_server: RunningServer) -> None:
    with urllib.request.urlopen(f"http://127.0.0.1:{tls_server.metrics_port}/metrics", timeout=10) as reply:
        assert b"goodspeed_engine_steps" in reply.read()


def test_cli_health_over_mtls(tls_server: RunningServer, certs: CertFiles) -> None:
    flags = ["--cacert", str(certs.ca_cert), "--cert", str(certs.client_cert), "--key", str(certs.client_key)]
    assert cli_main(["health", "--target", tls_server.target, *flags]) == 0
    assert cli_main(["generate", "def add(a, b):", "--max-new-tokens", "2", "--target", tls_server.target, *flags]) == 0


def test_the_log_file_has_no_colour_codes_or_progress_bars(tls_server: RunningServer) -> None:
    log = tls_server.log()
    assert "serving" in log
    assert "\x1b[" not in log
    assert "\r" not in log
    assert "Loading weights" not in log
