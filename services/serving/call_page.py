"""The browser call: the page `facecast serve` serves over HTTP, and the calls it makes — served by the ingress.

    GET  /                      the call page (services/serving/web/call.html)
    GET  /call/config           the conversation modes this server offers, the bundled faces, whether a key is needed
    GET  /call/faces/NAME       a bundled face
    POST /call/offer            {sdp, type, mode, face | image (base64)} ─► a conversation session (CreateSession, as
                                any API client) + an aiortc peer (`services.delivery.webrtc`) ─► {sdp, type, call_id,
                                session_id, session_token}
    POST /call/room             {mode, face | image} (the server has LiveKit) ─► a conversation session delivering to
                                a new LiveKit room + facecast's hidden listener there (`RoomCall`) ─► {url, token,
                                room, identity, avatar_identity, call_id, session_id, session_token}: the page
                                joins with livekit-client (GET /call/livekit-client.js) and publishes its microphone
    POST /call/hangup           {session_id, session_token} ─► the call stops and its session is closed (any replica)
    GET  /call/CALL_ID          the call's state, events, turn latencies (and the sender's A/V offsets, WebRTC)

    mic ─► SessionInput.audio (100 ms messages) ─► StreamSession (the ingress's own, in process) ─► ConversationCall
    video_chunk ─► JPEGs decoded ─► AvatarMedia (video + voice tracks);  events ─► the page's "events" data channel

The page calls with the same API key header as gRPC clients (x-api-key) when the server has keys.  The call holds
only what the browser needs; the session lives in Redis and the workers like every other.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import io
import logging
import time
import uuid
from pathlib import Path

import grpc
import numpy as np
from fastapi import Request      # at module level: FastAPI resolves the handlers' annotations from here

from services.api import pb

logger = logging.getLogger("facecast.call")

PAGE = Path(__file__).parent / "web" / "call.html"
LIVEKIT_CLIENT = Path(__file__).parent / "web" / "vendor" / "livekit-client.umd.js"    # `make livekit-client`
FACES = {"reference": "reference.png", "drawn": "drawn.png", "photo": "photo.png"}
FACES_DIR = Path(__file__).resolve().parents[2] / "assets"
MIC_MESSAGE_S = 0.1
MODES = {"offline": pb.ConversationOptions.OFFLINE, "realtime": pb.ConversationOptions.REALTIME}
HTTP_STATUS = {grpc.StatusCode.INVALID_ARGUMENT: 400, grpc.StatusCode.UNAUTHENTICATED: 401,
               grpc.StatusCode.PERMISSION_DENIED: 403, grpc.StatusCode.NOT_FOUND: 404,
               grpc.StatusCode.FAILED_PRECONDITION: 409, grpc.StatusCode.RESOURCE_EXHAUSTED: 429,
               grpc.StatusCode.UNAVAILABLE: 503}


class CallError(Exception):
    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status, self.message = status, message


class PageContext:
    """The parts of a gRPC servicer context the ingress uses, for calls the page makes in process."""

    def __init__(self, api_key: str | None):
        self.metadata = [("x-api-key", api_key)] if api_key else []
        self.code = None
        self.details = ""

    def invocation_metadata(self):
        return self.metadata

    def set_code(self, code) -> None:
        self.code = code

    def set_details(self, details: str) -> None:
        self.details = details

    def check(self) -> None:
        if self.code is not None and self.code != grpc.StatusCode.OK:
            raise CallError(HTTP_STATUS.get(self.code, 500), self.details)


class _Call:
    """One browser's call: its conversation session, the caller's microphone in, what the page shows out."""

    def __init__(self, ingress, api_key: str | None):
        self.ingress, self.api_key = ingress, api_key
        self.call_id = uuid.uuid4().hex[:12]
        self.session: pb.Session | None = None
        self.inputs: asyncio.Queue = asyncio.Queue()
        self.mic: list[np.ndarray] = []
        self.mic_rate: int | None = None
        self.runner: asyncio.Task | None = None
        self.state = "connecting"
        self.error = ""
        self.turn_latencies_ms: list[float] = []
        self.events: list[dict] = []
        self.started_at = time.monotonic()

    async def _create(self, request: pb.CreateSessionRequest) -> None:
        context = PageContext(self.api_key)
        self.session = await self.ingress.CreateSession(request, context)
        context.check()

    async def hang_up(self) -> None:
        if self.state in ("ended", "failed"):
            return
        self.state = "ended"
        if self.session is not None:        # closed first: its stream then ends as closed, not as failed
            context = PageContext(self.api_key)
            await self.ingress.CloseSession(pb.CloseSessionRequest(session_id=self.session.session_id,
                                                                   session_token=self.session.session_token), context)
        if self.runner is not None:
            self.runner.cancel()
            await asyncio.gather(self.runner, return_exceptions=True)
        await self._close_media()

    async def _close_media(self) -> None:
        ...

    def status(self) -> dict:
        try:
            record = self.ingress.store.get(self.session.session_id) if self.session else None
        except Exception:             # expired or never made
            record = None
        return {"call_id": self.call_id, "state": self.state, "error": self.error,
                "session_id": self.session.session_id if self.session else "",
                "session_state": record.state.value if record is not None else "gone",
                "turn_latencies_ms": self.turn_latencies_ms, "events": self.events[-100:]}

    # ------------------------------------------------------------------------------------------------------------
    async def _requests(self):
        yield pb.SessionInput(attach=pb.Attach(session_id=self.session.session_id,
                                               session_token=self.session.session_token))
        while True:
            message = await self.inputs.get()
            if message is None:
                return
            yield message

    async def _on_mic(self, pcm: np.ndarray, rate: int) -> None:
        if self.state == "connecting":
            self.state = "connected"
            self._tell({"type": "CONNECTED"})
        if self.mic_rate not in (None, rate):
            self.mic = []
        self.mic_rate = rate
        self.mic.append(pcm)
        if sum(len(piece) for piece in self.mic) >= rate * MIC_MESSAGE_S:
            samples, self.mic = np.concatenate(self.mic), []
            self.inputs.put_nowait(pb.SessionInput(audio=pb.AudioInput(
                pcm_s16le=samples.astype("<i2").tobytes(), sample_rate_hz=rate, channels=1)))

    def _tell(self, event: dict) -> None:
        """An event for the page (kept for its status, numbered)."""
        self.events.append({"n": len(self.events), **event})

    def _video(self, chunk) -> None:
        """A video chunk came back on the stream (only where the page's media is ours to send)."""

    async def _run(self) -> None:
        context = PageContext(self.api_key)
        try:
            async for output in self.ingress.StreamSession(self._requests(), context):
                kind = output.WhichOneof("output")
                if kind == "video_chunk":
                    self._video(output.video_chunk)
                elif kind == "event":
                    event = output.event
                    if event.type == pb.Event.REPLY_STARTED:
                        self.turn_latencies_ms.append(event.turn_latency_ms)
                    self._tell({"type": pb.Event.Type.Name(event.type), "message": event.message,
                                "turn_latency_ms": event.turn_latency_ms})
        except asyncio.CancelledError:
            raise
        except Exception as error:    # the stream was aborted: its status is in the context
            self.error = context.details or f"{type(error).__name__}: {error}"
            self.state = "failed"
            self._tell({"type": "FAILED", "message": self.error})
            logger.warning("browser call %s failed: %s", self.call_id, self.error)
            await self._close_media()
            return
        if self.state not in ("ended", "failed"):
            self.state = "ended"
            self._tell({"type": "ENDED", "message": "the call ended"})


class BrowserCall(_Call):
    """A call over the embedded aiortc peer: the media and the events go to the page over WebRTC."""

    def __init__(self, ingress, api_key: str | None):
        super().__init__(ingress, api_key)
        self.peer = self.media = None

    async def start(self, image: bytes, mode: str, sdp: str, kind: str) -> dict:
        from services.delivery.webrtc import AvatarMedia, CallPeer
        from services.media import decode_image_bytes, fit_image

        await self._create(pb.CreateSessionRequest(reference_image=image,
                                                   conversation=pb.ConversationOptions(mode=MODES[mode])))
        options = self.session.options
        still = fit_image(decode_image_bytes(image, "reference_image"), options.width, options.height)
        self.media = AvatarMedia(options.fps, options.width, options.height, np.asarray(still))
        self.peer = CallPeer(self.media, self._on_mic, self._on_closed)
        try:
            answer_sdp, answer_kind = await self.peer.answer(sdp, kind)
        except Exception as error:
            await self.hang_up()
            raise CallError(400, f"sdp: the offer was not accepted: {type(error).__name__}: {error}") from None
        self.runner = asyncio.ensure_future(self._run())
        return {"sdp": answer_sdp, "type": answer_kind, "call_id": self.call_id,
                "session_id": self.session.session_id, "session_token": self.session.session_token}

    async def _close_media(self) -> None:
        if self.peer is not None:
            await self.peer.close()

    def status(self) -> dict:
        return {**super().status(), "av_offsets_ms": self.media.offsets_ms[-50:] if self.media else [],
                "frames_sent": self.media.frames_sent if self.media else 0,
                "chunks": self.media.chunks if self.media else 0}

    def _tell(self, event: dict) -> None:
        super()._tell(event)
        if self.peer is not None:
            self.peer.send_event(event)

    def _video(self, chunk) -> None:
        import PIL.Image

        frames = []
        for data in chunk.frames:
            with PIL.Image.open(io.BytesIO(data)) as image:
                frames.append(np.asarray(image.convert("RGB")))
        self.media.push_chunk(frames, np.frombuffer(chunk.audio_pcm_s16le, "<i2"), chunk.sample_rate_hz)

    async def _on_closed(self) -> None:
        if self.state not in ("ended", "failed"):
            asyncio.ensure_future(self.hang_up())


class RoomCall(_Call):
    """A call in a LiveKit room (the server has LiveKit configured): the browser joins the room with a token minted
    here (its microphone only), the avatar joins as its own participant and publishes its face and voice there
    (the session's LiveKit delivery), and facecast's hidden listener hears the caller for the conversation. The
    page polls the call's status for the turn events."""

    def __init__(self, ingress, api_key: str | None):
        super().__init__(ingress, api_key)
        self.ear = None
        self.listener: asyncio.Task | None = None

    async def start(self, image: bytes, mode: str) -> dict:
        from services.delivery.livekit_room import DeliveryError, LiveKitConnector, caller_token, listener_token

        config = self.ingress.livekit
        if config is None:
            raise CallError(409, "transport=livekit: this server has no LiveKit configured (livekit_url and "
                                 "LIVEKIT_API_KEY / LIVEKIT_API_SECRET); call over this server's own WebRTC instead")
        room, caller = f"facecast-call-{self.call_id}", f"caller-{self.call_id}"
        await self._create(pb.CreateSessionRequest(
            reference_image=image, conversation=pb.ConversationOptions(mode=MODES[mode]),
            delivery=pb.Delivery(livekit=pb.LiveKitDelivery(room=room))))
        connector = self.ingress.room_connector or LiveKitConnector()
        try:
            self.ear = await connector.hear(config.url, listener_token(config, room, f"facecast-ear-{self.call_id}"),
                                            config.connect_timeout_s, caller)
        except DeliveryError as error:
            await self.hang_up()
            raise CallError(503, str(error)) from None
        self.runner = asyncio.ensure_future(self._run())
        self.listener = asyncio.ensure_future(self._listen())
        return {"transport": "livekit", "url": config.browser_url, "token": caller_token(config, room, caller),
                "room": room, "identity": caller, "avatar_identity": f"facecast-avatar-{self.session.session_id[:8]}",
                "call_id": self.call_id, "session_id": self.session.session_id,
                "session_token": self.session.session_token}

    async def _listen(self) -> None:
        async for piece in self.ear.pieces():
            await self._on_mic(piece, self.ear.rate)

    async def _close_media(self) -> None:
        if self.listener is not None:
            self.listener.cancel()
            await asyncio.gather(self.listener, return_exceptions=True)
        if self.ear is not None:
            await self.ear.close()


def build_call_app(ingress):
    """The page's FastAPI app over `ingress` (a `SessionIngress` instance; its calls live on it)."""
    from fastapi import FastAPI
    from fastapi.responses import FileResponse, HTMLResponse, JSONResponse

    app = FastAPI(title="facecast call", docs_url=None, redoc_url=None)
    calls: dict[str, BrowserCall] = {}
    ingress.browser_calls = calls

    def refused(error: CallError) -> JSONResponse:
        return JSONResponse({"error": error.message}, status_code=error.status)

    @app.get("/")
    async def page():
        return HTMLResponse(PAGE.read_text(encoding="utf-8"))

    @app.get("/call/config")
    async def config():
        return {"modes": list(ingress.conversation_modes), "faces": [name for name, file in FACES.items()
                                                                      if (FACES_DIR / file).is_file()],
                "needs_key": bool(ingress.api_keys), "livekit": ingress.livekit is not None,
                "livekit_client": LIVEKIT_CLIENT.is_file()}

    @app.get("/call/livekit-client.js")
    async def livekit_client():
        if not LIVEKIT_CLIENT.is_file():
            return JSONResponse({"error": "the LiveKit browser client is not installed on this server: make "
                                          "livekit-client"}, status_code=404)
        return FileResponse(LIVEKIT_CLIENT, media_type="text/javascript")

    @app.get("/call/faces/{name}")
    async def face(name: str):
        if name not in FACES or not (FACES_DIR / FACES[name]).is_file():
            return JSONResponse({"error": f"no face {name!r}; allowed: {', '.join(FACES)}"}, status_code=404)
        return FileResponse(FACES_DIR / FACES[name], media_type="image/png")

    def keep(call: _Call) -> None:
        calls[call.call_id] = call
        for old in [c for c in calls.values() if c.state in ("ended", "failed")][:-20]:
            calls.pop(old.call_id, None)

    def mode_of(body: dict) -> str:
        mode = body.get("mode") or (ingress.conversation_modes[0] if ingress.conversation_modes else "offline")
        if mode not in MODES:
            raise CallError(400, f"mode={mode!r} is invalid; allowed: {', '.join(MODES)}")
        return mode

    @app.post("/call/offer")
    async def offer(request: Request):
        try:
            body = await _json(request)
            image, mode = _image(body), mode_of(body)
            if not isinstance(body.get("sdp"), str) or body.get("type") != "offer":
                raise CallError(400, "sdp and type='offer' are required (the browser's RTCSessionDescription)")
            call = BrowserCall(ingress, request.headers.get("x-api-key"))
            answer = await call.start(image, mode, body["sdp"], "offer")
        except CallError as error:
            return refused(error)
        keep(call)
        return answer

    @app.post("/call/room")
    async def room(request: Request):
        try:
            body = await _json(request)
            image, mode = _image(body), mode_of(body)
            call = RoomCall(ingress, request.headers.get("x-api-key"))
            answer = await call.start(image, mode)
        except CallError as error:
            return refused(error)
        keep(call)
        return answer

    @app.post("/call/hangup")
    async def hangup(request: Request):
        try:
            body = await _json(request)
        except CallError as error:
            return refused(error)
        mine = [c for c in calls.values() if c.session and c.session.session_id == body.get("session_id")]
        if mine:
            await mine[0].hang_up()
            return {"ended": True}
        context = PageContext(request.headers.get("x-api-key"))       # the call lives on another replica
        await ingress.CloseSession(pb.CloseSessionRequest(session_id=str(body.get("session_id", "")),
                                                          session_token=str(body.get("session_token", ""))), context)
        try:
            context.check()
        except CallError as error:
            return refused(error)
        return {"ended": True}

    @app.get("/call/{call_id}")
    async def status(call_id: str):
        if call_id not in calls:
            return JSONResponse({"error": f"no call {call_id!r} on this replica"}, status_code=404)
        return calls[call_id].status()

    return app


async def _json(request) -> dict:
    try:
        body = await request.json()
    except Exception:
        raise CallError(400, "the body must be a JSON object") from None
    if not isinstance(body, dict):
        raise CallError(400, "the body must be a JSON object")
    return body


def _image(body: dict) -> bytes:
    if body.get("image"):
        data = str(body["image"])
        data = data.split(",", 1)[1] if data.startswith("data:") else data
        try:
            return base64.b64decode(data, validate=True)
        except (binascii.Error, ValueError):
            raise CallError(400, "image: not base64 (send a data: URL or base64 of a PNG/JPEG)") from None
    name = body.get("face") or "reference"
    if name not in FACES or not (FACES_DIR / FACES[name]).is_file():
        raise CallError(400, f"face={name!r} is not a bundled face; allowed: "
                             f"{', '.join(n for n, f in FACES.items() if (FACES_DIR / f).is_file())}, or send image")
    return (FACES_DIR / FACES[name]).read_bytes()
