"""Configuration of the server process (the control plane)."""

from __future__ import annotations

from dataclasses import dataclass, field

from api.metadata import CLIENT_ID_HEADER
from api.speculation import SpeculationMode
from engine.config import EngineConfig

LOG_LEVELS = ("debug", "info", "warning", "error")


def check_admin_token(token: str) -> None:
    # It travels in an HTTP/2 header, and secrets.compare_digest raises TypeError on non-ASCII str.
    if not (token.isascii() and token.isprintable()):
        raise ValueError("the admin token must be printable ASCII")


@dataclass(frozen=True, slots=True)
class ServerConfig:
    engine: EngineConfig = field(default_factory=EngineConfig)
    host: str = "0.0.0.0"
    port: int = 50051
    metrics_port: int = 9090  # 0 turns the Prometheus endpoint off
    metrics_host: str = ""  # the Prometheus endpoint's bind address; "" binds where host does
    # Scheduling
    max_running_requests: int = 32  # the largest batch
    max_waiting_requests: int = 256  # beyond it new requests get RESOURCE_EXHAUSTED
    max_step_tokens: int = 512  # query tokens per engine step; prefill chunks fill what decodes leave
    # while requests decode, a step that also prefills is cut to take at most this many times
    # their decode-only step (by the step-cost model); 0: chunks fill the token budget
    max_prefill_slowdown: float = 2.0
    # Requests
    default_max_new_tokens: int = 128
    max_new_tokens_limit: int = 4096
    max_stop_sequences: int = 8
    max_stop_length: int = 256
    max_prompt_bytes: int = 0  # 0: what the model's context could hold (its longest token x its context length)
    max_message_bytes: int = 4 << 20  # gRPC's receive limit: a larger request is refused before it is read
    max_requests_per_client: int = 64  # requests in flight per client; 0: no limit
    client_id_header: str = CLIENT_ID_HEADER  # the metadata key that names a client; "": the peer's address only
    tokenizer_threads: int = 1  # threads, at the lowest CPU priority, that tokenize prompts over 32K characters
    # Speculation
    speculation_mode: SpeculationMode = SpeculationMode.AUTO  # the server-wide default: AUTO, OFF or FIXED
    num_draft_tokens: int = 4  # k for fixed (and for auto until the goodput policy decides)
    # Operations
    admin_token: str = ""  # when set, Admin calls need `authorization: Bearer <token>`
    admin_token_file: str = ""  # or the token is this file's first line (read at start-up; kept out of `ps`)
    drain_grace_s: float = 30.0  # SIGTERM: how long running requests may take to finish
    max_engine_restarts: int = 3  # within the restart window; beyond it the server stays up, NOT_SERVING
    log_format: str = "console"  # console or json
    log_level: str = "info"  # debug adds a line per AUTO step (the choice) and per step (predicted vs measured time)
    # TLS on the gRPC port (paths of PEM files, read at start-up); no tls_cert means plaintext
    tls_cert: str = ""
    tls_key: str = ""
    tls_client_ca: str = ""  # when set, clients must present a certificate it signed (mTLS)

    def __post_init__(self) -> None:
        def require(ok: bool, message: str) -> None:
            if not ok:
                raise ValueError(message)

        require(0 <= self.port < 65536, f"port must be in [0, 65535], got {self.port}")
        require(0 <= self.metrics_port < 65536, f"metrics_port must be in [0, 65535], got {self.metrics_port}")
        require(self.max_running_requests >= 1, "max_running_requests must be >= 1")
        require(self.max_waiting_requests >= 0, "max_waiting_requests must be >= 0")
        require(
            self.max_step_tokens > self.max_running_requests,
            "max_step_tokens must exceed max_running_requests, so every running request gets a token",
        )
        require(
            self.max_prefill_slowdown == 0 or self.max_prefill_slowdown >= 1,
            f"max_prefill_slowdown must be 0 (off) or at least 1, got {self.max_prefill_slowdown}",
        )
        require(
            1 <= self.default_max_new_tokens <= self.max_new_tokens_limit,
            "default_max_new_tokens must be in [1, max_new_tokens_limit]",
        )
        require(
            self.speculation_mode in (SpeculationMode.AUTO, SpeculationMode.OFF, SpeculationMode.FIXED),
            f"speculation_mode must be AUTO, OFF or FIXED, got {self.speculation_mode!r}",
        )
        require(
            0 <= self.num_draft_tokens <= self.engine.max_draft_tokens,
            f"num_draft_tokens must be in [0, {self.engine.max_draft_tokens}] (the engine's max_draft_tokens)",
        )
        require(self.max_prompt_bytes >= 0, "max_prompt_bytes must be >= 0 (0: derived from the model's context)")
        require(self.max_message_bytes >= 1024, "max_message_bytes must be >= 1024")
        require(
            self.max_prompt_bytes <= self.max_message_bytes,
            "max_prompt_bytes must not exceed max_message_bytes: gRPC would refuse such prompts first",
        )
        require(self.max_requests_per_client >= 0, "max_requests_per_client must be >= 0 (0: no limit)")
        require(self.tokenizer_threads >= 1, "tokenizer_threads must be >= 1")
        require(self.max_engine_restarts >= 0, "max_engine_restarts must be >= 0")
        require(self.drain_grace_s >= 0, "drain_grace_s must be >= 0")
        require(self.log_format in ("console", "json"), "log_format must be console or json")
        require(self.log_level in LOG_LEVELS, f"log_level must be one of {LOG_LEVELS}")
        require(bool(self.tls_cert) == bool(self.tls_key), "tls_cert and tls_key go together: give both or neither")
        require(not self.tls_client_ca or bool(self.tls_cert), "tls_client_ca (mTLS) needs tls_cert and tls_key")
        require(
            not (self.admin_token and self.admin_token_file),
            "the admin token comes from one source: admin_token or admin_token_file, not both",
        )
        check_admin_token(self.admin_token)

    @property
    def metrics_bind_host(self) -> str:
        return self.metrics_host or self.host
