"""services.store.sessions (records, SessionStore, connect_store) against a real redis-server started by LocalRedis
(the `local_redis` fixture in conftest.py)."""

from __future__ import annotations

import threading
import time
import uuid

import pytest

import redis  # noqa: E402

from redis.backoff import NoBackoff  # noqa: E402
from redis.retry import Retry  # noqa: E402

from services.net import free_port  # noqa: E402
from services.store import sessions as session_store  # noqa: E402
from services.store.redis_server import LocalRedis  # noqa: E402
from services.store.sessions import (  # noqa: E402
    SessionNotFound,
    SessionRecord,
    SessionState,
    SessionStore,
    connect_store,
    hash_token,
)
from tests.services.store.helpers import refuses  # noqa: E402

pytestmark = pytest.mark.integration


@pytest.fixture
def client(local_redis):
    c = local_redis.client()
    yield c
    c.close()


@pytest.fixture
def prefix():
    return f"t{uuid.uuid4().hex[:12]}"  # each test gets its own key space on the shared server


@pytest.fixture
def store(client, prefix):
    return SessionStore(client, prefix=prefix)


def make_record(session_id: str = "s1", **overrides) -> SessionRecord:
    rec = SessionRecord.new(
        session_id,
        token="secret-token",
        owner="alice",
        options={"fps": 25, "width": 512, "height": 512, "steps": 4, "chunk_latent_frames": 3, "seed": 7},
        characters=[[0, 0, 256, 512], [256, 0, 512, 512]],
        prompt="a friendly presenter",
        sample_rate_hz=16000,
    )
    for k, v in overrides.items():
        setattr(rec, k, v)
    return rec


# ---------------------------------------------------------------------------------------------------- records


def test_create_get_round_trip(store, client):
    rec = make_record()
    store.create(rec)
    got = store.get("s1")
    assert got == rec
    assert got.state is SessionState.CREATED
    assert got.token_sha256 == hash_token("secret-token") and "secret-token" not in str(client.hgetall(store.key("s1")))
    assert 0 < client.pttl(store.key("s1")) <= 600_000
    assert store.count_active() == 1
    assert SessionRecord.from_json(got.to_json()) == got


def test_duplicate_create_raises(store):
    store.create(make_record())
    with pytest.raises(ValueError, match="already exists"):
        store.create(make_record(owner="mallory"))
    assert store.get("s1").owner == "alice"


def test_unknown_id_raises_session_not_found(store):
    with pytest.raises(SessionNotFound):
        store.get("nope")
    with pytest.raises(KeyError):  # SessionNotFound is a KeyError
        store.update("nope", prompt="x")
    for call in (lambda: store.heartbeat("nope", "r1"), lambda: store.record_progress("nope", 1, 1, 1),
                 lambda: store.close("nope")):
        with pytest.raises(SessionNotFound):
            call()
    # none of the failed writes created a partial record
    assert store.client.exists(store.key("nope")) == 0


def test_ttl_expiry(client, prefix):
    st = SessionStore(client, prefix=prefix, ttl_s=1)
    st.create(make_record("short"))
    assert st.count_active() == 1
    time.sleep(1.2)
    with pytest.raises(SessionNotFound):
        st.get("short")
    assert st.count_active() == 0


def test_writes_refresh_ttl(client, prefix):
    st = SessionStore(client, prefix=prefix, ttl_s=1)
    st.create(make_record())
    for _ in range(3):  # 1.5 s in total, longer than the TTL, kept alive by writes
        time.sleep(0.5)
        st.heartbeat("s1", "replica-a")
    assert st.get("s1").attached_by == "replica-a"
    assert st.count_active() == 1


def test_update_sets_fields_and_refreshes_updated_at(store):
    rec = make_record()
    store.create(rec)
    out = store.update("s1", state=SessionState.STREAMING, prompt="new prompt", options={"fps": 30})
    assert out == store.get("s1")
    assert out.state is SessionState.STREAMING and out.prompt == "new prompt" and out.options == {"fps": 30}
    assert out.owner == "alice" and out.characters == rec.characters
    assert out.updated_at >= rec.updated_at and abs(out.updated_at - time.time()) < 5


def test_update_rejects_bad_input(store):
    store.create(make_record())
    with pytest.raises(ValueError):
        store.update("s1", no_such_field=1)
    with pytest.raises(ValueError):
        store.update("s1", session_id="other")
    with pytest.raises(ValueError):
        store.update("s1", state="DANCING")
    with pytest.raises(ValueError):
        store.update("s1", token_sha256="raw-token")
    with pytest.raises(ValueError):
        store.create(make_record("s2", token_sha256="raw-token"))
    got = store.get("s1")
    assert got.state is SessionState.CREATED and got.token_sha256 == hash_token("secret-token")


def test_record_progress_is_monotonic(store):
    store.create(make_record())
    store.record_progress("s1", 5, 40, 64000)
    store.record_progress("s1", 3, 50, 1000)  # a late, reordered call must not move anything backwards
    got = store.get("s1")
    assert (got.chunks_emitted, got.frames_emitted, got.audio_samples_received) == (5, 50, 64000)
    store.record_progress("s1", 10**15, 10**15 + 1, 2**53)  # large counters survive Lua untouched
    got = store.get("s1")
    assert (got.chunks_emitted, got.frames_emitted, got.audio_samples_received) == (10**15, 10**15 + 1, 2**53)
    with pytest.raises(ValueError):
        store.record_progress("s1", -1, 0, 0)


def test_concurrent_updates_are_atomic(store):
    """8 threads x 50 calls: 4 threads push progress counters, 4 threads each update their own field."""
    rec = make_record()
    store.create(rec)
    n_calls = 50
    start = threading.Barrier(8)
    errors: list[BaseException] = []

    def progress_worker(t: int) -> None:
        for k in range(n_calls):
            v = k * 4 + t  # interleaved across threads; global max is (n_calls - 1) * 4 + 3
            store.record_progress("s1", v, 10 * v, 100 * v)

    field_updates = {
        4: lambda k: {"prompt": f"prompt-{k:03d}"},
        5: lambda k: {"sample_rate_hz": 16000 + k},
        6: lambda k: {"options": {"fps": 25, "seq": k}},
        7: lambda k: {"owner": f"owner-{k:03d}", "state": SessionState.STREAMING},
    }

    def update_worker(t: int) -> None:
        for k in range(n_calls):
            store.update("s1", **field_updates[t](k))
            if t == 7:
                store.heartbeat("s1", f"replica-{k:03d}")

    def run(t: int) -> None:
        try:
            start.wait()
            (progress_worker if t < 4 else update_worker)(t)
        except BaseException as e:  # pragma: no cover - reported below
            errors.append(e)

    threads = [threading.Thread(target=run, args=(t,)) for t in range(8)]
    for th in threads:
        th.start()
    for th in threads:
        th.join(timeout=30)
    assert not errors, errors

    vmax = (n_calls - 1) * 4 + 3
    got = store.get("s1")
    last = n_calls - 1
    assert (got.chunks_emitted, got.frames_emitted, got.audio_samples_received) == (vmax, 10 * vmax, 100 * vmax)
    assert got.prompt == f"prompt-{last:03d}"
    assert got.sample_rate_hz == 16000 + last
    assert got.options == {"fps": 25, "seq": last}
    assert got.owner == f"owner-{last:03d}" and got.state is SessionState.STREAMING
    assert got.attached_by == f"replica-{last:03d}"
    # untouched fields are intact
    assert got.token_sha256 == rec.token_sha256 and got.characters == rec.characters
    assert got.created_at == rec.created_at


# ---------------------------------------------------------------------------------------------------- lifecycle


def test_close_keeps_record_for_grace_period(store, client):
    store.create(make_record())
    store.update("s1", state=SessionState.STREAMING)
    store.heartbeat("s1", "replica-a")
    assert store.count_active() == 1
    closed = store.close("s1")
    assert closed.state is SessionState.CLOSED and closed.attached_by == ""
    assert store.get("s1").state is SessionState.CLOSED  # a late re-attach learns it was closed
    assert store.count_active() == 0
    assert 55_000 < client.pttl(store.key("s1")) <= 60_000
    client.pexpire(store.key("s1"), 30_000)
    store.heartbeat("s1", "zombie-replica")  # late writes do not extend the grace period
    store.record_progress("s1", 1, 1, 1)
    assert store.close("s1").state is SessionState.CLOSED
    assert client.pttl(store.key("s1")) <= 30_000
    assert store.count_active() == 0


def test_closed_record_expires_after_grace(client, prefix):
    st = SessionStore(client, prefix=prefix, ttl_s=5, close_grace_s=0.3)
    st.create(make_record())
    st.close("s1")
    time.sleep(0.45)
    with pytest.raises(SessionNotFound):
        st.get("s1")


def test_ended_and_failed_leave_active_set(store):
    store.create(make_record("a"))
    store.create(make_record("b"))
    assert store.count_active() == 2
    store.update("a", state=SessionState.ENDED)
    store.update("b", state=SessionState.FAILED)
    assert store.count_active() == 0
    assert store.get("a").state is SessionState.ENDED and store.get("b").state is SessionState.FAILED


# ---------------------------------------------------------------------------------------------------- admission


def test_try_admit_enforces_limit_under_concurrency(store):
    results: dict[int, bool] = {}
    start = threading.Barrier(10)

    def run(i: int) -> None:
        start.wait()
        results[i] = store.try_admit(f"sess-{i}", 3)

    threads = [threading.Thread(target=run, args=(i,)) for i in range(10)]
    for th in threads:
        th.start()
    for th in threads:
        th.join(timeout=30)
    admitted = [i for i, ok in results.items() if ok]
    assert len(results) == 10 and len(admitted) == 3
    assert store.count_active() == 3

    assert store.try_admit(f"sess-{admitted[0]}", 3)  # already holding a slot: still admitted, no extra slot
    assert store.count_active() == 3
    rejected = next(i for i, ok in results.items() if not ok)
    assert not store.try_admit(f"sess-{rejected}", 3)

    store.release(f"sess-{admitted[0]}")
    assert store.count_active() == 2
    assert store.try_admit(f"sess-{rejected}", 3)
    assert not store.try_admit("one-too-many", 3)
    assert not store.try_admit("zero", 0)


def test_admission_then_create_and_close_frees_slot(store):
    assert store.try_admit("s1", 1)
    store.create(make_record("s1"))  # uses the slot it reserved
    assert store.count_active() == 1
    assert not store.try_admit("s2", 1)
    store.close("s1")
    assert store.try_admit("s2", 1)


def test_a_group_holds_its_own_limit_inside_the_clusters_and_frees_with_the_slot(store):
    """An API key's sessions: at most group_limit at once, within the cluster's limit; a closed or released member
    stops counting for its group with no extra bookkeeping."""
    assert store.try_admit_in_group("a1", 3, "ops", 1) == 1
    assert store.try_admit_in_group("a1", 3, "ops", 1) == 1      # already admitted: refreshed, not refused
    assert store.try_admit_in_group("a2", 3, "ops", 1) == -1     # the key is full
    assert store.try_admit_in_group("b1", 3, "agent", 5) == 1
    assert store.try_admit_in_group("b2", 3, "agent", 5) == 1
    assert store.try_admit_in_group("b3", 3, "agent", 5) == 0    # the cluster is full
    assert store.admitted_ids() == ["a1", "b1", "b2"]
    store.create(make_record("a1"))
    store.close("a1")                                            # leaves the active set: its group forgets it
    assert store.try_admit_in_group("a2", 3, "ops", 1) == 1
    store.release("b1")
    assert store.try_admit_in_group("b3", 3, "agent", 2) == 1
    assert store.try_admit_in_group("b4", 9, "agent", 2) == -1


def test_released_session_is_not_readmitted_by_heartbeat(store):
    store.create(make_record())
    store.release("s1")
    store.heartbeat("s1", "replica-a")
    store.record_progress("s1", 1, 2, 3)
    assert store.count_active() == 0
    assert store.get("s1").attached_by == "replica-a"


def test_expired_reservations_free_slots(client, prefix):
    st = SessionStore(client, prefix=prefix, ttl_s=0.3)
    assert st.try_admit("a", 1)
    assert not st.try_admit("b", 1)
    time.sleep(0.4)
    assert st.try_admit("b", 1)


# ---------------------------------------------------------------------------------------------------- replicas


def test_second_store_on_new_client_sees_same_records(local_redis, store, prefix):
    store.create(make_record())
    store.update("s1", state=SessionState.STREAMING)
    store.record_progress("s1", 2, 16, 32000)

    other_client = redis.Redis.from_url(local_redis.url, decode_responses=True)
    try:
        restarted = SessionStore(other_client, prefix=prefix)  # a restarted ingress replica
        assert restarted.get("s1") == store.get("s1")
        assert restarted.count_active() == 1
        restarted.heartbeat("s1", "replica-b")
        restarted.record_progress("s1", 3, 24, 48000)
        got = store.get("s1")
        assert got.attached_by == "replica-b" and got.chunks_emitted == 3
    finally:
        other_client.close()


def test_scripts_survive_script_flush(store, client):
    """A restarted Redis has no cached scripts; the store must reload them transparently."""
    store.create(make_record())
    client.script_flush()
    store.record_progress("s1", 1, 8, 16000)
    assert store.update("s1", prompt="after flush").prompt == "after flush"
    assert store.try_admit("x", 10)
    assert store.count_active() == 2


def test_ping(store):
    assert store.ping() is True
    dead_client = redis.Redis(host="127.0.0.1", port=free_port(), socket_connect_timeout=0.5,
                              retry=Retry(NoBackoff(), 0))
    dead = SessionStore(dead_client)
    assert dead.ping() is False


# ---------------------------------------------------------------------------------------------------- connect_store


def test_connect_store_honours_redis_url(monkeypatch, local_redis, store, prefix):
    store.create(make_record())

    def no_local_redis(*a, **kw):
        raise AssertionError("connect_store started a second redis-server although REDIS_URL is set")

    monkeypatch.setenv("REDIS_URL", local_redis.url)
    monkeypatch.setattr(session_store, "LocalRedis", no_local_redis)
    st, owner = connect_store(prefix=prefix)
    try:
        assert owner is None
        assert st.ping()
        assert st.get("s1") == store.get("s1")
    finally:
        st.client.close()

    st, owner = connect_store(local_redis.url, prefix=prefix, ttl_s=30)  # explicit url wins too
    assert owner is None and st.ttl_s == 30 and st.get("s1").owner == "alice"
    st.client.close()


def test_connect_store_starts_local_redis_without_url(monkeypatch):
    monkeypatch.delenv("REDIS_URL", raising=False)
    st, owner = connect_store()
    try:
        assert isinstance(owner, LocalRedis) and owner.running
        assert st.ping()
        assert st.client.connection_pool.connection_kwargs["port"] == owner.port
    finally:
        st.client.close()
        if owner is not None:
            owner.close()
    assert refuses(owner.port)
