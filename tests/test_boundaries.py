"""The boundaries that keep the packages apart.

The process boundary: server/ never loads torch; engine/ never loads grpc or anyio. The package
edges: no import cycles; server and client meet only in api/; RPC handlers reach the policy
and the scheduler only through the control loop.
"""

from __future__ import annotations

import ast
import subprocess
import sys
from collections.abc import Collection
from pathlib import Path


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


# The package edges, read from the source: every import, at module level or inside a function.

PACKAGES = ("api", "engine", "server", "client", "bench")
ROOT = Path(__file__).resolve().parents[1]


def module_files() -> dict[str, Path]:
    files = {}
    for package in PACKAGES:
        for path in (ROOT / package).rglob("*.py"):
            parts = path.relative_to(ROOT).with_suffix("").parts
            files[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return files


def imported_modules(name: str, path: Path, known: Collection[str]) -> set[str]:
    """The project modules that name's source imports (`from a import b` counts as a.b when b is a module)."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parent = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join([*parent, base] if base else parent)
            for alias in node.names:
                found.add(f"{base}.{alias.name}" if f"{base}.{alias.name}" in known else base)
    return {module for module in found if module in known and module != name}


def import_graph() -> dict[str, set[str]]:
    files = module_files()
    return {name: imported_modules(name, path, files) for name, path in files.items()}


def cycles(graph: dict[str, set[str]]) -> list[set[str]]:
    """The strongly connected components of more than one module (Tarjan's algorithm, iterative)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    found = []
    for start in graph:
        if start in index:
            continue
        work = [(start, iter(sorted(graph[start])))]
        index[start] = low[start] = len(index)
        stack.append(start)
        while work:
            node, successors = work[-1]
            successor = next(successors, None)
            if successor is not None:
                if successor not in index:
                    index[successor] = low[successor] = len(index)
                    stack.append(successor)
                    work.append((successor, iter(sorted(graph[successor]))))
                elif successor in stack:
                    low[node] = min(low[node], index[successor])
                continue
            work.pop()
            if work:
                low[work[-1][0]] = min(low[work[-1][0]], low[node])
            if low[node] == index[node]:
                component = set()
                while True:
                    member = stack.pop()
                    component.add(member)
                    if member == node:
                        break
                if len(component) > 1:
                    found.append(component)
    return found


def test_the_cycle_finder_finds_cycles() -> None:
    graph = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}, "e": {"e"}}
    assert cycles(graph) == [{"a", "b", "c"}]


def test_no_module_imports_one_that_imports_it_back() -> None:
    assert cycles(import_graph()) == []


def test_each_package_imports_only_what_it_may() -> None:
    """api is the contract both sides share; the engine knows no gRPC side; server and client meet
    only in api (the CLI, which starts the server and trains speculators, is the one client code
    that may import the server and the engine: client/cli.py and its speculator subcommand)."""
    may_import = {
        "api": {"api"},
        "engine": {"engine"},
        "server": {"api", "engine", "server"},
        "client": {"api", "client", "server"},
        "bench": {"api", "bench", "client", "engine", "server"},
    }
    crossings = {
        (name, imported)
        for name, imports in import_graph().items()
        for imported in imports
        if imported.split(".")[0] not in may_import[name.split(".")[0]]
    }
    crossings -= {(name, imported) for name, imported in crossings if name in ("client.cli", "client.speculator_cli")}
    assert crossings == set()
    client_to_server = {
        (name, imported)
        for name, imports in import_graph().items()
        for imported in imports
        if name.startswith("client.") and name != "client.cli" and imported.startswith("server.")
    }
    assert client_to_server == set()


HANDLER_MODULES = ("server/service.py", "server/admin_service.py")
# What handlers may use of the control loop: its messages and what it publishes. Nothing there
# hands out the scheduler or the policy.
LOOP_SURFACE = {
    "submit",
    "abort",
    "set_policy",
    "policy_snapshot",
    "num_running",
    "num_waiting",
    "num_kv_tokens_used",
    "engine_state",
    "engine_error",
}


def test_rpc_handlers_reach_the_policy_and_the_scheduler_only_through_the_loop() -> None:
    for module in HANDLER_MODULES:
        tree = ast.parse((ROOT / module).read_text())
        on_loop = {
            node.attr
            for node in ast.walk(tree)
            if isinstance(node, ast.Attribute)
            and (
                (isinstance(node.value, ast.Name) and node.value.id == "loop")
                or (isinstance(node.value, ast.Attribute) and node.value.attr == "loop")
            )
        }
        assert on_loop and on_loop <= LOOP_SURFACE, f"{module} uses {on_loop - LOOP_SURFACE} of the loop"
        names = {node.id for node in ast.walk(tree) if isinstance(node, ast.Name)}
        attributes = {node.attr for node in ast.walk(tree) if isinstance(node, ast.Attribute)}
        assert not (names | attributes) & {"scheduler", "SpeculationPolicy", "Scheduler"}, module
