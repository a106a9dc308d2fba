"""`LocalRedis`: a private `redis-server` process that facecast starts and owns when no `REDIS_URL` is given.

    with LocalRedis() as server:                 # a free loopback port, no persistence, its own temp dir
        client = server.client()                 # redis.Redis on server.url, decoding responses
    # stopped: on close(), context exit, garbage collection or interpreter exit

Used by `connect_store` (services/store/sessions.py), `facecast serve` and the local cluster launcher.  Knows how to
find, start, probe and stop the binary; nothing about session records.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
import time
import weakref
from pathlib import Path
from typing import Any

import redis
from redis.backoff import NoBackoff
from redis.retry import Retry

from services.net import LOOPBACK, free_port

__all__ = ["LocalRedis"]

_NOT_FOUND_MSG = "redis-server not found: install it (Debian: apt-get install redis-server) or set REDIS_URL"


class _PortTaken(Exception):
    """The chosen port was taken between picking it and redis-server binding it: try another."""


def _find_redis_server(binary: str | None) -> str:
    candidate = binary or os.environ.get("FACECAST_REDIS_SERVER") or "redis-server"
    if os.sep in candidate or (os.altsep and os.altsep in candidate):
        if os.path.isfile(candidate) and os.access(candidate, os.X_OK):
            return candidate
        raise RuntimeError(f"{_NOT_FOUND_MSG} (tried {candidate!r})")
    found = shutil.which(candidate)
    if not found:
        raise RuntimeError(f"{_NOT_FOUND_MSG} (no {candidate!r} on PATH)")
    return found


def _stop_process(proc: subprocess.Popen, tmpdir: str, owner_pid: int) -> None:
    if os.getpid() != owner_pid:  # a forked child must not stop its parent's server
        return
    try:
        if proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(timeout=5)
    finally:
        shutil.rmtree(tmpdir, ignore_errors=True)


class LocalRedis:
    """Starts and owns a real ``redis-server`` on a free loopback port (no persistence, its own temp dir), for when
    ``REDIS_URL`` is unset.  Stops it on :meth:`close`, on context exit, when garbage-collected, and at interpreter
    exit.  The binary comes from ``binary``, else ``$FACECAST_REDIS_SERVER``, else ``redis-server`` on PATH.

    Raises ``RuntimeError`` if the binary is missing, or if the server does not answer PING within
    ``startup_timeout_s`` (the message includes the tail of the server's log).  A process killed with SIGKILL cannot
    run its exit hooks, so its server is left running (harmless: loopback only, nothing on disk but its temp dir).
    """

    HOST = LOOPBACK

    def __init__(self, binary: str | None = None, *, startup_timeout_s: float = 10.0, port: int | None = None):
        self.binary = _find_redis_server(binary)
        self._tmpdir = tempfile.mkdtemp(prefix="facecast-redis-")
        self._proc: subprocess.Popen | None = None
        self._finalizer = None
        try:
            attempts = 1 if port else 5
            for attempt in range(attempts):
                self.port = port or free_port()
                try:
                    self._start(startup_timeout_s)
                    return
                except _PortTaken:
                    if attempt == attempts - 1:
                        raise RuntimeError(f"redis-server could not bind 127.0.0.1:{self.port}:\n{self.log_tail()}")
        except BaseException:
            shutil.rmtree(self._tmpdir, ignore_errors=True)
            raise

    def _start(self, timeout_s: float) -> None:
        tmp = Path(self._tmpdir)
        conf = tmp / "redis.conf"
        conf.write_text(
            f"port {self.port}\n"
            f"bind {self.HOST}\n"
            "protected-mode yes\n"
            "daemonize no\n"
            'save ""\n'
            "appendonly no\n"
            f'dir "{self._tmpdir}"\n'
            f'logfile "{tmp / "redis.log"}"\n'
            "loglevel notice\n"
        )
        (tmp / "redis.log").unlink(missing_ok=True)
        with open(tmp / "stdout.log", "wb") as out:
            proc = subprocess.Popen([self.binary, str(conf)], stdin=subprocess.DEVNULL, stdout=out,
                                    stderr=subprocess.STDOUT, cwd=self._tmpdir)
        deadline = time.monotonic() + timeout_s
        probe = redis.Redis(host=self.HOST, port=self.port, socket_connect_timeout=0.5, socket_timeout=0.5,
                            retry=Retry(NoBackoff(), 0))  # poll, do not back off
        try:
            while True:
                rc = proc.poll()
                if rc is not None:
                    tail = self.log_tail()
                    if "Address already in use" in tail:
                        raise _PortTaken()
                    raise RuntimeError(f"redis-server ({self.binary}) exited with status {rc} before answering "
                                       f"PING on {self.HOST}:{self.port}; log tail:\n{tail}")
                try:
                    if probe.ping():
                        break
                except (redis.RedisError, OSError):
                    pass
                if time.monotonic() > deadline:
                    raise RuntimeError(f"redis-server ({self.binary}) did not answer PING on {self.HOST}:{self.port} "
                                       f"within {timeout_s:g} s; log tail:\n{self.log_tail()}")
                time.sleep(0.02)
        except BaseException:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
            raise
        finally:
            probe.close()
        self._proc = proc
        self._finalizer = weakref.finalize(self, _stop_process, proc, self._tmpdir, os.getpid())
        self._finalizer.atexit = True

    def log_tail(self, max_lines: int = 30) -> str:
        lines: list[str] = []
        for name in ("stdout.log", "redis.log"):
            try:
                lines += Path(self._tmpdir, name).read_text(errors="replace").splitlines()
            except OSError:
                pass
        return "\n".join(lines[-max_lines:]) or "(empty log)"

    @property
    def url(self) -> str:
        return f"redis://{self.HOST}:{self.port}/0"

    @property
    def pid(self) -> int | None:
        return self._proc.pid if self._proc else None

    @property
    def running(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    def client(self, **kw: Any) -> redis.Redis:
        kw.setdefault("decode_responses", True)
        return redis.Redis.from_url(self.url, **kw)

    def close(self) -> None:
        if self._finalizer is not None:
            self._finalizer()  # idempotent; also unregisters the exit hook

    def __enter__(self) -> "LocalRedis":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"LocalRedis(url={self.url!r}, pid={self.pid}, running={self.running})"
