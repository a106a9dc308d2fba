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
        assert server.running and len(server.password) >= 24
        assert server.url == f"redis://:{server.password}@127.0.0.1:{server.port}/0"
        assert server.redacted_url == f"redis://:***@127.0.0.1:{server.port}/0" and server.password not in repr(server)
        assert server.port != local_redis.port and server.password != local_redis.password
        c = redis.Redis.from_url(server.url, decode_responses=True)
        assert c.ping() is True
        c.set("k", "v")
        assert c.get("k") == "v"
        assert c.config_get("save")["save"] == ""  # no RDB snapshots: the append-only file is the persistence
        assert c.config_get("appendonly")["appendonly"] == "yes"
        assert c.config_get("bind")["bind"] == "127.0.0.1"
        c.close()
        with pytest.raises(redis.AuthenticationError):   # no password, no access
            redis.Redis(port=server.port).ping()
        tmpdir = server._tmpdir
    finally:
        server.close()
    assert not server.running
    assert refuses(server.port)
    assert not os.path.exists(tmpdir)
    server.close()  # idempotent


def test_local_redis_context_manager():
    with LocalRedis(password=None, persist=False) as server:
        port = server.port
        assert redis.Redis(port=port).ping() and server.url == f"redis://127.0.0.1:{port}/0"
    assert refuses(port)


def test_a_restarted_local_redis_keeps_its_port_password_and_data():
    with LocalRedis() as server:
        client = server.client()
        client.set("session", "kept")
        first = server.pid
        server.restart()
        assert server.pid != first and server.restarts == 1
        assert client.get("session") == "kept", "the append-only file lost a write"
        client.close()


def test_a_supervised_local_redis_comes_back_after_being_killed_with_its_data():
    import signal

    with LocalRedis(supervise=True) as server:
        client = server.client()
        client.set("session", "kept")          # appendfsync always: on disk before the reply
        first = server.pid
        os.kill(first, signal.SIGKILL)
        deadline = time.monotonic() + 15
        while not (server.running and server.pid != first):
            assert time.monotonic() < deadline, "the supervisor did not restart redis-server"
            time.sleep(0.1)
        assert client.get("session") == "kept" and server.restarts == 1
        client.close()
    assert not server.running


def test_redact_url():
    from services.store.redis_server import redact_url

    assert redact_url("redis://:s3cret@host:6379/0") == "redis://:***@host:6379/0"
    assert redact_url("rediss://user:s3cret@host:6380/1") == "rediss://user:***@host:6380/1"
    assert redact_url("redis://token@host/0") == "redis://***@host/0"
    assert redact_url("redis://host:6379/0") == "redis://host:6379/0"


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


def test_a_tls_redis_url_with_a_password_works(tmp_path):
    """rediss:// with a password and the server's certificate: the session store connects and keeps a record."""
    import subprocess

    from services.net import free_port
    from services.store.redis_server import _find_redis_server
    from services.store.sessions import SessionRecord, connect_store

    from tests.tls import self_signed

    cert, key = self_signed(tmp_path)
    port = free_port()
    server = subprocess.Popen([_find_redis_server(None), "--port", "0", "--tls-port", str(port), "--bind", "127.0.0.1",
                               "--tls-cert-file", str(cert), "--tls-key-file", str(key), "--tls-ca-cert-file",
                               str(cert), "--tls-auth-clients", "no", "--requirepass", "tls-password-0123",
                               "--save", "", "--dir", str(tmp_path)], stdout=subprocess.DEVNULL,
                              stderr=subprocess.DEVNULL)
    try:
        store, owner = connect_store(f"rediss://:tls-password-0123@127.0.0.1:{port}/0?ssl_ca_certs={cert}")
        assert owner is None
        deadline = time.monotonic() + 10
        while not store.ping():
            assert time.monotonic() < deadline and server.poll() is None, "the TLS redis-server did not answer"
            time.sleep(0.1)
        store.create(SessionRecord.new("0" * 32, token="t", owner="", options={}, characters=[]))
        assert store.get("0" * 32).session_id == "0" * 32
        plain, _ = connect_store(f"redis://:tls-password-0123@127.0.0.1:{port}/0")
        assert not plain.ping(), "the TLS port answered plaintext"
    finally:
        server.kill()
        server.wait()
