"""`ResumeStore`: where every worker deployment keeps, after each chunk, what a replacement replica needs to continue a
session exactly (`model_core.snapshot`), and `SessionNotHere`, what a replica answers for a session it does not hold.

Why Redis and not Ray's object store: an object lives as long as its owner process, and the owner of what a worker
puts is that worker, so the snapshots of a killed replica would die with it (the very case they exist for); Redis
outlives every Ray process, already holds the session records, and the embedded server persists to its append-only
file.  The cost is bytes per chunk: on `talk128` 0.58 MB of score caches, 80 kB of audio state (per push) and 48 kB
of clean latents per chunk, plus the 4.9 MB decode cache every `DECODE_CHECKPOINT_CHUNKS` chunks (BENCHMARKS.md,
"Calls that survive"); for the wan shapes the caches are too large to copy off the GPU every chunk, which is why
`resume_snapshots` can be turned off.

One Redis hash per session (`facecast:resume:<session id>`, expiring with the session record's TTL):

    audio            the AudioEncoder's `AudioSession` after the last push / end / speaking change
    ticket:<n>       chunk n's ticket and features (the last REPLAY_CHUNKS), so the replacement re-puts them
    score-open       what `ScoreWorkerGroup.open` got: stream, reference latent, prompt, regions
    sink             the adaptive sink latent, once chunk 0 set it
    score:<steps>:<n>   the caches of steps <steps> (e.g. "0,1") and the noise generator before chunk n
    decode:<n>       the decode cache before chunk n, for n a multiple of DECODE_CHECKPOINT_CHUNKS (the decoder's
                     name under decode-open)
    latents:<n>      chunk n's clean latents: a replacement decodes them again from the last decode checkpoint,
                     which rebuilds the cache exactly (re-decoding only the last few latent frames from an empty
                     cache does not: the decoder's memory fades but never ends, ~1e-6 after 21 latent frames)

Writes happen after the chunk (or push) and before the call returns, so whatever the ingress has received is in
the store; a write that fails (Redis away) is logged once per outage and the stream goes on unprotected.
"""

from __future__ import annotations

import logging
import time

import redis

from services.store.redis_server import redact_url

logger = logging.getLogger("facecast.resume")

KEY_PREFIX = "facecast:resume:"
DECODE_CHECKPOINT_CHUNKS = 8
"""The decode cache (MBs) is saved every this many chunks; the chunks' clean latents (kBs) every chunk."""


class SessionNotHere(KeyError):
    """This replica holds no state for the session (a replacement replica before the ingress asked it to restore,
    or a session that was closed). The ingress treats it like a dead replica: it restores and resubmits."""

    def __str__(self) -> str:       # KeyError quotes its message
        return str(self.args[0]) if self.args else "session not here"


class ResumeUnavailable(RuntimeError):
    """A session cannot be restored: its snapshot is missing (expired, never written, snapshots off) or
    unreadable."""


class ResumeStore:
    """Per-session snapshots in Redis (see the module docstring). `keep`: how many chunk-indexed versions of each
    part are kept (older ones are deleted as new ones are written)."""

    def __init__(self, redis_url: str, ttl_s: float, keep: int = 4):
        self.url, self.ttl_s, self.keep = redis_url, int(max(1, ttl_s)), keep
        self.client = redis.Redis.from_url(redis_url, socket_connect_timeout=5.0, socket_timeout=5.0)
        self.down_since: float | None = None

    @classmethod
    def from_settings(cls, settings) -> "ResumeStore | None":
        """The store of the settings' Redis, or None when snapshots are off (or no Redis URL is known)."""
        url = settings.effective_redis_url()
        if not settings.resume_snapshots or not url:
            return None
        return cls(url, settings.session_ttl_s, keep=settings.max_chunks_in_flight + 2)

    @staticmethod
    def key(session_id: str) -> str:
        return KEY_PREFIX + session_id

    def put(self, session_id: str, fields: dict[str, bytes], drop: list[str] = ()) -> bool:
        """Write `fields` of the session's hash (and delete `drop`) in one round trip. False when Redis is away."""
        key = self.key(session_id)
        try:
            pipe = self.client.pipeline(transaction=True)
            pipe.hset(key, mapping=fields)
            if drop:
                pipe.hdel(key, *drop)
            pipe.expire(key, self.ttl_s)
            pipe.execute()
        except redis.RedisError as error:
            if self.down_since is None:
                self.down_since = time.monotonic()
                logger.warning("session snapshots cannot be written (%s at %s): a worker failure now ends its "
                               "sessions until Redis returns", type(error).__name__, redact_url(self.url))
            return False
        if self.down_since is not None:
            logger.warning("session snapshots are written again after %.1f s", time.monotonic() - self.down_since)
            self.down_since = None
        return True

    def put_versioned(self, session_id: str, part: str, index: int, data: bytes, extra: dict[str, bytes] = ()) -> bool:
        """`part:<index>` (plus `extra` fields), dropping `part:<index - keep>`."""
        fields = {f"{part}:{index}": data, **dict(extra)}
        return self.put(session_id, fields, drop=[f"{part}:{index - self.keep}"] if index >= self.keep else [])

    def get(self, session_id: str, field: str) -> bytes | None:
        return self.client.hget(self.key(session_id), field)

    def need(self, session_id: str, field: str, what: str) -> bytes:
        """The field, or ResumeUnavailable naming what is missing."""
        data = self.get(session_id, field)
        if data is None:
            raise ResumeUnavailable(f"session {session_id!r} cannot be resumed: no snapshot of {what} (it expired, "
                                    "or snapshots were not written)")
        return data

    def names(self, session_id: str, prefix: str) -> list[str]:
        """The names of the fields that start with `prefix` (values not fetched)."""
        return [name.decode() for name in self.client.hkeys(self.key(session_id)) if name.decode().startswith(prefix)]

    def fields(self, session_id: str, prefix: str) -> dict[str, bytes]:
        """Every field whose name starts with `prefix` (only those are fetched: the hash also holds MBs of caches)."""
        names = self.names(session_id, prefix)
        return dict(zip(names, self.client.hmget(self.key(session_id), names))) if names else {}

    def forget(self, session_id: str) -> None:
        try:
            self.client.delete(self.key(session_id))
        except redis.RedisError:
            pass     # the hash expires with its TTL


def restore_call(store: ResumeStore | None, session_id: str):
    """The store, or ResumeUnavailable when snapshots are off on this server."""
    if store is None:
        raise ResumeUnavailable(f"session {session_id!r} cannot be resumed: session snapshots are off on this server "
                                "(resume_snapshots: false, or no Redis URL)")
    return store
