"""Console logs carry colour codes only when they go to a terminal."""

from __future__ import annotations

import io
from collections.abc import Iterator

import pytest
import structlog

from server.app import configure_logging

ANSI_ESCAPE = "\x1b["


class Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


@pytest.fixture(autouse=True)
def reset_structlog() -> Iterator[None]:
    yield
    structlog.reset_defaults()


def test_console_logs_to_a_file_have_no_colour_codes(capfd: pytest.CaptureFixture[str]) -> None:
    configure_logging("console", "info")  # stdout here is pytest's capture file, not a terminal
    structlog.get_logger("test").info("listening", address="127.0.0.1:50051")
    out = capfd.readouterr().out
    assert "listening" in out and "address=127.0.0.1:50051" in out
    assert ANSI_ESCAPE not in out


def test_console_logs_to_a_terminal_keep_their_colours() -> None:
    terminal = Terminal()
    configure_logging("console", "info", terminal)
    structlog.get_logger("test").info("listening", address="127.0.0.1:50051")
    assert ANSI_ESCAPE in terminal.getvalue()


def test_json_logs_go_to_the_given_stream() -> None:
    stream = io.StringIO()
    configure_logging("json", "info", stream)
    structlog.get_logger("test").info("serving")
    assert '"event": "serving"' in stream.getvalue()
