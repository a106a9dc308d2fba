"""The browser call: the page `facecast serve` serves over HTTP, and the calls it makes — served by the ingress.

    GET  /                      the call page (services/serving/web/call.html)
    GET  /call/config           the conversation modes this server offers, the bundled faces, whether a key is needed
    GET  /call/faces/NAME       a bundled face
    POST /call/offer            {sdp, type, mode, face | image (base64)} ─► a conversation session (CreateSession, as
                                any API client) + an aiortc peer (`services.delivery.webrtc`) ─► {sdp, type, call_id,
                                session_id, session_token}
    POST /call/hangup           {session_id, session_token} ─► the call stops and its session is closed (any replica)
    GET  /call/CALL_ID          the call's state, its turn latencies and the sender's A/V offsets

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


class BrowserCall:
    """One browser's call: its conversation session and its WebRTC peer."""

    def __init__(self, ingress, api_key: str | None):
        self.ingress, self.api_key = ingress, api_key
        self.call_id = uuid.uuid4().hex[:12]
        self.session: pb.Session | None = None
        self.inputs: asyncio.Queue = asyncio.Queue()
        self.mic: list[np.ndarray] = []
        self.mic_rate: int | None = None
        self.peer = self.media = None
        self.runner: asyncio.Task | None = None
        self.state = "connecting"
        self.error = ""
        self.turn_latencies_ms: list[float] = []
        self.started_at = time.monotonic()

    async def start(self, image: bytes, mode: str, sdp: str, kind: str) -> dict:
        from services.delivery.webrtc import AvatarMedia, CallPeer

        context = PageContext(self.api_key)
        request = pb.CreateSessionRequest(reference_image=image, conversation=pb.ConversationOptions(mode=MODES[mode]))
        self.session = await self.ingress.CreateSession(request, context)
        context.check()
        options = self.session.options
        self.media = AvatarMedia(options.fps, options.width, options.height)
        self.peer = CallPeer(self.media, self._on_mic, self._on_closed)
        try:
            answer_sdp, answer_kind = await self.peer.answer(sdp, kind)
        except Exception as error:
            await self.hang_up()
            raise CallError(400, f"sdp: the offer was not accepted: {type(error).__name__}: {error}") from None
        self.runner = asyncio.ensure_future(self._run())
        return {"sdp": answer_sdp, "type": answer_kind, "call_id": self.call_id,
                "session_id": self.session.session_id, "session_token": self.session.session_token}

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
        if self.peer is not None:
            await self.peer.close()

    def status(self) -> dict:
        try:
            record = self.ingress.store.get(self.session.session_id) if self.session else None
        except Exception:             # expired or never made
            record = None
        return {"call_id": self.call_id, "state": self.state, "error": self.error,
                "session_id": self.session.session_id if self.session else "",
                "session_state": record.state.value if record is not None else "gone",
                "turn_latencies_ms": self.turn_latencies_ms,
                "av_offsets_ms": self.media.offsets_ms[-50:] if self.media else [],
                "frames_sent": self.media.frames_sent if self.media else 0,
                "chunks": self.media.chunks if self.media else 0}

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
            self.peer.send_event({"type": "CONNECTED"})
        if self.mic_rate not in (None, rate):
            self.mic = []
        self.mic_rate = rate
        self.mic.append(pcm)
        if sum(len(piece) for piece in self.mic) >= rate * MIC_MESSAGE_S:
            samples, self.mic = np.concatenate(self.mic), []
            self.inputs.put_nowait(pb.SessionInput(audio=pb.AudioInput(
                pcm_s16le=samples.astype("<i2").tobytes(), sample_rate_hz=rate, channels=1)))

    async def _on_closed(self) -> None:
        if self.state not in ("ended", "failed"):
            asyncio.ensure_future(self.hang_up())

    async def _run(self) -> None:
        import PIL.Image

        context = PageContext(self.api_key)
        try:
            async for output in self.ingress.StreamSession(self._requests(), context):
                kind = output.WhichOneof("output")
                if kind == "video_chunk":
                    chunk = output.video_chunk
                    frames = []
                    for data in chunk.frames:
                        with PIL.Image.open(io.BytesIO(data)) as image:
                            frames.append(np.asarray(image.convert("RGB")))
                    self.media.push_chunk(frames, np.frombuffer(chunk.audio_pcm_s16le, "<i2"), chunk.sample_rate_hz)
                elif kind == "event":
                    event = output.event
                    name = pb.Event.Type.Name(event.type)
                    if event.type == pb.Event.REPLY_STARTED:
                        self.turn_latencies_ms.append(event.turn_latency_ms)
                    self.peer.send_event({"type": name, "message": event.message,
                                          "turn_latency_ms": event.turn_latency_ms})
        except asyncio.CancelledError:
            raise
        except Exception as error:    # the stream was aborted: its status is in the context
            self.error = context.details or f"{type(error).__name__}: {error}"
            self.state = "failed"
            self.peer.send_event({"type": "FAILED", "message": self.error})
            logger.warning("browser call %s failed: %s", self.call_id, self.error)
            return
        if self.state not in ("ended", "failed"):
            self.state = "ended"
            self.peer.send_event({"type": "ENDED", "message": "the call ended"})


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
                "needs_key": bool(ingress.api_keys)}

    @app.get("/call/faces/{name}")
    async def face(name: str):
        if name not in FACES or not (FACES_DIR / FACES[name]).is_file():
            return JSONResponse({"error": f"no face {name!r}; allowed: {', '.join(FACES)}"}, status_code=404)
        return FileResponse(FACES_DIR / FACES[name], media_type="image/png")

    @app.post("/call/offer")
    async def offer(request: Request):
        try:
            body = await _json(request)
            image = _image(body)
            mode = body.get("mode") or (ingress.conversation_modes[0] if ingress.conversation_modes else "offline")
            if mode not in MODES:
                raise CallError(400, f"mode={mode!r} is invalid; allowed: {', '.join(MODES)}")
            if not isinstance(body.get("sdp"), str) or body.get("type") != "offer":
                raise CallError(400, "sdp and type='offer' are required (the browser's RTCSessionDescription)")
            call = BrowserCall(ingress, request.headers.get("x-api-key"))
            answer = await call.start(image, mode, body["sdp"], "offer")
        except CallError as error:
            return refused(error)
        calls[call.call_id] = call
        for old in [c for c in calls.values() if c.state in ("ended", "failed")][:-20]:
            calls.pop(old.call_id, None)
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
