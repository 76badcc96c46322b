"""Serve flags and settings: policy, TLS, admin token, metrics host; validation, parsing, start-up file errors."""

from __future__ import annotations

import argparse
import asyncio
from pathlib import Path

import grpc
import pytest

from api.speculation import SpeculationMode
from server.__main__ import add_serve_arguments, config_from_args, main
from server.app import add_port
from server.config import ServerConfig
from server.credentials import CredentialFileError, read_admin_token, server_credentials
from tests.certs import write_certs


def parse(*argv: str) -> ServerConfig:
    parser = argparse.ArgumentParser()
    add_serve_arguments(parser)
    return config_from_args(parser.parse_args(list(argv)))


@pytest.fixture(autouse=True)
def no_token_in_env(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("GOODSPEED_ADMIN_TOKEN", raising=False)
    monkeypatch.setenv("OPENBLAS_NUM_THREADS", "1")  # `run` sets it; keep it from leaking out of the test


def test_tls_cert_without_key_is_refused() -> None:
    with pytest.raises(ValueError, match="tls_cert and tls_key"):
        ServerConfig(tls_cert="server.pem")
    with pytest.raises(ValueError, match="tls_cert and tls_key"):
        ServerConfig(tls_key="server.key")


def test_client_ca_needs_a_server_certificate() -> None:
    with pytest.raises(ValueError, match="tls_client_ca"):
        ServerConfig(tls_client_ca="ca.pem")


def test_tls_flags_fill_the_config() -> None:
    config = parse("--tls-cert", "s.pem", "--tls-key", "s.key", "--tls-client-ca", "ca.pem")
    assert (config.tls_cert, config.tls_key, config.tls_client_ca) == ("s.pem", "s.key", "ca.pem")
    assert ServerConfig().tls_cert == ""  # plaintext unless asked for


def test_admin_token_from_two_sources_is_refused(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    token_file = tmp_path / "token"
    token_file.write_text("secret\n")
    with pytest.raises(ValueError, match="admin token"):
        ServerConfig(admin_token="a", admin_token_file=str(token_file))
    with pytest.raises(ValueError, match=r"--admin-token, --admin-token-file"):
        parse("--admin-token", "a", "--admin-token-file", str(token_file))
    monkeypatch.setenv("GOODSPEED_ADMIN_TOKEN", "from-env")
    with pytest.raises(ValueError, match=r"--admin-token-file, \$GOODSPEED_ADMIN_TOKEN"):
        parse("--admin-token-file", str(token_file))
    with pytest.raises(ValueError, match=r"--admin-token, \$GOODSPEED_ADMIN_TOKEN"):
        parse("--admin-token", "a")
    assert parse().admin_token == "from-env"


def test_admin_token_file_gives_its_first_line_stripped(tmp_path: Path) -> None:
    token_file = tmp_path / "token"
    token_file.write_text("  s3cret \nnot this line\n")
    config = parse("--admin-token-file", str(token_file))
    assert config.admin_token == ""  # read at start-up, not at parse time
    assert read_admin_token(config) == "s3cret"
    assert read_admin_token(ServerConfig(admin_token="flag-token")) == "flag-token"


def test_an_empty_token_file_is_an_error_not_an_open_admin_service(tmp_path: Path) -> None:
    token_file = tmp_path / "token"
    token_file.write_text("\n")
    with pytest.raises(CredentialFileError, match="--admin-token-file"):
        read_admin_token(ServerConfig(admin_token_file=str(token_file)))


def test_a_non_ascii_admin_token_is_refused_at_start_up(tmp_path: Path) -> None:
    # It could never match: a header is ASCII, and compare_digest raises TypeError on non-ASCII str.
    with pytest.raises(ValueError, match="printable ASCII"):
        ServerConfig(admin_token="pässword")
    token_file = tmp_path / "token"
    token_file.write_text("pässword\n")
    with pytest.raises(CredentialFileError, match=f"--admin-token-file {token_file}: .*printable ASCII"):
        read_admin_token(ServerConfig(admin_token_file=str(token_file)))


def test_metrics_host_defaults_to_the_grpc_host() -> None:
    assert parse("--host", "10.1.2.3").metrics_bind_host == "10.1.2.3"
    assert parse("--host", "0.0.0.0", "--metrics-host", "127.0.0.1").metrics_bind_host == "127.0.0.1"


def test_unreadable_tls_files_name_the_flag_and_the_file(tmp_path: Path) -> None:
    missing = tmp_path / "missing.pem"
    not_pem = tmp_path / "server.key"
    not_pem.write_text("hello")
    with pytest.raises(CredentialFileError, match=f"--tls-cert {missing}"):
        server_credentials(ServerConfig(tls_cert=str(missing), tls_key=str(not_pem)))
    (tmp_path / "server.pem").write_text("-----BEGIN CERTIFICATE-----\n")
    with pytest.raises(CredentialFileError, match=f"--tls-key {not_pem}: not a PEM file"):
        server_credentials(ServerConfig(tls_cert=str(tmp_path / "server.pem"), tls_key=str(not_pem)))
    with pytest.raises(CredentialFileError, match=f"--tls-cert {tmp_path}"):
        server_credentials(ServerConfig(tls_cert=str(tmp_path), tls_key=str(not_pem)))  # a directory


def test_a_key_that_is_not_the_certificates_is_a_clear_error(tmp_path: Path) -> None:
    certs = write_certs(tmp_path)
    credentials = server_credentials(ServerConfig(tls_cert=str(certs.server_cert), tls_key=str(certs.client_key)))

    async def listen() -> None:
        add_port(grpc.aio.server(), "127.0.0.1:0", credentials)

    with pytest.raises(OSError, match="--tls-key is not the key of --tls-cert"):
        asyncio.run(listen())


def test_serve_exits_2_on_a_missing_tls_file(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    missing = tmp_path / "missing.pem"
    code = main(["--tls-cert", str(missing), "--tls-key", str(missing), "--metrics-port", "0", "--port", "0"])
    assert code == 2
    error = capsys.readouterr().err
    assert f"--tls-cert {missing}" in error and "No such file" in error


def test_serve_exits_2_when_only_a_key_is_given(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["--tls-key", str(tmp_path / "server.key")]) == 2
    assert "tls_cert and tls_key" in capsys.readouterr().err


def test_policy_flag_takes_the_mode_labels_and_the_contracts_goodput() -> None:
    assert parse().speculation_mode == SpeculationMode.AUTO
    assert parse("--policy", "goodput").speculation_mode == SpeculationMode.AUTO
    assert parse("--policy", "fixed", "--num-draft-tokens", "3").speculation_mode == SpeculationMode.FIXED
    assert parse("--policy", "off").speculation_mode == SpeculationMode.OFF
    with pytest.raises(SystemExit):
        parse("--policy", "fixed4")


def test_a_draft_model_joins_the_drafters_by_default() -> None:
    assert parse().engine.drafters == ("ngram", "self") and parse().engine.draft_model == ""
    config = parse("--draft-model", "qwen2.5-coder-0.5b")
    assert config.engine.drafters == ("ngram", "model", "self") and config.engine.draft_model == "qwen2.5-coder-0.5b"
    assert parse("--drafters", "model", "--draft-model", "x").engine.drafters == ("model",)
    assert parse("--drafters", "none").engine.drafters == ()
    with pytest.raises(ValueError, match="the model drafter needs a draft model"):
        parse("--drafters", "ngram,model")
    with pytest.raises(ValueError, match="a draft model needs the model drafter"):
        parse("--drafters", "ngram", "--draft-model", "qwen2.5-coder-0.5b")
    with pytest.raises(ValueError, match="drafters must be among ngram, model, self, mlp, got 'medusa'"):
        parse("--drafters", "ngram,medusa")
    with pytest.raises(ValueError, match="must not repeat"):
        parse("--drafters", "ngram,ngram")
