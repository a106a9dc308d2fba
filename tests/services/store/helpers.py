"""Small probes shared by the store tests."""

from __future__ import annotations

import socket


def refuses(port: int) -> bool:
    """True when nothing accepts connections on 127.0.0.1:port (a stopped server really is gone)."""
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=1):
            return False
    except ConnectionRefusedError:
        return True
