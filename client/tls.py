"""TLS for client channels, from the PEM files grpcurl takes as -cacert, -cert and -key."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc


@dataclass(frozen=True, slots=True)
class TlsFiles:
    ca_cert: Path | str | None = None  # the CA that signed the server's certificate; None: the system's roots
    cert: Path | str | None = None  # this client's certificate chain, for a server that asks for one (mTLS)
    key: Path | str | None = None  # the private key of cert

    def __post_init__(self) -> None:
        if (self.cert is None) != (self.key is None):
            raise ValueError("a client certificate needs its key: give cert and key together, or neither")

    def credentials(self) -> grpc.ChannelCredentials:
        """Reads the files; a missing one raises OSError naming it."""

        def read(path: Path | str | None) -> bytes | None:
            return None if path is None else Path(path).read_bytes()

        return grpc.ssl_channel_credentials(
            root_certificates=read(self.ca_cert), private_key=read(self.key), certificate_chain=read(self.cert)
        )


def open_channel(target: str, tls: TlsFiles | None = None, options: Sequence[tuple[str, Any]] = ()) -> grpc.Channel:
    """A blocking channel: TLS with tls, plaintext without."""
    if tls is None:
        return grpc.insecure_channel(target, options=options)
    return grpc.secure_channel(target, tls.credentials(), options=options)


def open_aio_channel(
    target: str, tls: TlsFiles | None = None, options: Sequence[tuple[str, Any]] = ()
) -> grpc.aio.Channel:
    """An asyncio channel: TLS with tls, plaintext without."""
    if tls is None:
        return grpc.aio.insecure_channel(target, options=options)
    return grpc.aio.secure_channel(target, tls.credentials(), options=options)
