"""Hostile input for facecast's gRPC API: hypothesis strategies for every RPC, and the harness that sends them.

    harness = Hostile(channel, metadata, victims)       # victims: live sessions (pb.Session) the streams attach to
    @given(hostile_calls())
    def test(call):
        harness.send(call)                              # HostileFailure on a status the API does not document

What is generated (`hostile_calls`): CreateSession with broken, truncated, bomb-sized and oversized images, odd
options (NaN, zero, huge), out-of-range regions, unknown enum values, long strings; StreamSession runs of messages in
any order (attach late or twice, audio before attach, an empty oneof), audio at odd rates and channel counts, odd byte
counts, full-scale and silent PCM, characters that do not exist, control after end_of_input, floods of one-sample
messages, re-attach storms on the same session; Get/Update/CloseSession with wrong ids and tokens; and any of these
as raw bytes with unknown fields appended or the last bytes cut off. Each reply must be OK or a status the proto
documents for callers (INTERNAL, UNKNOWN, UNIMPLEMENTED, DATA_LOSS, UNAVAILABLE or a deadline are failures).

Used by the fuzz test (tests/services/serving/test_cluster.py) and `facecast bench fuzz` (a longer run against a
running server). Needs the `test` extra (hypothesis).
"""

from __future__ import annotations

import struct
import zlib
from collections import Counter
from dataclasses import dataclass, field

import grpc
from hypothesis import strategies as st

from services.api import pb

SERVICE = "/facecast.v1.AvatarService/"
DOCUMENTED = frozenset({grpc.StatusCode.OK, grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.UNAUTHENTICATED,
                        grpc.StatusCode.PERMISSION_DENIED, grpc.StatusCode.NOT_FOUND,
                        grpc.StatusCode.RESOURCE_EXHAUSTED, grpc.StatusCode.FAILED_PRECONDITION,
                        grpc.StatusCode.ABORTED})
"""What a hostile caller may get: OK or a status the proto documents for caller mistakes and limits."""


class HostileFailure(AssertionError):
    """A reply the API does not document for that input (the message holds the call and the status)."""


def _png_header(width: int, height: int) -> bytes:
    """A PNG signature and IHDR claiming width x height, then a truncated IDAT: a decompression bomb's header."""
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    chunk = b"IHDR" + ihdr
    idat = b"IDAT" + zlib.compress(b"\x00" * 64)
    return (b"\x89PNG\r\n\x1a\n" + struct.pack(">I", len(ihdr)) + chunk + struct.pack(">I", zlib.crc32(chunk))
            + struct.pack(">I", len(idat) - 4) + idat + struct.pack(">I", zlib.crc32(idat)))


def _small_png(seed: int) -> bytes:
    import io

    import numpy as np
    import PIL.Image

    pixels = (np.random.default_rng(seed).random((24, 20, 3)) * 255).astype("uint8")
    out = io.BytesIO()
    PIL.Image.fromarray(pixels).save(out, format="PNG")
    return out.getvalue()


_VALID = _small_png(0)
_FIXED_IMAGES = [b"", b"GIF89a" + b"\x00" * 20, _png_header(100_000, 100_000), _png_header(1, 2**31 - 1),
                 _png_header(0, 0), _VALID[: len(_VALID) // 2], _VALID, b"\xff\xd8\xff" + b"\x00" * 64]
_OVERSIZED = b"\x89PNG\r\n\x1a\n" + b"\x00" * (11 * 2**20)

floats = st.one_of(st.floats(allow_nan=True, allow_infinity=True), st.sampled_from([0.0, -1.0, 1e30, 25.0]))
texts = st.one_of(st.text(max_size=40), st.sampled_from(["x" * 5000, "\x00" * 10, "../../etc/passwd", "é" * 300]))
ids = st.one_of(st.text(max_size=40), st.sampled_from(["", "0" * 32, "f" * 32, "x" * 100_000]),
                st.binary(min_size=16, max_size=16).map(bytes.hex))
rates = st.one_of(st.sampled_from([0, 1, 7999, 8000, 16000, 22050, 44100, 48000, 96000, 96001, 2**31, 2**32 - 1]),
                  st.integers(0, 2**32 - 1))
uint32 = st.one_of(st.integers(0, 16), st.sampled_from([2**31, 2**32 - 1]))


@st.composite
def pcm(draw) -> bytes:
    kind = draw(st.sampled_from(["silence", "full-scale", "random", "odd", "empty", "dc"]))
    n = draw(st.integers(0, 1600))
    if kind == "silence":
        return b"\x00\x00" * n
    if kind == "full-scale":
        return struct.pack(f"<{n}h", *([32767, -32768] * (n // 2 + 1))[:n])
    if kind == "dc":
        return struct.pack("<h", -32768) * n
    if kind == "odd":
        data = draw(st.binary(max_size=8))
        return data if len(data) % 2 else data + b"\x00"
    if kind == "empty":
        return b""
    return draw(st.binary(max_size=2 * n))


def _valid_audio(samples: int = 640) -> pb.SessionInput:
    return pb.SessionInput(audio=pb.AudioInput(pcm_s16le=b"\x10\x00" * samples, sample_rate_hz=16000, channels=1))


@st.composite
def audio_inputs(draw) -> pb.SessionInput:
    """A valid 40 ms piece with at most one thing wrong (so the wrong thing is what the server meets first)."""
    message = _valid_audio()
    audio = message.audio
    what = draw(st.sampled_from(["none", "none", "rate", "channels", "character", "pcm", "pcm", "long"]))
    if what == "rate":
        audio.sample_rate_hz = draw(rates)
    elif what == "channels":
        audio.channels = draw(uint32)
    elif what == "character":
        audio.character = draw(uint32)
    elif what == "pcm":
        audio.pcm_s16le = draw(pcm())
    elif what == "long":
        audio.pcm_s16le = b"\x00\x01" * draw(st.sampled_from([16000 * 10 + 1, 16000 * 11]))   # over 10 s
    return message


def controls():
    speaking = st.lists(st.builds(lambda c, s: pb.SpeakingState(character=c, speaking=s), uint32, st.booleans()),
                        max_size=4)
    end = st.sampled_from([False] * 7 + [True])   # rarely: an ended victim only answers FAILED_PRECONDITION
    return st.builds(lambda states, ended: pb.SessionInput(control=pb.Control(speaking=states, end_of_input=ended)),
                     speaking, end)


def create_requests():
    options = st.builds(lambda fps, w, h, steps, chunk, decoder: pb.SessionOptions(
        fps=fps, width=w, height=h, steps=steps, chunk_latent_frames=chunk, decoder=decoder),
        floats, uint32, uint32, uint32, uint32, st.sampled_from(["", "full", "fast", "warp"]))
    region = st.builds(lambda a, b, c, d: pb.Character(region=pb.Region(x0=a, y0=b, x1=c, y1=d)),
                       floats, floats, floats, floats)
    delivery = st.one_of(st.none(), st.builds(lambda room, ident: pb.Delivery(livekit=pb.LiveKitDelivery(
        room=room, agent_identity=ident)), texts, texts))
    conversation = st.one_of(st.none(), st.builds(lambda mode, chars: pb.ConversationOptions(
        mode=mode, reply_characters=chars), st.integers(0, 7), st.lists(uint32, max_size=3)))

    def build(image, prompt, opts, regions, deliver, talk, owner):
        request = pb.CreateSessionRequest(reference_image=image, prompt=prompt, options=opts, owner=owner)
        request.characters.extend(regions)
        if deliver is not None:
            request.delivery.CopyFrom(deliver)
        if talk is not None:
            request.conversation.CopyFrom(talk)
        return request

    images = st.one_of(st.sampled_from(_FIXED_IMAGES), st.binary(max_size=256))
    return st.builds(build, images, texts, options, st.lists(region, max_size=10), delivery, conversation, texts)


@dataclass(frozen=True)
class Call:
    """One hostile call: `rpc` ("CreateSession", "StreamSession", ...), its messages (proto objects or, for raw
    mutations, bytes), `victim`: which live session a stream's attach names (-1: a made-up one)."""

    rpc: str
    messages: tuple
    victim: int = -1
    attach: str = "valid"      # valid | wrong-token | unknown | none | late | twice


def _mutate(message, how: str):
    data = message.SerializeToString()
    if how == "unknown-field":
        return data + b"\xf8\x06\x2a" + b"\x9a\x07\x03abc"     # field 111 varint 42, field 115 bytes "abc"
    if how == "truncated" and data:
        return data[: len(data) - 1]
    return message


@st.composite
def stream_calls(draw, victims: int = 2) -> Call:
    attach = draw(st.sampled_from(["valid", "valid", "valid", "wrong-token", "unknown", "none", "late", "twice"]))
    body = draw(st.lists(st.one_of(audio_inputs(), audio_inputs(), controls(), st.just(pb.SessionInput())),
                         max_size=12))
    if draw(st.integers(0, 19)) == 0:      # a flood of one-sample messages
        body = body + [pb.SessionInput(audio=pb.AudioInput(pcm_s16le=b"\x01\x00", sample_rate_hz=16000,
                                                           channels=1))] * draw(st.integers(100, 800))
    how = draw(st.sampled_from(["plain"] * 6 + ["unknown-field", "truncated"]))
    if body and how != "plain":
        index = draw(st.integers(0, len(body) - 1))
        body[index] = _mutate(body[index], how)
    return Call("StreamSession", tuple(body), draw(st.integers(0, victims - 1)), attach)


@st.composite
def unary_calls(draw) -> Call:
    rpc = draw(st.sampled_from(["CreateSession", "GetSession", "CloseSession", "UpdateSession"]))
    if rpc == "CreateSession":
        message = draw(create_requests())
        if draw(st.integers(0, 49)) == 0:
            message.reference_image = _OVERSIZED
    elif rpc == "UpdateSession":
        message = pb.UpdateSessionRequest(session_id=draw(ids), session_token=draw(ids), prompt=draw(texts))
        message.speaking.extend(draw(st.lists(st.builds(lambda c, s: pb.SpeakingState(character=c, speaking=s),
                                                        uint32, st.booleans()), max_size=3)))
    else:
        request_type = pb.GetSessionRequest if rpc == "GetSession" else pb.CloseSessionRequest
        message = request_type(session_id=draw(ids), session_token=draw(ids))
    how = draw(st.sampled_from(["plain"] * 8 + ["unknown-field", "truncated"]))
    return Call(rpc, (_mutate(message, how),))


def hostile_calls(victims: int = 2):
    """Any hostile call (streams three times as often as unary calls: they carry most of the surface)."""
    return st.one_of(stream_calls(victims), stream_calls(victims), stream_calls(victims), unary_calls())


@dataclass
class Hostile:
    """Sends `Call`s over `channel` with `metadata` (the API key); `victims` are live sessions a stream attaches to
    (with their real token, a wrong one, or as a re-attach storm); `renew()`, when given, makes a fresh victim to
    replace one that ended or failed. Counts every status and message sent."""

    channel: grpc.Channel
    metadata: list
    victims: list
    renew: object = None
    timeout_s: float = 60.0
    statuses: Counter = field(default_factory=Counter)
    messages_sent: int = 0

    def _bytes(self, message) -> bytes:
        return message if isinstance(message, bytes) else message.SerializeToString()

    def send(self, call: Call) -> grpc.StatusCode:
        if call.rpc == "StreamSession":
            messages = self._stream_messages(call)
            method = self.channel.stream_stream(SERVICE + "StreamSession")
            code, details = grpc.StatusCode.OK, ""
            try:
                for _ in method(iter(messages), metadata=self.metadata, timeout=self.timeout_s):
                    pass
            except grpc.RpcError as error:
                code, details = error.code(), error.details()
        else:
            messages = [self._bytes(m) for m in call.messages]
            method = self.channel.unary_unary(SERVICE + call.rpc)
            code, details = grpc.StatusCode.OK, ""
            try:
                method(messages[0], metadata=self.metadata, timeout=self.timeout_s)
            except grpc.RpcError as error:
                code, details = error.code(), error.details()
        self.messages_sent += len(messages)
        self.statuses[code.name] += 1
        if (call.rpc == "StreamSession" and code == grpc.StatusCode.FAILED_PRECONDITION and self.renew is not None
                and call.attach in ("valid", "twice") and ("already delivered" in details or "failed" in details)):
            self.victims[call.victim % len(self.victims)] = self.renew()
        if code not in DOCUMENTED:
            shown = repr(call)[:600]
            raise HostileFailure(f"{call.rpc} answered {code.name} ({details!r}) to {shown}")
        return code

    def _stream_messages(self, call: Call) -> list[bytes]:
        victim = self.victims[call.victim % len(self.victims)]
        token = victim.session_token if call.attach != "wrong-token" else victim.session_token[::-1]
        session_id = victim.session_id if call.attach != "unknown" else "0" * 32
        attach = pb.SessionInput(attach=pb.Attach(session_id=session_id, session_token=token)).SerializeToString()
        body = [self._bytes(m) for m in call.messages]
        if call.attach == "none":
            return body
        if call.attach == "late":
            return body[:1] + [attach] + body[1:]
        if call.attach == "twice":
            return [attach, attach] + body
        return [attach] + body
