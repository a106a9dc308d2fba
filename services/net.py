"""Network facts every room shares: facecast's default ports, and a free loopback port for what it starts itself.

    from services.net import DEFAULT_GRPC_PORT, free_port
    grpc_port = free_port()          # an unused 127.0.0.1 port (tests, a private redis-server, Ray's side ports)

The Serve configs (`ray_configs/*.yaml`) and the KubeRay manifests rendered from them spell the same numbers in YAML;
every Python default reads them from here.  Knows sockets only: nothing about Ray, Redis or gRPC.
"""

from __future__ import annotations

import socket

DEFAULT_GRPC_PORT = 9000
"""Port of the gRPC API (`facecast serve --port`, `facecast call --target`, Serve's `grpc_options.port`)."""
DEFAULT_HTTP_PORT = 8000
"""Port of Ray Serve's HTTP proxy (Serve's `http_options.port`, the `serve` port of the KubeRay head)."""
LOOPBACK = "127.0.0.1"


def free_port(host: str = LOOPBACK) -> int:
    """A TCP port on `host` that nothing listens on right now (the OS picks it; another process may take it before
    the caller binds, so a caller that must be sure retries on "address in use")."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        return sock.getsockname()[1]
