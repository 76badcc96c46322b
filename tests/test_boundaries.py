"""The process boundary: server/ never loads torch; engine/ never loads grpc or anyio."""

from __future__ import annotations

import subprocess
import sys


def loaded_modules(*imports: str) -> set[str]:
    code = "import sys\n" + "".join(f"import {name}\n" for name in imports) + "print('\\n'.join(sys.modules))"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    return {line.split(".")[0] for line in result.stdout.split()}


def test_server_does_not_import_torch_or_transformers() -> None:
    modules = loaded_modules("server.app", "server.service", "server.loop", "server.__main__", "client.client")
    assert "torch" not in modules and "transformers" not in modules


def test_engine_does_not_import_grpc_or_anyio() -> None:
    modules = loaded_modules("engine.worker", "engine.runner", "engine.ipc", "engine.offline")
    assert "grpc" not in modules and "anyio" not in modules


def test_the_shared_modules_are_light() -> None:
    modules = loaded_modules("engine.protocol", "engine.link", "engine.ipc")
    assert not {"torch", "transformers", "grpc", "anyio"} & modules
