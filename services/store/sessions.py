"""Session records for the facecast gRPC ingress, kept in Redis.

An ingress replica (a Ray Serve replica; there may be several, and any of them may die and be restarted) keeps one
record per live avatar session in Redis, so that a client whose replica died can re-attach through another replica
and find its session (options, characters, prompt, progress counters, who is streaming it).

Layout (``prefix`` defaults to ``"facecast"``)::

    {prefix}:session:{id}   hash, one field per SessionRecord field; options/characters are JSON strings;
                            the key carries a TTL that every write refreshes (see "Lifetimes" below)
    {prefix}:active         sorted set of session ids scored by expiry time (Redis server clock, milliseconds);
                            the admission ledger: count_active() prunes expired members and counts the rest

Atomicity: every operation that touches more than one field or key is a single Lua script (server-side time from
``TIME``, so replicas with skewed clocks agree on expiry), so concurrent writers never lose each other's fields and
the TTL, the record and the active set move together.  ``record_progress`` is monotonic: each counter becomes
``max(stored, given)``.  ``update`` is a plain set of the named fields (last writer wins per field, other fields are
untouched); ``options`` is replaced as a whole, not merged.

Lifetimes:

* CREATED / STREAMING ("active"): every write (create, update, heartbeat, record_progress) sets the key TTL to
  ``ttl_s`` and moves the session's expiry score in ``{prefix}:active`` to now + ``ttl_s`` -- only if it is still
  a member, so a session that was ``release()``-d is not silently re-admitted by a late heartbeat.
* ENDED / FAILED: the record stays readable (the client can learn how its session finished); writes still refresh
  the TTL to ``ttl_s``; the session leaves the active set.
* CLOSED: ``close()`` (or ``update(state=CLOSED)``) sets the TTL to ``close_grace_s`` (60 s by default) once; later
  writes do not extend it.  During the grace period ``get()`` returns the record with state CLOSED, so a late
  re-attach can be told "this session was closed" rather than "unknown"; after it, ``get()`` raises
  ``SessionNotFound`` like for any unknown id.

Admission: ``try_admit(id, limit)`` atomically reserves a slot in the active set when fewer than ``limit`` unexpired
members are there (re-admitting an id that already holds a slot returns True and refreshes it).  The intended flow
is ``try_admit`` -> ``create`` (create also adds the id, so a store used without admission control still counts its
sessions) -> ... -> ``close``/``release``.  A reservation whose record is never created expires after ``ttl_s``.
``count_active()`` counts slots, i.e. it includes admitted-but-not-yet-created reservations.

When ``REDIS_URL`` is unset (a laptop, CI), :func:`connect_store` starts a private ``redis-server`` through
:class:`~services.store.redis_server.LocalRedis`: loopback only, no persistence, its own temp dir, stopped on
``close()`` / interpreter exit.  This module knows the records and their Lua scripts; how that server process is
found, started and stopped lives in ``redis_server.py``.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import re
import time
from dataclasses import dataclass
from enum import Enum
from typing import Any

import redis

from services.store.redis_server import LocalRedis

__all__ = [
    "ACTIVE_STATES",
    "SessionNotFound",
    "SessionRecord",
    "SessionState",
    "SessionStore",
    "connect_store",
    "hash_token",
]


class SessionState(str, Enum):
    CREATED = "CREATED"
    STREAMING = "STREAMING"
    ENDED = "ENDED"
    CLOSED = "CLOSED"
    FAILED = "FAILED"


ACTIVE_STATES = frozenset({SessionState.CREATED, SessionState.STREAMING})

_SHA256_HEX = re.compile(r"^[0-9a-f]{64}$")


def hash_token(token: str | bytes) -> str:
    """The value to store in ``SessionRecord.token_sha256``: lowercase hex SHA-256 of the session token."""
    if isinstance(token, str):
        token = token.encode("utf-8")
    return hashlib.sha256(token).hexdigest()


# Field kinds, used to (de)serialise a record to/from a Redis hash.
_STR_FIELDS = ("session_id", "token_sha256", "owner", "prompt", "attached_by")
_FLOAT_FIELDS = ("created_at", "updated_at", "heartbeat_at")
_INT_FIELDS = ("chunks_emitted", "frames_emitted", "audio_samples_received", "sample_rate_hz")
_JSON_FIELDS = ("options", "characters", "delivery", "conversation")
_PROGRESS_FIELDS = ("chunks_emitted", "frames_emitted", "audio_samples_received")


@dataclass
class SessionRecord:
    session_id: str
    token_sha256: str  # hex SHA-256 of the session token (see hash_token); never the token itself
    owner: str
    options: dict  # JSON-serialisable stream options (fps, width, height, steps, chunk_latent_frames, seed, ...)
    characters: list  # list of [x0, y0, x1, y1]
    prompt: str
    state: SessionState
    created_at: float  # unix seconds
    updated_at: float
    heartbeat_at: float
    chunks_emitted: int = 0
    frames_emitted: int = 0
    audio_samples_received: int = 0
    sample_rate_hz: int = 0
    attached_by: str = ""  # replica id currently streaming it ("" when none)
    delivery: dict = dataclasses.field(default_factory=lambda: {"kind": "grpc"})  # where its video goes
    conversation: dict = dataclasses.field(default_factory=dict)  # {} or {"mode", "instructions", "reply_characters"}

    def __post_init__(self) -> None:
        self.state = SessionState(self.state)

    @classmethod
    def new(
        cls,
        session_id: str,
        *,
        token: str | bytes,
        owner: str,
        options: dict,
        characters: list,
        prompt: str = "",
        sample_rate_hz: int = 0,
        now: float | None = None,
        delivery: dict | None = None,
    ) -> "SessionRecord":
        """A fresh CREATED record; hashes ``token`` and stamps all three timestamps with ``now`` (default: now)."""
        ts = time.time() if now is None else float(now)
        return cls(
            session_id=session_id,
            token_sha256=hash_token(token),
            owner=owner,
            options=dict(options),
            characters=[list(c) for c in characters],
            prompt=prompt,
            state=SessionState.CREATED,
            created_at=ts,
            updated_at=ts,
            heartbeat_at=ts,
            sample_rate_hz=int(sample_rate_hz),
            delivery=dict(delivery or {"kind": "grpc"}),
        )

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d["state"] = self.state.value
        return d

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), sort_keys=True, separators=(",", ":"))

    @classmethod
    def from_dict(cls, data: dict) -> "SessionRecord":
        """Builds a record, ignoring unknown keys (records written by a newer replica during a rolling upgrade)."""
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in names})

    @classmethod
    def from_json(cls, text: str | bytes) -> "SessionRecord":
        return cls.from_dict(json.loads(text))


class SessionNotFound(KeyError):
    """No session with this id: never created, expired, or past its close grace period."""

    def __init__(self, session_id: str):
        super().__init__(session_id)
        self.session_id = session_id

    def __str__(self) -> str:
        return f"session {self.session_id!r} not found (unknown or expired)"


# ----------------------------------------------------------------------------------------------------------------
# (de)serialisation to a Redis hash


def _text(v: Any) -> str:
    return v.decode("utf-8") if isinstance(v, (bytes, bytearray)) else str(v)


def _encode_field(name: str, value: Any) -> str:
    if name == "state":
        return SessionState(value).value
    if name in _STR_FIELDS:
        if not isinstance(value, str):
            raise ValueError(f"{name} must be a str, got {type(value).__name__}")
        return value
    if name in _FLOAT_FIELDS:
        return repr(float(value))
    if name in _INT_FIELDS:
        if isinstance(value, float) and not value.is_integer():
            raise ValueError(f"{name} must be an integer, got {value!r}")
        v = int(value)
        if v < 0:
            raise ValueError(f"{name} must be >= 0, got {v}")
        return str(v)
    if name in _JSON_FIELDS:
        if name in ("options", "delivery", "conversation") and not isinstance(value, dict):
            raise ValueError(f"{name} must be a dict, got {type(value).__name__}")
        if name == "characters" and not isinstance(value, (list, tuple)):
            raise ValueError(f"characters must be a list, got {type(value).__name__}")
        try:
            return json.dumps(value, sort_keys=True, separators=(",", ":"), allow_nan=False)
        except (TypeError, ValueError) as e:
            raise ValueError(f"{name} is not JSON-serialisable: {e}") from None
    raise ValueError(f"unknown SessionRecord field {name!r}")


def _check_token_hash(value: str) -> None:
    if not _SHA256_HEX.match(value):
        raise ValueError("token_sha256 must be a lowercase hex SHA-256 digest (use hash_token(token)); "
                         "refusing to store what may be a raw token")


def _record_to_hash(rec: SessionRecord) -> dict[str, str]:
    return {f.name: _encode_field(f.name, getattr(rec, f.name)) for f in dataclasses.fields(SessionRecord)}


def _record_from_hash(session_id: str, raw: dict) -> SessionRecord:
    h = {_text(k): _text(v) for k, v in raw.items()}
    data: dict[str, Any] = {}
    try:
        for name in _STR_FIELDS:
            if name in h:
                data[name] = h[name]
        for name in _FLOAT_FIELDS:
            data[name] = float(h[name])
        for name in _INT_FIELDS:
            if name in h:
                data[name] = int(h[name])
        for name in _JSON_FIELDS:
            if name in h or name not in ("delivery", "conversation"):   # older records have neither
                data[name] = json.loads(h[name])
        data["state"] = SessionState(h["state"])
        return SessionRecord.from_dict(data)
    except (KeyError, ValueError, TypeError) as e:
        # Not a KeyError: that would read as SessionNotFound to callers catching KeyError.
        raise ValueError(f"corrupt session record {session_id!r} in Redis: {e!r}") from None


def _pairs_to_dict(flat: list) -> dict:
    return {flat[i]: flat[i + 1] for i in range(0, len(flat), 2)}


# ----------------------------------------------------------------------------------------------------------------
# Lua scripts.  Redis runs each atomically; TIME is the server clock (fine in scripts since Redis 5 with effects
# replication, the only mode in Redis 7).  Counters are written back as the caller's decimal strings, never as Lua
# numbers (tostring(1e15) would be "1e+15").

_LUA_COMMON = r"""
if redis.replicate_commands then pcall(redis.replicate_commands) end
local function now()
  local t = redis.call('TIME')
  local ms = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
  return ms, t[1] .. '.' .. string.format('%06d', tonumber(t[2]))
end
local function is_active(state)
  return state == 'CREATED' or state == 'STREAMING'
end
-- TTL and active-set bookkeeping after a write to an existing record.
local function touch(key, akey, sid, prev, state, ttl_ms, grace_ms, now_ms)
  if state == 'CLOSED' then
    if prev ~= 'CLOSED' then redis.call('PEXPIRE', key, grace_ms) end
    redis.call('ZREM', akey, sid)
  elseif is_active(state) then
    redis.call('PEXPIRE', key, ttl_ms)
    redis.call('ZADD', akey, 'XX', now_ms + ttl_ms, sid)
  else
    redis.call('PEXPIRE', key, ttl_ms)
    redis.call('ZREM', akey, sid)
  end
end
"""

# KEYS: session, active.  ARGV: sid, ttl_ms, grace_ms, state, field, value, ...   -> 1 created, 0 exists
_LUA_CREATE = _LUA_COMMON + r"""
if redis.call('EXISTS', KEYS[1]) == 1 then return 0 end
local sid, ttl_ms, grace_ms, state = ARGV[1], tonumber(ARGV[2]), tonumber(ARGV[3]), ARGV[4]
redis.call('HSET', KEYS[1], unpack(ARGV, 5))
local now_ms = now()
if state == 'CLOSED' then
  redis.call('PEXPIRE', KEYS[1], grace_ms)
  redis.call('ZREM', KEYS[2], sid)
elseif is_active(state) then
  redis.call('PEXPIRE', KEYS[1], ttl_ms)
  redis.call('ZADD', KEYS[2], now_ms + ttl_ms, sid)
else
  redis.call('PEXPIRE', KEYS[1], ttl_ms)
  redis.call('ZREM', KEYS[2], sid)
end
return 1
"""

# KEYS: session, active.  ARGV: sid, ttl_ms, grace_ms, field, value, ...   -> flat HGETALL after the write, or nil
_LUA_UPDATE = _LUA_COMMON + r"""
if redis.call('EXISTS', KEYS[1]) == 0 then return false end
local sid, ttl_ms, grace_ms = ARGV[1], tonumber(ARGV[2]), tonumber(ARGV[3])
local prev = redis.call('HGET', KEYS[1], 'state')
local state = prev
for i = 4, #ARGV, 2 do
  if ARGV[i] == 'state' then state = ARGV[i + 1] end
end
local now_ms, now_s = now()
if #ARGV >= 5 then redis.call('HSET', KEYS[1], unpack(ARGV, 4)) end
redis.call('HSET', KEYS[1], 'updated_at', now_s)
touch(KEYS[1], KEYS[2], sid, prev, state, ttl_ms, grace_ms, now_ms)
return redis.call('HGETALL', KEYS[1])
"""

# KEYS: session, active.  ARGV: sid, ttl_ms, grace_ms, replica_id   -> 1 ok, 0 not found
_LUA_HEARTBEAT = _LUA_COMMON + r"""
if redis.call('EXISTS', KEYS[1]) == 0 then return 0 end
local sid, ttl_ms, grace_ms = ARGV[1], tonumber(ARGV[2]), tonumber(ARGV[3])
local state = redis.call('HGET', KEYS[1], 'state')
local now_ms, now_s = now()
redis.call('HSET', KEYS[1], 'heartbeat_at', now_s, 'attached_by', ARGV[4])
touch(KEYS[1], KEYS[2], sid, state, state, ttl_ms, grace_ms, now_ms)
return 1
"""

# KEYS: session, active.  ARGV: sid, ttl_ms, grace_ms, chunks, frames, samples   -> 1 ok, 0 not found
_LUA_PROGRESS = _LUA_COMMON + r"""
if redis.call('EXISTS', KEYS[1]) == 0 then return 0 end
local sid, ttl_ms, grace_ms = ARGV[1], tonumber(ARGV[2]), tonumber(ARGV[3])
local names = {'chunks_emitted', 'frames_emitted', 'audio_samples_received'}
local cur = redis.call('HMGET', KEYS[1], 'state', names[1], names[2], names[3])
local state = cur[1]
local now_ms, now_s = now()
local out = {'updated_at', now_s}
for i = 1, 3 do
  local old = tonumber(cur[i + 1] or '0') or 0
  if tonumber(ARGV[3 + i]) > old then
    out[#out + 1] = names[i]
    out[#out + 1] = ARGV[3 + i]
  end
end
redis.call('HSET', KEYS[1], unpack(out))
touch(KEYS[1], KEYS[2], sid, state, state, ttl_ms, grace_ms, now_ms)
return 1
"""

# KEYS: active.  ARGV: sid, limit, ttl_ms   -> 1 admitted, 0 full
_LUA_ADMIT = _LUA_COMMON + r"""
local sid, limit, ttl_ms = ARGV[1], tonumber(ARGV[2]), tonumber(ARGV[3])
local now_ms = now()
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', '(' .. now_ms)
if redis.call('ZSCORE', KEYS[1], sid) then
  redis.call('ZADD', KEYS[1], now_ms + ttl_ms, sid)
  return 1
end
if redis.call('ZCARD', KEYS[1]) < limit then
  redis.call('ZADD', KEYS[1], now_ms + ttl_ms, sid)
  return 1
end
return 0
"""

# KEYS: active, group.  ARGV: sid, limit, ttl_ms, group_limit   -> 1 admitted, 0 full, -1 the group is full
# The group (an API key's sessions) is a plain set whose members count only while they hold a slot in `active`.
_LUA_ADMIT_GROUP = _LUA_COMMON + r"""
local sid, limit, ttl_ms, group_limit = ARGV[1], tonumber(ARGV[2]), tonumber(ARGV[3]), tonumber(ARGV[4])
local now_ms = now()
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', '(' .. now_ms)
for _, member in ipairs(redis.call('SMEMBERS', KEYS[2])) do
  if not redis.call('ZSCORE', KEYS[1], member) then redis.call('SREM', KEYS[2], member) end
end
if redis.call('ZSCORE', KEYS[1], sid) then
  redis.call('ZADD', KEYS[1], now_ms + ttl_ms, sid)
  redis.call('SADD', KEYS[2], sid)
  return 1
end
if redis.call('SCARD', KEYS[2]) >= group_limit then return -1 end
if redis.call('ZCARD', KEYS[1]) < limit then
  redis.call('ZADD', KEYS[1], now_ms + ttl_ms, sid)
  redis.call('SADD', KEYS[2], sid)
  return 1
end
return 0
"""

# KEYS: active   -> number of unexpired members
_LUA_COUNT = _LUA_COMMON + r"""
local now_ms = now()
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', '(' .. now_ms)
return redis.call('ZCARD', KEYS[1])
"""


class SessionStore:
    """Session records in Redis; safe to share between threads and between replicas (see the module docstring).

    Redis connection problems surface as ``redis.RedisError`` subclasses (``redis.ConnectionError``,
    ``redis.TimeoutError``); only :meth:`ping` swallows them.
    """

    def __init__(self, client: redis.Redis, prefix: str = "facecast", ttl_s: float = 600.0,
                 close_grace_s: float = 60.0):
        if not prefix:
            raise ValueError("prefix must be non-empty")
        if not ttl_s > 0:
            raise ValueError(f"ttl_s must be > 0, got {ttl_s!r}")
        if not close_grace_s > 0:
            raise ValueError(f"close_grace_s must be > 0, got {close_grace_s!r}")
        self.client = client
        self.prefix = prefix
        self.ttl_s = float(ttl_s)
        self.close_grace_s = float(close_grace_s)
        self._ttl_ms = max(1, int(round(self.ttl_s * 1000)))
        self._grace_ms = max(1, int(round(self.close_grace_s * 1000)))
        # Script objects run EVALSHA and reload on NOSCRIPT (e.g. after a Redis restart or SCRIPT FLUSH).
        self._create = client.register_script(_LUA_CREATE)
        self._update = client.register_script(_LUA_UPDATE)
        self._heartbeat = client.register_script(_LUA_HEARTBEAT)
        self._progress = client.register_script(_LUA_PROGRESS)
        self._admit = client.register_script(_LUA_ADMIT)
        self._count = client.register_script(_LUA_COUNT)
        self._admit_group = client.register_script(_LUA_ADMIT_GROUP)

    # keys ---------------------------------------------------------------------------------------------------------
    def key(self, session_id: str) -> str:
        return f"{self.prefix}:session:{session_id}"

    @property
    def active_key(self) -> str:
        return f"{self.prefix}:active"

    @staticmethod
    def _check_id(session_id: str) -> str:
        if not isinstance(session_id, str) or not session_id:
            raise ValueError(f"session_id must be a non-empty str, got {session_id!r}")
        return session_id

    def _args(self, session_id: str) -> list:
        return [session_id, self._ttl_ms, self._grace_ms]

    # records ------------------------------------------------------------------------------------------------------
    def create(self, record: SessionRecord) -> None:
        """Stores a new record (TTL ``ttl_s``; CREATED/STREAMING records join the active set).

        Raises ``ValueError`` if a live record with this id exists, or if the record is malformed.
        """
        sid = self._check_id(record.session_id)
        _check_token_hash(record.token_sha256)
        fields = _record_to_hash(record)
        flat: list[str] = []
        for k, v in fields.items():
            flat += [k, v]
        ok = self._create(keys=[self.key(sid), self.active_key],
                          args=self._args(sid) + [fields["state"]] + flat)
        if not int(ok):
            raise ValueError(f"session {sid!r} already exists")

    def get(self, session_id: str) -> SessionRecord:
        sid = self._check_id(session_id)
        raw = self.client.hgetall(self.key(sid))
        if not raw:
            raise SessionNotFound(sid)
        return _record_from_hash(sid, raw)

    def update(self, session_id: str, /, **changes: Any) -> SessionRecord:
        """Atomically sets the given fields, stamps ``updated_at`` (server time), refreshes the TTL; returns the
        record as stored after the write.  Counters are set as given (use :meth:`record_progress` for monotonic
        progress).  ``session_id`` and ``updated_at`` cannot be changed."""
        sid = self._check_id(session_id)
        flat: list[str] = []
        for name, value in changes.items():
            if name in ("session_id", "updated_at"):
                raise ValueError(f"{name} cannot be changed by update()")
            enc = _encode_field(name, value)  # ValueError for unknown fields / bad values
            if name == "token_sha256":
                _check_token_hash(enc)
            flat += [name, enc]
        res = self._update(keys=[self.key(sid), self.active_key], args=self._args(sid) + flat)
        if not res:
            raise SessionNotFound(sid)
        return _record_from_hash(sid, _pairs_to_dict(res))

    def heartbeat(self, session_id: str, replica_id: str) -> None:
        """The streaming replica is alive: sets ``heartbeat_at`` (server time) and ``attached_by``, refreshes TTL."""
        sid = self._check_id(session_id)
        if not isinstance(replica_id, str):
            raise ValueError(f"replica_id must be a str, got {replica_id!r}")
        if not int(self._heartbeat(keys=[self.key(sid), self.active_key], args=self._args(sid) + [replica_id])):
            raise SessionNotFound(sid)

    def record_progress(self, session_id: str, chunks_emitted: int, frames_emitted: int,
                        audio_samples_received: int) -> None:
        """Raises each counter to ``max(stored, given)`` (never decreases; late or reordered calls are harmless),
        stamps ``updated_at`` and refreshes the TTL, in one round trip."""
        sid = self._check_id(session_id)
        vals = [_encode_field(n, v) for n, v in
                zip(_PROGRESS_FIELDS, (chunks_emitted, frames_emitted, audio_samples_received))]
        if not int(self._progress(keys=[self.key(sid), self.active_key], args=self._args(sid) + vals)):
            raise SessionNotFound(sid)

    def close(self, session_id: str) -> SessionRecord:
        """Marks the session CLOSED, detaches it (``attached_by=""``), frees its admission slot, and keeps the record
        readable for ``close_grace_s`` (not extended by later writes); afterwards ``get`` raises SessionNotFound.
        Closing a CLOSED session returns it again without extending the grace period."""
        return self.update(session_id, state=SessionState.CLOSED, attached_by="")

    # admission ----------------------------------------------------------------------------------------------------
    def count_active(self) -> int:
        """Unexpired members of the active set: CREATED/STREAMING sessions plus admitted-but-not-created ids."""
        return int(self._count(keys=[self.active_key], args=[]))

    def try_admit(self, session_id: str, limit: int) -> bool:
        """Atomically takes an admission slot for ``session_id`` if fewer than ``limit`` are held; True if admitted
        (or already holding a slot, which is then refreshed), False when full."""
        sid = self._check_id(session_id)
        limit = int(limit)
        if limit <= 0:
            return False
        return bool(int(self._admit(keys=[self.active_key], args=[sid, limit, self._ttl_ms])))

    def try_admit_in_group(self, session_id: str, limit: int, group: str, group_limit: int) -> int:
        """As :meth:`try_admit`, also holding the group (e.g. an API key's name) to ``group_limit`` sessions at once,
        atomically: 1 admitted, 0 the cluster is full, -1 the group is full. A group member counts only while it
        holds its admission slot (released, closed or expired sessions drop out)."""
        sid = self._check_id(session_id)
        if int(limit) <= 0:
            return 0
        return int(self._admit_group(keys=[self.active_key, f"{self.active_key}:group:{group}"],
                                     args=[sid, int(limit), self._ttl_ms, int(group_limit)]))

    def admitted_ids(self) -> list[str]:
        """Every id holding an admission slot (an expired one included until the next admission prunes it)."""
        return sorted(self.client.zrange(self.active_key, 0, -1))

    def release(self, session_id: str) -> None:
        """Frees the admission slot (the record itself is untouched; later heartbeats do not re-take the slot)."""
        self.client.zrem(self.active_key, self._check_id(session_id))

    def ping(self) -> bool:
        try:
            return bool(self.client.ping())
        except (redis.RedisError, OSError):
            return False


def connect_store(redis_url: str | None = None, **kw: Any) -> tuple[SessionStore, LocalRedis | None]:
    """A SessionStore on ``redis_url``, else ``$REDIS_URL``, else a freshly started :class:`LocalRedis`.

    Returns ``(store, owner)``; ``owner`` is the LocalRedis to ``close()`` when done, or None when an external Redis
    is used.  ``kw`` goes to :class:`SessionStore` (prefix, ttl_s, close_grace_s).  The client decodes responses
    and uses 5 s connect/read timeouts unless the URL says otherwise; nothing is sent until the first call (use
    ``store.ping()`` to check reachability).
    """
    url = (redis_url or os.environ.get("REDIS_URL") or "").strip()
    owner: LocalRedis | None = None
    if not url:
        owner = LocalRedis()
        url = owner.url
    try:
        client = redis.Redis.from_url(url, decode_responses=True, socket_connect_timeout=5.0, socket_timeout=5.0)
        return SessionStore(client, **kw), owner
    except BaseException:
        if owner is not None:
            owner.close()
        raise
