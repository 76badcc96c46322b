"""docker-compose.yml agrees with the code (no Docker engine runs here, so it is parsed, not run)."""

from __future__ import annotations

from pathlib import Path

import yaml

from client.cli import build_parser
from server.__main__ import main as serve_main  # noqa: F401 - the serve entry point exists
from server.config import ServerConfig

ROOT = Path(__file__).resolve().parents[1]


def flag(command: list[str], name: str) -> str:
    return command[command.index(name) + 1]


def test_compose_service_ports_health_and_volume() -> None:
    compose = yaml.safe_load((ROOT / "docker-compose.yml").read_text())
    service = compose["services"]["goodspeed"]
    command = service["command"]
    assert command[:2] == ["goodspeed", "serve"]
    build_parser().parse_args(command[1:])  # every flag exists
    port, metrics_port = flag(command, "--port"), flag(command, "--metrics-port")
    defaults = ServerConfig()
    assert (int(port), int(metrics_port)) == (defaults.port, defaults.metrics_port)
    assert f"{port}:{port}" in service["ports"] and f"{metrics_port}:{metrics_port}" in service["ports"]
    health = service["healthcheck"]["test"]
    assert health[1:3] == ["goodspeed", "health"] and flag(health, "--target") == f"localhost:{port}"
    build_parser().parse_args(health[2:])
    cache = service["environment"]["GOODSPEED_CACHE"]
    assert any(v.endswith(f":{cache}") for v in service["volumes"])
    grace = float(flag(command, "--drain-grace"))
    assert float(service["stop_grace_period"].rstrip("s")) > grace


def test_prometheus_scrapes_the_metrics_port() -> None:
    compose = yaml.safe_load((ROOT / "docker-compose.yml").read_text())
    metrics_port = flag(compose["services"]["goodspeed"]["command"], "--metrics-port")
    mount = next(v for v in compose["services"]["prometheus"]["volumes"] if "prometheus.yml" in v)
    config = yaml.safe_load((ROOT / mount.split(":")[0]).read_text())
    targets = [t for job in config["scrape_configs"] for s in job["static_configs"] for t in s["targets"]]
    assert f"goodspeed:{metrics_port}" in targets


def test_dockerfile_runs_the_same_server() -> None:
    dockerfile = (ROOT / "Dockerfile").read_text()
    defaults = ServerConfig()
    assert f"EXPOSE {defaults.port} {defaults.metrics_port}" in dockerfile
    assert '"goodspeed", "serve"' in dockerfile and '"goodspeed", "health"' in dockerfile
