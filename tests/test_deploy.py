"""docker-compose.yml agrees with the code (no Docker engine runs here, so it is parsed, not run)."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import yaml

from client.balancing import GENERATION_SERVICE
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


def kubernetes_objects() -> dict[str, dict[str, Any]]:
    docs = yaml.safe_load_all((ROOT / "deploy" / "kubernetes" / "goodspeed.yaml").read_text())
    return {f"{d['kind']}/{d['metadata']['name']}": d for d in docs}


def test_kubernetes_probes_ports_and_grace_agree_with_the_server() -> None:
    objects = kubernetes_objects()
    pod = objects["Deployment/goodspeed"]["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    args = container["args"]
    build_parser().parse_args(args[1:])  # every flag exists
    port = int(flag(args, "--port"))
    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    assert ports == {"grpc": port, "metrics": int(flag(args, "--metrics-port"))}
    for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
        assert container[probe]["grpc"]["port"] == port  # native gRPC probes: grpc.health.v1
    # readiness asks for the service the server reports NOT_SERVING while draining or restarting
    assert container["readinessProbe"]["grpc"]["service"] == GENERATION_SERVICE
    liveness = container["livenessProbe"]
    # an engine restart is no reason to kill, nor a drain (its listener is closed, so probes fail)
    liveness_window_s = liveness["periodSeconds"] * liveness["failureThreshold"]
    assert liveness_window_s >= 60 and liveness_window_s > float(flag(args, "--drain-grace"))
    assert pod["terminationGracePeriodSeconds"] > float(flag(args, "--drain-grace"))
    assert container["env"] == [{"name": "GOODSPEED_CACHE", "value": "/cache"}]
    assert container["volumeMounts"][0]["mountPath"] == "/cache"
    memory_gib = float(container["resources"]["requests"]["memory"].removesuffix("Gi"))
    assert memory_gib >= 3.7  # the default server with its KV cache full (measured 2.5 GiB resident, 3.7 full)
    headless = objects["Service/goodspeed-headless"]["spec"]
    assert headless["clusterIP"] == "None" and headless["ports"][0]["targetPort"] == "grpc"
    selector = objects["Deployment/goodspeed"]["spec"]["selector"]["matchLabels"]
    assert (
        headless["selector"] == selector == objects["PodDisruptionBudget/goodspeed"]["spec"]["selector"]["matchLabels"]
    )
    assert objects["PodDisruptionBudget/goodspeed"]["spec"]["maxUnavailable"] == 1


def test_compose_replicas_sit_behind_nginx_that_reaches_each_one() -> None:
    services = yaml.safe_load((ROOT / "docker-compose.yml").read_text())["services"]
    replicas = {name: s for name, s in services.items() if name.startswith("goodspeed-")}
    assert len(replicas) >= 2 and all(s["profiles"] == ["replicas"] for s in replicas.values())
    nginx = (ROOT / "deploy" / "nginx-grpc.conf").read_text()
    for name, service in replicas.items():
        command = service["command"]
        build_parser().parse_args(command[1:])
        port = flag(command, "--port")
        assert f"server {name}:{port} " in nginx
        assert float(service["stop_grace_period"].rstrip("s")) > float(flag(command, "--drain-grace"))
    proxy = services["proxy"]
    assert proxy["profiles"] == ["replicas"] and set(proxy["depends_on"]) == set(replicas)
    listen = re.search(r"listen (\d+) http2;", nginx)
    assert listen is not None and any(p.endswith(f":{listen.group(1)}") for p in proxy["ports"])
    assert any("nginx-grpc.conf:/etc/nginx/nginx.conf" in v for v in proxy["volumes"])
