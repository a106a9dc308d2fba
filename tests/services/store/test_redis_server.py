"""services.store.redis_server.LocalRedis: the real redis-server facecast starts, owns and stops when no REDIS_URL is
given."""

from __future__ import annotations

import os
import stat
import time

import pytest
import redis

from services.store.redis_server import LocalRedis
from tests.services.store.helpers import refuses

pytestmark = pytest.mark.integration


def test_local_redis_lifecycle(local_redis):
    server = LocalRedis()
    try:
        assert server.running
        assert server.url == f"redis://127.0.0.1:{server.port}/0"
        assert server.port != local_redis.port
        c = redis.Redis.from_url(server.url, decode_responses=True)
        assert c.ping() is True
        c.set("k", "v")
        assert c.get("k") == "v"
        assert c.config_get("save")["save"] == ""  # no persistence
        assert c.config_get("appendonly")["appendonly"] == "no"
        c.close()
        tmpdir = server._tmpdir
    finally:
        server.close()
    assert not server.running
    assert refuses(server.port)
    assert not os.path.exists(tmpdir)
    server.close()  # idempotent


def test_local_redis_context_manager():
    with LocalRedis() as server:
        port = server.port
        assert redis.Redis(port=port).ping()
    assert refuses(port)


def test_local_redis_missing_binary(monkeypatch, tmp_path):
    with pytest.raises(RuntimeError, match=r"redis-server not found: install it \(Debian: apt-get install "
                                           r"redis-server\) or set REDIS_URL"):
        LocalRedis(binary=str(tmp_path / "no-such-redis-server"))
    monkeypatch.setenv("FACECAST_REDIS_SERVER", str(tmp_path / "also-missing"))
    with pytest.raises(RuntimeError, match="redis-server not found"):
        LocalRedis()
    monkeypatch.delenv("FACECAST_REDIS_SERVER")
    monkeypatch.setenv("PATH", str(tmp_path))
    with pytest.raises(RuntimeError, match="redis-server not found"):
        LocalRedis()


def test_local_redis_broken_binary_reports_log_tail(tmp_path):
    fake = tmp_path / "redis-server"
    fake.write_text("#!/bin/sh\necho 'boom: this is not redis' >&2\nexit 3\n")
    fake.chmod(fake.stat().st_mode | stat.S_IXUSR)
    with pytest.raises(RuntimeError, match=r"(?s)exited with status 3.*boom: this is not redis"):
        LocalRedis(binary=str(fake))


def test_local_redis_startup_timeout(tmp_path):
    fake = tmp_path / "redis-server"
    fake.write_text("#!/bin/sh\necho 'stuck starting'\nexec sleep 30\n")
    fake.chmod(fake.stat().st_mode | stat.S_IXUSR)
    t0 = time.monotonic()
    with pytest.raises(RuntimeError, match=r"(?s)did not answer PING.*stuck starting"):
        LocalRedis(binary=str(fake), startup_timeout_s=0.5)
    assert time.monotonic() - t0 < 5
