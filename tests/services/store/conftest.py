"""Shared by the store tests: one real redis-server per test module."""

from __future__ import annotations

import pytest

from services.store.redis_server import LocalRedis


@pytest.fixture(scope="module")
def local_redis():
    server = LocalRedis()   # `make test` installs redis-server; a missing one is a failure, not a skip
    yield server
    server.close()
