"""TLS and mTLS handshakes between our clients and the server's credentials, in process (a health
service only, no model)."""

from __future__ import annotations

from collections.abc import Iterator
from concurrent import futures
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from client.cli import main as cli_main
from client.client import AsyncClient, Client
from client.tls import TlsFiles
from server.config import ServerConfig
from server.credentials import server_credentials
from tests.certs import CertFiles, write_certs


@pytest.fixture(scope="module")
def certs(tmp_path_factory: pytest.TempPathFactory) -> CertFiles:
    return write_certs(tmp_path_factory.mktemp("certs"))


def serve_health(credentials: grpc.ServerCredentials) -> tuple[grpc.Server, str]:
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
    health_pb2_grpc.add_HealthServicer_to_server(health.HealthServicer(), server)
    port = server.add_secure_port("127.0.0.1:0", credentials)
    server.start()
    return server, f"127.0.0.1:{port}"


@pytest.fixture(scope="module")
def mtls_target(certs: CertFiles) -> Iterator[str]:
    config = ServerConfig(
        tls_cert=str(certs.server_cert), tls_key=str(certs.server_key), tls_client_ca=str(certs.ca_cert)
    )
    credentials = server_credentials(config)
    assert credentials is not None
    server, target = serve_health(credentials)
    yield target
    server.stop(None)


def check(target: str, tls: TlsFiles | None) -> int:
    with Client(target, tls=tls) as client:
        return int(client.health.Check(health_pb2.HealthCheckRequest(), timeout=5).status)


def test_mtls_with_a_client_certificate(mtls_target: str, certs: CertFiles) -> None:
    assert check(mtls_target, certs.client_tls()) == health_pb2.HealthCheckResponse.SERVING
    port = mtls_target.rsplit(":", 1)[1]
    assert check(f"localhost:{port}", certs.client_tls()) == health_pb2.HealthCheckResponse.SERVING  # DNS SAN


async def test_async_client_over_mtls(mtls_target: str, certs: CertFiles) -> None:
    async with AsyncClient(mtls_target, tls=certs.client_tls()) as client:
        reply = await client.health.Check(health_pb2.HealthCheckRequest(), timeout=5)
    assert reply.status == health_pb2.HealthCheckResponse.SERVING


@pytest.mark.parametrize("with_tls", [False, True], ids=["plaintext", "no-client-cert"])
def test_mtls_refuses_clients_without_a_certificate(mtls_target: str, certs: CertFiles, with_tls: bool) -> None:
    tls = certs.client_tls(with_client_cert=False) if with_tls else None
    with pytest.raises(grpc.RpcError) as excinfo:
        check(mtls_target, tls)
    assert excinfo.value.code() == grpc.StatusCode.UNAVAILABLE


def test_cli_health_over_mtls(mtls_target: str, certs: CertFiles, capsys: pytest.CaptureFixture[str]) -> None:
    flags = ["--cacert", str(certs.ca_cert), "--cert", str(certs.client_cert), "--key", str(certs.client_key)]
    assert cli_main(["health", "--target", mtls_target, *flags]) == 0
    assert "SERVING" in capsys.readouterr().out
    assert cli_main(["health", "--target", mtls_target, "--cacert", str(certs.ca_cert)]) == 1


def test_tls_files_need_cert_and_key_together(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(ValueError, match="cert and key"):
        TlsFiles(cert=tmp_path / "client.pem")
    assert cli_main(["health", "--cert", str(tmp_path / "client.pem")]) == 2
    assert "--cert and --key" in capsys.readouterr().err
    assert cli_main(["health", "--cacert", str(tmp_path / "missing.pem")]) == 2
    assert "missing.pem" in capsys.readouterr().err
