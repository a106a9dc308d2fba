"""Session affinity: every call about a session reaches the one replica that holds it, through Serve's own routing.

The stateful deployments (AudioEncoder, ScoreWorkerGroup, VAEDecoder) keep per-session state (audio front-end, KV
caches, decode cache) in the replica that opened the session, so with several replicas every call about a session
must reach that replica.  Serve routes each call with a `RequestRouter` in the caller's process; this module is
facecast's (`SessionAffinityRouter`, set on those deployments with `AFFINITY_ROUTER`), keyed on the session id the
caller puts in the request's `multiplexed_model_id` (`for_session`).  Where the router sends a session:

1. the replica this router sent it to before, while that replica is running (sticky: a replica added later does not
   pull sessions off the live ones);
2. else the replica that reports holding it (each replica reports its session ids to the Serve controller in
   `record_routing_stats`, and the controller passes them to every router): a new or restarted ingress replica
   finds the sessions where they are;
3. else (a new session, or one whose replica died) the running replica holding the fewest sessions, ties broken by
   rendezvous hashing (highest hash of session id and replica id): the dead replica's sessions spread over the
   survivors, which restore them from their snapshots (`services.serving.resume`).

Calls that are not about one session (health, stats) go to any replica; calls that must reach every replica
(which sessions are held, freeing a session everywhere) use `on_every_replica` (Serve's `broadcast`).
"""

from __future__ import annotations

import asyncio
import hashlib
import os
import time
from collections import OrderedDict

from ray import serve
from ray.serve.config import RequestRouterConfig
from ray.serve.handle import DeploymentHandle
from ray.serve.request_router import PendingRequest, ReplicaID, RequestRouter, RunningReplica

ROUTING_STATS_PERIOD_S = 2.0
"""How often each replica reports the sessions it holds (what a fresh router learns homes from)."""
MAX_REMEMBERED = 65_536
"""Sessions a router remembers the replica of (least recently used forgotten first; then step 2 finds them)."""


def rendezvous_score(session_id: str, replica_id: str) -> int:
    """Highest-random-weight hash of (session, replica): each session's preference order over replicas, the same
    in every process, and removing a replica moves only the sessions it held."""
    digest = hashlib.blake2b(f"{session_id}\0{replica_id}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big")


class ReportsSessions:
    """Mixed into each deployment that holds sessions (it has `session_ids()`): Serve polls `record_routing_stats`
    every `ROUTING_STATS_PERIOD_S` and passes the report to every router."""

    def record_routing_stats(self) -> dict:
        """This replica's id and the sessions it holds."""
        try:
            replica = serve.get_replica_context().replica_id.unique_id
        except Exception:       # outside a Serve replica (in-process tests)
            replica = f"pid-{os.getpid()}"
        return {"replica": replica, "sessions": sorted(self.session_ids())}


def held_sessions(replica: RunningReplica) -> frozenset[str]:
    """The session ids `replica` last reported holding (empty before its first report)."""
    stats = replica.routing_stats or {}
    return frozenset(stats.get("sessions", ()))


def choose_home(session_id: str, replicas: list[RunningReplica], unreported: dict[ReplicaID, int]) -> RunningReplica:
    """Step 3 of the module docstring: the fewest sessions (those a replica reports, plus those this router placed
    there since its last report), ties by rendezvous hash."""
    def load(replica: RunningReplica) -> int:
        return len(held_sessions(replica)) + unreported.get(replica.replica_id, 0)

    return min(replicas, key=lambda replica: (load(replica),
                                              -rendezvous_score(session_id, replica.replica_id.unique_id)))


class SessionAffinityRouter(RequestRouter):
    """Routes a call keyed with a session id (`multiplexed_model_id`) to the replica holding that session (see the
    module docstring); unkeyed calls go to the least busy replica, as Serve's default does."""

    def initialize_state(self, **kwargs) -> None:
        self.homes: OrderedDict[str, ReplicaID] = OrderedDict()
        self.placed: dict[str, tuple[ReplicaID, float]] = {}   # new placements, until the replicas report them

    def _unreported(self, replicas: list[RunningReplica]) -> dict[ReplicaID, int]:
        """Per replica, the sessions this router placed there that its report does not list yet."""
        horizon = time.monotonic() - 3 * ROUTING_STATS_PERIOD_S
        counts: dict[ReplicaID, int] = {}
        held = {replica.replica_id: held_sessions(replica) for replica in replicas}
        for session_id, (replica_id, at) in list(self.placed.items()):
            if at < horizon or session_id in held.get(replica_id, ()):
                del self.placed[session_id]
            else:
                counts[replica_id] = counts.get(replica_id, 0) + 1
        return counts

    async def choose_replicas(self, candidate_replicas: list[RunningReplica],
                              pending_request: PendingRequest | None = None) -> list[list[RunningReplica]]:
        session_id = ""
        if pending_request is not None:
            pending_request.routing_context.should_backoff = True   # this is the whole choice: if it is busy, wait
            session_id = pending_request.metadata.multiplexed_model_id
        if not session_id or not candidate_replicas:
            return [candidate_replicas]
        by_id = {replica.replica_id: replica for replica in candidate_replicas}
        home = self.homes.get(session_id)
        if home not in by_id:
            holders = [replica for replica in candidate_replicas if session_id in held_sessions(replica)]
            if holders:
                home = max(holders, key=lambda r: rendezvous_score(session_id, r.replica_id.unique_id)).replica_id
            else:
                home = choose_home(session_id, candidate_replicas, self._unreported(candidate_replicas)).replica_id
                self.placed[session_id] = (home, time.monotonic())
            self.homes[session_id] = home
            while len(self.homes) > MAX_REMEMBERED:
                self.homes.popitem(last=False)
        self.homes.move_to_end(session_id)
        return [[by_id[home]]]     # only the home: a session never runs on two replicas because one was busy

    def _fulfill_next_pending_request(self, replica: RunningReplica, request_metadata=None) -> None:
        """Hand `replica` to the very request it was chosen for. (Serve's default finds that request by its internal
        request id, which every call made while serving one request shares — a stream's chunk calls are in flight
        together — so the second such call was never found and waited forever; its FIFO variant would hand the
        replica to whichever request came first, i.e. another session's.) Ray 2.60's private hook, pinned."""
        for pending in self._pending_requests_to_fulfill:
            if pending.metadata is request_metadata and not pending.future.done():
                self._cancel_routing_task_for_pending_request(pending)
                self._record_queue_wait_time(pending)
                pending.future.set_result(replica)
                self._remove_pending_request_from_indices(pending)
                return

    def _remove_pending_request_from_indices(self, pending_request: PendingRequest) -> None:
        """Also drop it from the per-model-id index, which Serve cleans only in its multiplex mixin (not used here):
        otherwise every keyed call stays referenced there with its arguments (PCM, the features' and scored chunks'
        object refs, which pin the objects in their owners) for as long as the process lives."""
        super()._remove_pending_request_from_indices(pending_request)
        model_id = pending_request.metadata.multiplexed_model_id
        waiting = self._pending_requests_by_model_id.get(model_id)
        if waiting is None:
            return
        for pending in [pending for pending in waiting if pending is pending_request or pending.future.done()]:
            waiting.remove(pending)
        if not waiting:
            del self._pending_requests_by_model_id[model_id]


AFFINITY_ROUTER = RequestRouterConfig(request_router_class=SessionAffinityRouter,
                                      request_routing_stats_period_s=ROUTING_STATS_PERIOD_S)
"""The `request_router_config` of every deployment that holds per-session state (`record_routing_stats` reports
its sessions)."""


def for_session(handle, session_id: str):
    """`handle` with its calls routed to the replica holding `session_id` (a Serve handle; an in-process stand-in,
    as unit tests use, is returned as it is)."""
    if not isinstance(handle, DeploymentHandle):
        return handle
    return handle.options(multiplexed_model_id=session_id)


async def on_every_replica(handle, method: str, *args) -> list:
    """`method(*args)` on every running replica of the deployment: each replica's result, or the exception it
    raised (an in-process stand-in: its one result)."""
    if isinstance(handle, DeploymentHandle):
        return await handle.broadcast(method, *args).results_async(return_exceptions=True)
    results = await asyncio.gather(getattr(handle, method).remote(*args), return_exceptions=True)
    return list(results)
