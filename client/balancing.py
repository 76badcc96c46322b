"""Several replicas behind one client channel: gRPC's own client-side load balancing.

A target that names several servers (`dns:///name:port`, as a headless service resolves, or a
comma-separated list of host:port) gets gRPC's `round_robin` with client-side health checking:
each replica's `grpc.health.v1.Health/Watch` stream tells the channel when it stops serving
(draining, loading, its engine restarting), and it gets no new calls until it serves again. Any
target gets the retry policy: a call the server refused before sending anything (UNAVAILABLE, or
RESOURCE_EXHAUSTED from a full queue or a client's request limit) is tried again, on another
replica when there is one. gRPC never retries a call once response headers have arrived, so a
stream that has sent tokens is never replayed.

The service config is plain JSON (`service_config`); clients in other languages can copy it
(docs/scale-out.md).
"""

from __future__ import annotations

import ipaddress
import json
import socket
from typing import Any

GENERATION_SERVICE = "goodspeed.v1.Generation"
ADMIN_SERVICE = "goodspeed.v1.Admin"
MAX_ATTEMPTS = 4  # the first try and three retries: with 3 replicas, one each and one more
RETRY_POLICY = {
    "maxAttempts": MAX_ATTEMPTS,
    "initialBackoff": "0.1s",
    "maxBackoff": "2s",
    "backoffMultiplier": 3,
    "retryableStatusCodes": ["UNAVAILABLE", "RESOURCE_EXHAUSTED"],
}


def is_several(target: str) -> bool:
    """Whether the target may name several servers: a list, or a name the DNS resolver expands."""
    return "," in target or target.startswith(("dns:", "ipv4:", "ipv6:"))


def channel_target(target: str) -> str:
    """gRPC's form of a target: a comma-separated list of host:port becomes `ipv4:a:p,b:p` (or
    `ipv6:`), names resolved once, here; anything else is passed through."""
    if "," not in target or target.startswith(("dns:", "ipv4:", "ipv6:", "unix:")):
        return target
    addresses = [resolve(part.strip()) for part in target.split(",") if part.strip()]
    if all(isinstance(ip, ipaddress.IPv4Address) for ip, _ in addresses):
        return "ipv4:" + ",".join(f"{ip}:{port}" for ip, port in addresses)
    if all(isinstance(ip, ipaddress.IPv6Address) for ip, _ in addresses):
        return "ipv6:" + ",".join(f"[{ip}]:{port}" for ip, port in addresses)
    raise ValueError(f"target {target!r} mixes IPv4 and IPv6 addresses; list one family, or use dns:///name:port")


def resolve(address: str) -> tuple[ipaddress.IPv4Address | ipaddress.IPv6Address, int]:
    """host:port or [v6]:port -> (its address, port); a name resolves to its first address,
    IPv4 first."""
    host, sep, port_text = address.rpartition(":")
    if not sep or not host or not port_text.isdigit() or not 0 < int(port_text) < 65536:
        raise ValueError(f"target entry {address!r} is not host:port")
    host = host.removeprefix("[").removesuffix("]")
    try:
        return ipaddress.ip_address(host), int(port_text)
    except ValueError:
        pass
    try:
        infos = socket.getaddrinfo(host, int(port_text), type=socket.SOCK_STREAM)
    except socket.gaierror as exc:
        raise ValueError(f"target entry {address!r}: cannot resolve {host!r} ({exc.strerror})") from exc
    found = sorted({ipaddress.ip_address(info[4][0]) for info in infos}, key=lambda ip: ip.version)
    return found[0], int(port_text)


def service_config(is_balanced: bool) -> dict[str, Any]:
    """The channel's service config: retries always; round_robin over healthy replicas when the
    target may name several."""
    config: dict[str, Any] = {
        "methodConfig": [
            {"name": [{"service": GENERATION_SERVICE}, {"service": ADMIN_SERVICE}], "retryPolicy": RETRY_POLICY}
        ]
    }
    if is_balanced:
        config["loadBalancingConfig"] = [{"round_robin": {}}]
        config["healthCheckConfig"] = {"serviceName": GENERATION_SERVICE}
    return config


def channel_options(target: str) -> list[tuple[str, Any]]:
    return [
        ("grpc.service_config", json.dumps(service_config(is_several(target)))),
        ("grpc.enable_retries", 1),
        # a resolver's own service config (a DNS TXT record) must not replace this one
        ("grpc.service_config_disable_resolution", 1),
    ]
