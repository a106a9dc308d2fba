"""`SessionAffinityRouter` on its own: where it sends a session's calls as replicas come, report and die. (On a real
cluster with two score and two VAE replicas: tests/services/serving/test_layouts.py.)"""

from __future__ import annotations

import asyncio
import types
from collections import Counter

import pytest
from ray.serve._private.common import DeploymentHandleSource, DeploymentID, ReplicaID

from services.serving.affinity import SessionAffinityRouter, for_session, on_every_replica

DEPLOYMENT = DeploymentID(name="ScoreWorkerGroup", app_name="facecast")


def replica(name: str, sessions=()) -> types.SimpleNamespace:
    """What the router reads of a running replica: its id and its last routing-stats report."""
    return types.SimpleNamespace(replica_id=ReplicaID(unique_id=name, deployment_id=DEPLOYMENT),
                                 routing_stats={"replica": name, "sessions": sorted(sessions)})


def request(session_id: str = "", method: str = "generate") -> types.SimpleNamespace:
    return types.SimpleNamespace(metadata=types.SimpleNamespace(multiplexed_model_id=session_id, call_method=method),
                                 routing_context=types.SimpleNamespace(should_backoff=False))


def new_router() -> SessionAffinityRouter:
    router = SessionAffinityRouter(deployment_id=DEPLOYMENT, handle_source=DeploymentHandleSource.UNKNOWN)
    router.initialize_state()
    return router


def route(router, replicas, session_id: str) -> str:
    ranks = asyncio.run(router.choose_replicas(replicas, request(session_id)))
    assert len(ranks) == 1 and len(ranks[0]) == 1, "a session's call has exactly one place to go"
    return ranks[0][0].replica_id.unique_id


def test_new_sessions_spread_evenly_and_every_later_call_stays_on_its_replica():
    router, replicas = new_router(), [replica("a"), replica("b"), replica("c")]
    homes = {f"s{i}": route(router, replicas, f"s{i}") for i in range(30)}
    assert Counter(homes.values()) == {"a": 10, "b": 10, "c": 10}
    for _ in range(3):
        assert {session: route(router, replicas, session) for session in homes} == homes


def test_a_replica_that_joins_later_takes_new_sessions_but_none_of_the_live_ones():
    router = new_router()
    two = [replica("a"), replica("b")]
    homes = {f"s{i}": route(router, two, f"s{i}") for i in range(10)}
    three = [replica("a", [s for s, r in homes.items() if r == "a"]),
             replica("b", [s for s, r in homes.items() if r == "b"]), replica("c")]
    assert {session: route(router, three, session) for session in homes} == homes
    assert [route(router, three, f"new{i}") for i in range(5)] == ["c"] * 5    # the emptiest one fills first
    unreported = [replica("a"), replica("b"), replica("c"), replica("d")]    # before any report: what it sent
    assert {session: route(router, unreported, session) for session in homes} == homes


def test_when_a_replica_dies_only_its_sessions_move_and_they_spread_over_the_survivors():
    router = new_router()
    replicas = [replica("a"), replica("b"), replica("c")]
    homes = {f"s{i}": route(router, replicas, f"s{i}") for i in range(30)}
    survivors = [replica(name, [s for s, r in homes.items() if r == name]) for name in ("b", "c")]
    after = {session: route(router, survivors, session) for session in homes}
    assert {s: r for s, r in after.items() if homes[s] != "a"} == {s: r for s, r in homes.items() if r != "a"}
    assert Counter(r for s, r in after.items() if homes[s] == "a") == {"b": 5, "c": 5}
    assert after == {session: route(router, survivors, session) for session in homes}, "and stay there"


def test_a_fresh_router_finds_each_session_where_its_replica_reports_it():
    """A new ingress replica (its router remembers nothing) routes to the replica holding the session, even where
    a fresh placement would have chosen another."""
    router = new_router()
    replicas = [replica("a", ["s1", "s2", "s3"]), replica("b", ["s4"])]
    assert [route(router, replicas, s) for s in ("s1", "s2", "s3", "s4")] == ["a", "a", "a", "b"]
    assert route(router, replicas, "s5") == "b"


def test_fresh_routers_with_the_same_reports_place_a_new_session_alike():
    replicas = [replica("a", ["x"]), replica("b", ["y"]), replica("c", ["z"])]
    for session in (f"n{i}" for i in range(20)):
        assert len({route(new_router(), replicas, session) for _ in range(3)}) == 1


def test_calls_without_a_session_may_go_to_any_replica_and_a_busy_home_is_waited_for():
    router, replicas = new_router(), [replica("a"), replica("b")]
    assert asyncio.run(router.choose_replicas(replicas, request(""))) == [replicas]
    keyed = request("s1")
    asyncio.run(router.choose_replicas(replicas, keyed))
    assert keyed.routing_context.should_backoff, "without it Serve retries a full replica in a busy loop"


def test_in_process_stand_ins_are_called_directly():
    calls = []

    class Method:
        def __init__(self, name):
            self.name = name

        async def remote(self, *args):
            calls.append((self.name, args))
            return len(calls)

    class StandIn:
        close = Method("close")

    stand_in = StandIn()
    assert for_session(stand_in, "s1") is stand_in
    assert asyncio.run(on_every_replica(stand_in, "close", "s1")) == [1]
    assert calls == [("close", ("s1",))]


@pytest.mark.parametrize("name", ["AudioEncoder", "ScoreWorkerGroup", "VAEDecoder"])
def test_every_deployment_holding_sessions_routes_with_the_affinity_router(name):
    from services.serving.app import AudioEncoder, ScoreWorkerGroup, VAEDecoder

    deployment = {"AudioEncoder": AudioEncoder, "ScoreWorkerGroup": ScoreWorkerGroup, "VAEDecoder": VAEDecoder}[name]
    config = deployment._deployment_config.request_router_config
    assert config.request_router_class.endswith("SessionAffinityRouter")
    assert callable(getattr(deployment.func_or_class, "record_routing_stats", None))


class FakeReplica(types.SimpleNamespace):
    """A running replica as Serve's routing loop sees it: id, report, capacity, and a queue length when probed
    (`full_probes`: how many probes first find it full)."""

    async def get_queue_len(self, *, deadline_s: float) -> int:
        self.full_probes -= 1
        return self.max_ongoing_requests if self.full_probes >= 0 else 0


def test_concurrent_calls_of_one_request_are_each_routed_to_their_own_sessions_replica():
    """Every call an ingress makes while serving one request (a stream's chunks in flight together, or a
    session's open on the decoder right after its reference encode) shares Serve's internal request id. Each must
    be routed, and to its own session's replica: Serve's default matching left the second waiting forever."""
    from ray.serve._private.common import RequestMetadata
    from ray.serve.request_router import PendingRequest

    async def scenario():
        router = SessionAffinityRouter(deployment_id=DEPLOYMENT, handle_source=DeploymentHandleSource.UNKNOWN)
        router.initialize_state()
        replicas = [FakeReplica(replica_id=ReplicaID(unique_id=name, deployment_id=DEPLOYMENT), max_ongoing_requests=64,
                                routing_stats={"replica": name, "sessions": [session]}, node_id="n",
                                availability_zone=None, full_probes=busy)
                    for name, session, busy in (("a", "s1", 0), ("b", "s2", 2))]   # b: busy for a moment
        router.update_replicas(replicas)
        await asyncio.sleep(0.05)    # the probes of the new replicas
        requests = [PendingRequest(args=[], kwargs={}, metadata=RequestMetadata(
            request_id="r", internal_request_id="same", call_method=method, multiplexed_model_id=session))
            for method, session in (("encode_reference", "s2"), ("open_decode", "s2"), ("generate", "s1"))]
        chosen = await asyncio.wait_for(asyncio.gather(*(router._choose_replica_for_request(pending)
                                                         for pending in requests)), 10)
        more = [PendingRequest(args=[bytes(1000)], kwargs={}, metadata=RequestMetadata(
            request_id="r", internal_request_id=f"r{i}", call_method="push", multiplexed_model_id="s1"))
            for i in range(20)]
        await asyncio.wait_for(asyncio.gather(*(router._choose_replica_for_request(pending) for pending in more)), 10)
        held = dict(router._pending_requests_by_model_id), dict(router._pending_requests_by_id)
        return [replica.replica_id.unique_id for replica in chosen], held

    chosen, (by_session, by_id) = asyncio.run(scenario())
    assert chosen == ["b", "b", "a"], "s2 waits for its busy replica; s1 is not handed it either"
    assert by_session == {} and by_id == {}, "a routed call (and its arguments) stays referenced by the router"
