"""The call page's LiveKit transport, over real HTTP (the page's FastAPI app under uvicorn), the real ingress and
workers, a realtime LLM peer, and a fake LiveKit room behind facecast's room interface: POST /call/room makes a
conversation session delivering to a new room, hands the browser a token for that room only (microphone only),
facecast's hidden listener hears the caller there, the avatar publishes its face and voice in the room, the turn
events reach the page through the call's status, and hanging up closes the session and leaves the room. A server
without LiveKit, and a LiveKit server that does not answer, are refused, naming why (and nothing is left open)."""

from __future__ import annotations

import asyncio
import json
import urllib.error
import urllib.request

import numpy as np
from livekit import api, rtc

from services.delivery.livekit_room import DeliveryError, RoomEar
from services.llm.realtime_peer import RealtimePeer
from services.net import free_port
from services.serving.call_page import build_call_app

from ..delivery.test_livekit_room import CONFIG, FakeConnector, RecordingVideoSource
from ..llm.test_realtime import speech_then_quiet
from .test_conversation import with_bridge
from .test_ingress import Cluster, livekit_cluster, redis_url, store  # noqa: F401 (fixtures)


class CallerEar(RoomEar):
    """The caller's microphone as the room would deliver it: a question, then quiet, in real time."""

    rate = 16000

    def __init__(self, pieces):
        self.script, self.closed = pieces, False

    async def pieces(self):
        for piece in self.script:
            if self.closed:
                return
            yield piece
            await asyncio.sleep(len(piece) / self.rate)
        while not self.closed:
            yield np.zeros(320, np.int16)
            await asyncio.sleep(0.02)

    async def close(self):
        self.closed = True


class CallConnector(FakeConnector):
    def __init__(self, answer: bool = True):
        super().__init__()
        self.answer, self.heard, self.ears = answer, [], []

    async def hear(self, url, token, timeout_s, speaker, rate=16000):
        if not self.answer:
            raise DeliveryError(f"the LiveKit server at {url} did not answer")
        self.heard.append((api.TokenVerifier("devkey", CONFIG.api_secret).verify(token), speaker))
        self.ears.append(CallerEar(speech_then_quiet(0.6, 0.5)))
        return self.ears[-1]


def request(url: str, body: dict | None = None) -> tuple[int, dict]:
    data = None if body is None else json.dumps(body).encode()
    wanted = urllib.request.Request(url, data=data, headers={"content-type": "application/json"})
    try:
        with urllib.request.urlopen(wanted, timeout=30) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as error:
        return error.code, json.loads(error.read())


async def serving(cluster, steps):
    import uvicorn

    port = free_port()
    server = uvicorn.Server(uvicorn.Config(build_call_app(cluster.ingress), host="127.0.0.1", port=port,
                                           log_level="warning"))
    task = asyncio.ensure_future(server.serve())
    while not server.started:
        await asyncio.sleep(0.05)
    try:
        return await steps(f"http://127.0.0.1:{port}")
    finally:
        server.should_exit = True
        await task


def test_a_browser_calls_through_a_livekit_room(store, monkeypatch):
    monkeypatch.setattr(rtc, "VideoSource", RecordingVideoSource)
    RecordingVideoSource.captured = []

    async def main():
        async with RealtimePeer(reply_s=1.0, speedup=4.0) as peer:
            connector = CallConnector()
            cluster = with_bridge(livekit_cluster(store, connector, realtime_url=peer.url,
                                                  realtime_api_key="test-key", livekit_public_url="wss://lk.example"))

            async def steps(base):
                config = (await asyncio.to_thread(request, f"{base}/call/config"))[1]
                status, answer = await asyncio.to_thread(request, f"{base}/call/room", {"mode": "realtime"})
                assert status == 200, answer
                for _ in range(150):
                    during = (await asyncio.to_thread(request, f"{base}/call/{answer['call_id']}"))[1]
                    if during["turn_latencies_ms"] or during["state"] == "failed":
                        break
                    await asyncio.sleep(0.1)
                status, ended = await asyncio.to_thread(request, f"{base}/call/hangup", {
                    "session_id": answer["session_id"], "session_token": answer["session_token"]})
                after = (await asyncio.to_thread(request, f"{base}/call/{answer['call_id']}"))[1]
                return config, answer, during, (status, ended), after

            return (*await serving(cluster, steps), connector, cluster.held())

    config, answer, during, hung_up, after, connector, held = asyncio.run(main())
    assert config["livekit"] is True
    assert answer["url"] == "wss://lk.example", "the browser gets the public URL"
    caller = api.TokenVerifier("devkey", CONFIG.api_secret).verify(answer["token"])
    assert caller.identity == answer["identity"] and caller.video.room == answer["room"]
    assert caller.video.can_subscribe and caller.video.can_publish_sources == ["microphone"]
    assert not (caller.video.room_admin or caller.video.room_create or caller.video.can_publish_data)
    ((listener, speaker),) = connector.heard
    assert speaker == answer["identity"] and listener.video.room == answer["room"]
    assert listener.video.hidden and listener.video.can_subscribe and not listener.video.can_publish
    assert during["state"] == "connected", during
    assert [e["type"] for e in during["events"]][:1] == ["CONNECTED"] and len(during["turn_latencies_ms"]) == 1
    assert {"USER_SPEECH_STARTED", "USER_SPEECH_ENDED", "REPLY_STARTED"} <= {e["type"] for e in during["events"]}
    (avatar_room,) = connector.rooms                 # the avatar joined as its own participant and published
    claims = api.TokenVerifier("devkey", CONFIG.api_secret).verify(avatar_room.token)
    assert claims.identity == answer["avatar_identity"] and claims.video.room == answer["room"]
    assert len(avatar_room.published) == 2 and len(RecordingVideoSource.captured) > 12
    assert hung_up == (200, {"ended": True})
    assert after["state"] == "ended" and after["session_state"] in ("CLOSED", "gone")
    assert connector.ears[0].closed and avatar_room.left
    assert not any(held.values()), held


def test_a_room_call_is_refused_without_livekit_or_when_its_server_does_not_answer(store):
    async def main():
        plain = Cluster(store)
        without = await serving(plain, lambda base: asyncio.to_thread(request, f"{base}/call/room", {}))
        connector = CallConnector(answer=False)
        silent = livekit_cluster(store, connector)
        dead = await serving(silent, lambda base: asyncio.to_thread(request, f"{base}/call/room", {}))
        return without, dead, silent.held()

    (code, body), (dead_code, dead_body), held = asyncio.run(main())
    assert code == 409 and "this server has no LiveKit configured" in body["error"]
    assert dead_code == 503 and "the LiveKit server at ws://livekit.test:7880 did not answer" in dead_body["error"]
    assert not any(held.values()), "the session made for the call was closed"


def test_the_docker_image_ships_the_same_livekit_client_as_make():
    from pathlib import Path

    makefile, dockerfile = Path("Makefile").read_text(), Path("k8s/Dockerfile").read_text()
    (version,) = [line.split(":=")[1].strip() for line in makefile.splitlines()
                  if line.startswith("LIVEKIT_CLIENT_VERSION")]
    assert f"livekit-client@{version}" in dockerfile and f"livekit-client-{version}.tgz" in dockerfile
    assert "services/serving/web/vendor/livekit-client.umd.js" in dockerfile
