"""The reference client of `facecast.v1.AvatarService` (what `facecast call` and the end-to-end tests use).

    client = AvatarClient("127.0.0.1:9000", api_key=None)
    session = client.create_session(png_bytes, options={"fps": 25})
    result = client.stream(session, pcm_int16, sample_rate_hz=16000, realtime=True)   # StreamResult

`stream` sends audio in 40 ms messages (paced in real time when `realtime`), then end_of_input, and collects every
video chunk with its arrival time.  If the stream breaks (an ingress replica died) it re-attaches with
`resume_from_chunk` and resumes sending audio from the sample the server reports, so a session survives replica
restarts.  gRPC errors surface as `grpc.RpcError` with the server's status code and message.
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass, field

import grpc
import numpy as np

from services.api import pb, pb_grpc

PIECE_S = 0.04
# A stream that ends with one of these was cut by the server side going away (replica restart), not refused.
RETRYABLE = (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.ABORTED, grpc.StatusCode.UNKNOWN, grpc.StatusCode.INTERNAL,
             grpc.StatusCode.CANCELLED)


@dataclass
class StreamResult:
    chunks: list = field(default_factory=list)           # pb.VideoChunk in chunk order
    arrival_s: list[float] = field(default_factory=list)  # seconds since the first audio was sent
    events: list = field(default_factory=list)
    reattaches: int = 0

    @property
    def frames_jpeg(self) -> list[bytes]:
        return [frame for chunk in self.chunks for frame in chunk.frames]

    @property
    def ttff_s(self) -> float | None:
        return self.arrival_s[0] if self.arrival_s else None

    @property
    def intervals_s(self) -> list[float]:
        return list(np.diff(self.arrival_s)) if len(self.arrival_s) > 1 else []


class AvatarClient:
    def __init__(self, target: str, api_key: str | None = None, metadata: list[tuple[str, str]] | None = None,
                 application: str | None = "facecast", tls: bool | bytes = False):
        """tls: False (plaintext), True (TLS, the system's trusted roots) or PEM bytes of the certificate(s) to
        trust (a private CA, a self-signed server)."""
        options = [("grpc.max_receive_message_length", 64 * 2**20), ("grpc.max_send_message_length", 64 * 2**20)]
        if tls is False:
            self.channel = grpc.insecure_channel(target, options=options)
        else:
            roots = None if tls is True else tls
            self.channel = grpc.secure_channel(target, grpc.ssl_channel_credentials(root_certificates=roots),
                                               options=options)
        self.stub = pb_grpc.AvatarServiceStub(self.channel)
        self.last_error = ""
        self.metadata = list(metadata or [])
        if api_key:
            self.metadata.append(("authorization", f"Bearer {api_key}"))
        if application:
            self.metadata.append(("application", application))

    def close(self) -> None:
        self.channel.close()

    def create_session(self, reference_image: bytes, prompt: str = "", options: dict | None = None,
                       characters: list[tuple[float, float, float, float]] | None = None, timeout_s: float = 120):
        request = pb.CreateSessionRequest(reference_image=reference_image, prompt=prompt,
                                          options=pb.SessionOptions(**(options or {})))
        for region in characters or []:
            request.characters.add(region=pb.Region(x0=region[0], y0=region[1], x1=region[2], y1=region[3]))
        return self.stub.CreateSession(request, metadata=self.metadata, timeout=timeout_s)

    def get_session(self, session_id: str, token: str):
        return self.stub.GetSession(pb.GetSessionRequest(session_id=session_id, session_token=token),
                                    metadata=self.metadata)

    def close_session(self, session_id: str, token: str):
        return self.stub.CloseSession(pb.CloseSessionRequest(session_id=session_id, session_token=token),
                                      metadata=self.metadata)

    def stream(self, session, pcm: np.ndarray, sample_rate_hz: int, *, realtime: bool = False,
               max_reattaches: int = 8, on_chunk=None, after_chunks: tuple[int, callable] | None = None,
               speaking: list[tuple[int, bool]] | None = None, timeout_s: float = 600) -> StreamResult:
        """Stream int16 mono `pcm`, end input, and collect all chunks (re-attaching on a broken stream).

        after_chunks=(n, fn): call fn() once, after the n-th chunk arrived (tests use it to kill a replica).
        speaking: (character, speaking) states sent as a control message before the first audio.
        """
        result = StreamResult()
        started = time.perf_counter()
        resume_from, sample_offset = 0, 0
        hook = after_chunks
        while True:
            outcome = self._one_stream(session, pcm, sample_rate_hz, realtime, resume_from, sample_offset,
                                       result, started, on_chunk, hook, timeout_s, speaking)
            if outcome == "done":
                return result
            hook = None if hook and len(result.chunks) >= hook[0] else hook
            if result.reattaches >= max_reattaches:
                cause = f"; last error: {self.last_error}" if self.last_error else ""
                raise RuntimeError(f"stream broke {result.reattaches + 1} times; giving up{cause}")
            time.sleep(min(0.5 * 2 ** result.reattaches, 4.0))  # the replica is being replaced
            result.reattaches += 1
            resume_from = len(result.chunks)
            sample_offset = None  # ask the server

    def _one_stream(self, session, pcm, rate, realtime, resume_from, sample_offset, result, started, on_chunk, hook,
                    timeout_s, speaking=None) -> str:
        attached = threading.Event()
        resume_sample = [0]
        stop = threading.Event()

        def requests():
            yield pb.SessionInput(attach=pb.Attach(session_id=session.session_id,
                                                   session_token=session.session_token,
                                                   resume_from_chunk=resume_from))
            attached.wait(timeout=60)
            if speaking:
                yield pb.SessionInput(control=pb.Control(speaking=[
                    pb.SpeakingState(character=character, speaking=value) for character, value in speaking]))
            offset = resume_sample[0] if sample_offset is None else sample_offset
            piece = max(1, round(PIECE_S * rate))
            clock = time.perf_counter()
            for index, start in enumerate(range(offset, pcm.shape[0], piece)):
                if stop.is_set():
                    return
                if realtime:
                    delay = clock + index * PIECE_S - time.perf_counter()
                    if delay > 0:
                        time.sleep(delay)
                yield pb.SessionInput(audio=pb.AudioInput(pcm_s16le=pcm[start:start + piece].astype("<i2").tobytes(),
                                                          sample_rate_hz=rate, channels=1))
            yield pb.SessionInput(control=pb.Control(end_of_input=True))
            stop.wait()

        responses = self.stub.StreamSession(requests(), metadata=self.metadata, timeout=timeout_s)
        try:
            for output in responses:
                kind = output.WhichOneof("output")
                if kind == "event":
                    result.events.append(output.event)
                    if output.event.type == pb.Event.ATTACHED:
                        resume_sample[0] = output.event.audio_samples_received
                        attached.set()
                    if output.event.type == pb.Event.SESSION_ENDED:
                        stop.set()
                        responses.cancel()
                        return "done"
                    continue
                chunk = output.video_chunk
                if chunk.chunk_index < len(result.chunks):
                    continue  # already have it (re-sent after a re-attach)
                result.chunks.append(chunk)
                result.arrival_s.append(time.perf_counter() - started)
                if on_chunk:
                    on_chunk(chunk)
                if hook and len(result.chunks) == hook[0]:
                    hook[1]()
            return "done" if result.chunks and result.chunks[-1].final else "broken"
        except grpc.RpcError as error:
            if error.code() in RETRYABLE and not stop.is_set():
                self.last_error = f"{error.code().name}: {error.details()}"
                return "broken"   # the ingress went away mid-stream: re-attach
            raise
        finally:
            stop.set()
            attached.set()
