"""Network facts every room shares: facecast's default ports, and a free loopback port for what it starts itself.

    from services.net import DEFAULT_GRPC_PORT, free_port
    grpc_port = free_port()          # an unused 127.0.0.1 port (tests, a private redis-server, Ray's side ports)

The Serve configs (`ray_configs/*.yaml`) and the KubeRay manifests rendered from them spell the same numbers in YAML;
every Python default reads them from here.  Knows sockets only: nothing about Ray, Redis or gRPC.
"""

from __future__ import annotations

import random
import socket
from pathlib import Path

DEFAULT_GRPC_PORT = 9000
"""Port of the gRPC API (`facecast serve --port`, `facecast call --target`, Serve's `grpc_options.port`)."""
DEFAULT_HTTP_PORT = 8000
"""Port of Ray Serve's HTTP proxy (Serve's `http_options.port`, the `serve` port of the KubeRay head)."""
LOOPBACK = "127.0.0.1"


PRIVATE_PORTS = (20000, 32767)
"""Where `free_port` looks: above Ray's worker ports (10002-19999 by default) and below Linux's default ephemeral range
(32768-60999), which every process's bind to port 0 and every outgoing connection draws from: on a machine running Ray
such a port can be taken between the choice and the bind, a port here only by another explicit choice."""


def free_port(host: str = LOOPBACK) -> int:
    """A TCP port on `host` that nothing listens on right now, from `PRIVATE_PORTS` (the OS picks one instead where the
    machine's ephemeral range overlaps them). Another process may still take it before the caller binds, so a caller
    that must be sure retries on "address in use"."""
    low, high = PRIVATE_PORTS
    ephemeral = ephemeral_ports()
    if ephemeral is None or ephemeral[0] > high or ephemeral[1] < low:
        chooser = random.SystemRandom()
        for _ in range(64):
            port = chooser.randint(low, high)
            with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
                try:
                    sock.bind((host, port))
                except OSError:
                    continue
                return port
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        return sock.getsockname()[1]


def ephemeral_ports(path: str = "/proc/sys/net/ipv4/ip_local_port_range") -> tuple[int, int] | None:
    """The kernel's ephemeral port range (Linux), None where it cannot be read."""
    try:
        low, high = (int(part) for part in Path(path).read_text().split())
    except (OSError, ValueError):
        return None
    return low, high
