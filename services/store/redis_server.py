"""`LocalRedis`: a private `redis-server` process that facecast starts and owns when no `REDIS_URL` is given.

    with LocalRedis() as server:                 # loopback only, a generated password, an append-only file
        client = server.client()                 # redis.Redis on server.url (password included), decoding responses
        server.restart()                         # the same port, password and data (the append-only file)
    # stopped: on close(), context exit, garbage collection or interpreter exit

`LocalRedis(supervise=True)` restarts the server whenever it exits (killed, crashed) — with its append-only file, no
session record is lost — so a dead Redis is never a reason to stop the cluster. `redacted_url` is the URL to print.

Used by `connect_store` (services/store/sessions.py), `facecast serve` and the local cluster launcher.  Knows how to
find, start, probe and stop the binary; nothing about session records.
"""

from __future__ import annotations

import logging
import os
import secrets
import shutil
import subprocess
import tempfile
import threading
import time
import weakref
from pathlib import Path
from typing import Any

import redis
from redis.backoff import NoBackoff
from redis.retry import Retry

from services.net import LOOPBACK, free_port

__all__ = ["LocalRedis", "redact_url"]

logger = logging.getLogger("facecast.redis")

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


def redact_url(url: str) -> str:
    """`url` with its password (if any) replaced by ***: what may be printed or logged."""
    scheme, sep, rest = url.partition("://")
    credentials, at, host = rest.rpartition("@")
    if not sep or not at:
        return url
    user, colon, _ = credentials.partition(":")
    return f"{scheme}://{user}{':***' if colon else ''}@{host}" if colon else f"{scheme}://***@{host}"


class _Owned:
    """What the finalizer stops: the current process (replaced by restarts) and the supervisor's stop flag."""

    def __init__(self) -> None:
        self.proc: subprocess.Popen | None = None
        self.stopping = threading.Event()


def _stop_process(owned: _Owned, tmpdir: str, owner_pid: int) -> None:
    if os.getpid() != owner_pid:  # a forked child must not stop its parent's server
        return
    owned.stopping.set()
    proc = owned.proc
    try:
        if proc is not None and proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(timeout=5)
    finally:
        shutil.rmtree(tmpdir, ignore_errors=True)


class LocalRedis:
    """Starts and owns a real ``redis-server`` on a free loopback port, for when ``REDIS_URL`` is unset: bound to
    127.0.0.1 only, with a generated password (``password=None`` for none), its data in an append-only file in its
    own temp dir, written through on every command (``persist=False``: in memory only).  Stops it on :meth:`close`,
    on context exit, when
    garbage-collected, and at interpreter exit.  The binary comes from ``binary``, else ``$FACECAST_REDIS_SERVER``,
    else ``redis-server`` on PATH.  ``supervise=True`` restarts it (same port, password and file) whenever it exits.

    Raises ``RuntimeError`` if the binary is missing, or if the server does not answer PING within
    ``startup_timeout_s`` (the message includes the tail of the server's log).  A process killed with SIGKILL cannot
    run its exit hooks, so its server is left running (loopback only, password protected, its temp dir on disk).
    """

    HOST = LOOPBACK

    def __init__(self, binary: str | None = None, *, startup_timeout_s: float = 10.0, port: int | None = None,
                 password: str | None | bool = True, persist: bool = True, supervise: bool = False):
        self.binary = _find_redis_server(binary)
        self.password = secrets.token_urlsafe(24) if password is True else (password or None)
        self.persist, self.startup_timeout_s = persist, startup_timeout_s
        self.restarts = 0
        self.auto_restart = supervise
        """While True (and supervised), an exited server is restarted (tests clear it to hold an outage open)."""
        self._tmpdir = tempfile.mkdtemp(prefix="facecast-redis-")
        self._owned = _Owned()
        self._finalizer = None
        try:
            attempts = 1 if port else 5
            for attempt in range(attempts):
                self.port = port or free_port()
                try:
                    self._start(startup_timeout_s)
                    break
                except _PortTaken:
                    if attempt == attempts - 1:
                        raise RuntimeError(f"redis-server could not bind 127.0.0.1:{self.port}:\n{self.log_tail()}")
        except BaseException:
            shutil.rmtree(self._tmpdir, ignore_errors=True)
            raise
        self._finalizer = weakref.finalize(self, _stop_process, self._owned, self._tmpdir, os.getpid())
        self._finalizer.atexit = True
        if supervise:
            threading.Thread(target=self._supervise, name="facecast-redis-supervisor", daemon=True).start()

    @property
    def _proc(self) -> subprocess.Popen | None:
        return self._owned.proc

    def restart(self) -> None:
        """Start the server again on the same port with the same password and data (after it exited or was
        stopped). Raises RuntimeError when it does not come back (the port taken meanwhile, the binary gone)."""
        proc = self._owned.proc
        if proc is not None and proc.poll() is None:
            proc.terminate()
            proc.wait(timeout=10)
        try:
            self._start(self.startup_timeout_s)
        except _PortTaken:
            raise RuntimeError(f"redis-server could not bind 127.0.0.1:{self.port} again:\n{self.log_tail()}")
        self.restarts += 1

    def _supervise(self) -> None:
        backoff = 0.2
        while not self._owned.stopping.wait(0.2):
            proc = self._owned.proc
            if proc is None or proc.poll() is None or not self.auto_restart:
                continue
            logger.warning("the local redis-server (pid %s) exited with %s; restarting it on port %d",
                           proc.pid, proc.returncode, self.port)
            try:
                if not self._owned.stopping.is_set():
                    self.restart()
                    logger.warning("the local redis-server is back (pid %s, restart %d)", self.pid, self.restarts)
                    backoff = 0.2
            except Exception as error:  # noqa: BLE001 - keep trying: Redis is never a reason to stop the cluster
                logger.error("the local redis-server did not restart (%s); retrying in %.1f s", error, backoff)
                self._owned.stopping.wait(backoff)
                backoff = min(backoff * 2, 10.0)

    def _start(self, timeout_s: float) -> None:
        tmp = Path(self._tmpdir)
        conf = tmp / "redis.conf"
        conf.write_text(
            f"port {self.port}\n"
            f"bind {self.HOST}\n"
            "protected-mode yes\n"
            "daemonize no\n"
            'save ""\n'
            + ("appendonly yes\nappendfsync always\n" if self.persist else "appendonly no\n")
            + (f'requirepass "{self.password}"\n' if self.password else "")
            + f'dir "{self._tmpdir}"\n'
            f'logfile "{tmp / "redis.log"}"\n'
            "loglevel notice\n"
        )
        conf.chmod(0o600)   # it holds the password
        (tmp / "redis.log").unlink(missing_ok=True)
        with open(tmp / "stdout.log", "wb") as out:
            proc = subprocess.Popen([self.binary, str(conf)], stdin=subprocess.DEVNULL, stdout=out,
                                    stderr=subprocess.STDOUT, cwd=self._tmpdir)
        deadline = time.monotonic() + timeout_s
        probe = redis.Redis(host=self.HOST, port=self.port, password=self.password, socket_connect_timeout=0.5,
                            socket_timeout=0.5, retry=Retry(NoBackoff(), 0))  # poll, do not back off
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
        self._owned.proc = proc

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
        """The URL clients connect with (the password included: print `redacted_url` instead)."""
        auth = f":{self.password}@" if self.password else ""
        return f"redis://{auth}{self.HOST}:{self.port}/0"

    @property
    def redacted_url(self) -> str:
        return redact_url(self.url)

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
        return f"LocalRedis(url={self.redacted_url!r}, pid={self.pid}, running={self.running})"
