"""The files behind the server's secrets, read once at start-up: the TLS certificate, key and
client CA of the gRPC port, and the admin token file. A bad file stops the start with an error
that names the flag and the file, before any port opens."""

from __future__ import annotations

from pathlib import Path

import grpc

from server.config import ServerConfig, check_admin_token


class CredentialFileError(Exception):
    """A file named by a flag is missing, unreadable or not what the flag needs."""


def read_flag_file(flag: str, path: str) -> bytes:
    try:
        return Path(path).read_bytes()
    except OSError as exc:
        raise CredentialFileError(f"{flag} {path}: {exc.strerror or exc}") from None


def read_pem(flag: str, path: str) -> bytes:
    data = read_flag_file(flag, path)
    # gRPC would take any bytes here and only fail the first handshake, far from the cause.
    if b"-----BEGIN " not in data:
        raise CredentialFileError(f"{flag} {path}: not a PEM file")
    return data


def server_credentials(config: ServerConfig) -> grpc.ServerCredentials | None:
    """TLS for the gRPC port, requiring client certificates (mTLS) with tls_client_ca; None: plaintext."""
    if not config.tls_cert:
        return None
    certificate_chain = read_pem("--tls-cert", config.tls_cert)
    private_key = read_pem("--tls-key", config.tls_key)
    client_ca = read_pem("--tls-client-ca", config.tls_client_ca) if config.tls_client_ca else None
    return grpc.ssl_server_credentials(
        [(private_key, certificate_chain)], root_certificates=client_ca, require_client_auth=client_ca is not None
    )


def read_admin_token(config: ServerConfig) -> str:
    """The admin token: the first line of admin_token_file, stripped, or else admin_token."""
    if not config.admin_token_file:
        return config.admin_token
    flag, path = "--admin-token-file", config.admin_token_file
    try:
        lines = read_flag_file(flag, path).decode().splitlines()
    except UnicodeDecodeError:
        raise CredentialFileError(f"{flag} {path}: not UTF-8 text") from None
    token = lines[0].strip() if lines else ""
    # An empty token turns authorization off; from a file that is a mistake, not a choice.
    if not token:
        raise CredentialFileError(f"{flag} {path}: the first line is empty")
    try:
        check_admin_token(token)
    except ValueError as exc:
        raise CredentialFileError(f"{flag} {path}: {exc}") from None
    return token
