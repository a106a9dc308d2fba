"""Tests for the public gRPC API: proto build, generated code, request validation and status codes over gRPC."""

from __future__ import annotations

import io
import re
import json
import shutil
import subprocess
import sys
from concurrent import futures
from pathlib import Path

import grpc
import numpy as np
import pytest
from PIL import Image

from model_core.config import StreamConfig, get_preset
from services.api import SERVICE_NAME, pb, pb_grpc
from services.api import build as api_build
from services.api.keys import ApiKeyring
from services.api.validation import (
    FULL_FRAME,
    ApiError,
    ApiLimits,
    CreateSpec,
    check_api_key,
    check_token,
    new_token,
    require_session_id,
    session_to_proto,
    validate_audio,
    validate_control,
    validate_create,
    validate_update,
)
from services.store.sessions import hash_token

REPO = Path(__file__).resolve().parents[3]
INVALID = grpc.StatusCode.INVALID_ARGUMENT
PRESET_STREAM = StreamConfig(width=64, height=64, fps=25.0, steps=2, chunk_latent_frames=3, seed=7)


def _png(width: int = 32, height: int = 24, color=(200, 40, 40)) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (width, height), color).save(buf, format="PNG")
    return buf.getvalue()


def _jpeg(width: int = 32, height: int = 24) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (width, height), (10, 120, 10)).save(buf, format="JPEG")
    return buf.getvalue()


def _raises(code: grpc.StatusCode, fn, *args, **kwargs) -> str:
    with pytest.raises(ApiError) as info:
        fn(*args, **kwargs)
    assert info.value.code == code, info.value.message
    return info.value.message


# ------------------------------------------------------------------------------------------------------------- #
# Build and generated code
# ------------------------------------------------------------------------------------------------------------- #

_DUMP = r"""
import json, sys
from gen_pkg.facecast.v1 import avatar_pb2 as m, avatar_pb2_grpc as g
fd = m.DESCRIPTOR
out = {
    "file": fd.name, "package": fd.package,
    "messages": {},
    "enums": {e.name: list(e.values_by_name) for e in fd.enum_types_by_name.values()},
    "services": {s.full_name: {x.name: [x.input_type.full_name, x.output_type.full_name,
                                        x.client_streaming, x.server_streaming] for x in s.methods}
                 for s in fd.services_by_name.values()},
    "stub": hasattr(g, "AvatarServiceStub") and hasattr(g, "AvatarServiceServicer")
            and hasattr(g, "add_AvatarServiceServicer_to_server"),
}
def walk(d):
    out["messages"][d.full_name] = {f.name: f.type for f in d.fields}
    out["messages"][d.full_name]["__oneofs__"] = {o.name: [f.name for f in o.fields] for o in d.oneofs
                                                 if not o.name.startswith("_")}
    for e in d.enum_types:
        out["enums"][d.name + "." + e.name] = list(e.values_by_name)
    for n in d.nested_types:
        walk(n)
for d in fd.message_types_by_name.values():
    walk(d)
print(json.dumps(out))
"""


def test_proto_builds_from_scratch_into_any_directory(tmp_path):
    out = api_build.build(force=True, out_dir=tmp_path / "gen_pkg")
    assert (out / "facecast" / "v1" / "avatar_pb2.py").is_file()
    assert (out / "facecast" / "v1" / "avatar_pb2.pyi").is_file()
    grpc_src = (out / "facecast" / "v1" / "avatar_pb2_grpc.py").read_text()
    assert "from . import avatar_pb2" in grpc_src and "from facecast" not in grpc_src
    assert all((d / "__init__.py").is_file() for d in (out, out / "facecast", out / "facecast" / "v1"))
    assert not api_build.is_stale(out)
    # Import the fresh build in a clean interpreter (no services.api loaded, no sys.path tricks).
    dump = subprocess.run([sys.executable, "-c", _DUMP], cwd=tmp_path, capture_output=True, text=True,
                          check=True, timeout=60)
    info = json.loads(dump.stdout)
    assert info["file"] == "facecast/v1/avatar.proto" and info["package"] == "facecast.v1" and info["stub"]
    assert info["services"][SERVICE_NAME] == {
        "CreateSession": ["facecast.v1.CreateSessionRequest", "facecast.v1.Session", False, False],
        "StreamSession": ["facecast.v1.SessionInput", "facecast.v1.SessionOutput", True, True],
        "UpdateSession": ["facecast.v1.UpdateSessionRequest", "facecast.v1.Session", False, False],
        "GetSession": ["facecast.v1.GetSessionRequest", "facecast.v1.Session", False, False],
        "CloseSession": ["facecast.v1.CloseSessionRequest", "facecast.v1.Session", False, False],
    }
    msgs = info["messages"]
    required = {
        "CreateSessionRequest": {"reference_image", "prompt", "options", "characters", "delivery", "owner",
                                 "conversation"},
        "ConversationOptions": {"mode", "instructions"},
        "SessionOptions": {"fps", "width", "height", "steps", "chunk_latent_frames", "seed"},
        "Character": {"region"},
        "Region": {"x0", "y0", "x1", "y1"},
        "Delivery": {"grpc", "livekit"},
        "LiveKitDelivery": {"room", "identity", "also_stream", "agent_identity"},
        "Session": {"session_id", "session_token", "state", "options", "characters", "created_at",
                    "chunks_emitted", "frames_emitted"},
        "SessionInput": {"attach", "audio", "control"},
        "Attach": {"session_id", "session_token", "resume_from_chunk"},
        "AudioInput": {"pcm_s16le", "sample_rate_hz", "channels", "character"},
        "Control": {"speaking", "end_of_input"},
        "SpeakingState": {"character", "speaking"},
        "SessionOutput": {"video_chunk", "event"},
        "VideoChunk": {"chunk_index", "pts_ms", "width", "height", "frames", "audio_pcm_s16le", "sample_rate_hz",
                       "fps", "final", "stats"},
        "ChunkStats": {"ttbc_ms", "stage_ms", "chunks_in_flight"},
        "Event": {"type", "message", "session_id", "turn_latency_ms"},
        "UpdateSessionRequest": {"session_id", "session_token", "prompt", "speaking"},
        "GetSessionRequest": {"session_id", "session_token"},
        "CloseSessionRequest": {"session_id", "session_token"},
        "GrpcStreamDelivery": set(),
    }
    for name, fields in required.items():
        assert fields <= set(msgs[f"facecast.v1.{name}"]) - {"__oneofs__"}, name
    assert msgs["facecast.v1.Delivery"]["__oneofs__"] == {"kind": ["grpc", "livekit"]}
    assert msgs["facecast.v1.SessionInput"]["__oneofs__"] == {"input": ["attach", "audio", "control"]}
    assert msgs["facecast.v1.SessionOutput"]["__oneofs__"] == {"output": ["video_chunk", "event"]}
    assert info["enums"]["SessionState"] == ["SESSION_STATE_UNSPECIFIED", "CREATED", "STREAMING", "ENDED", "CLOSED",
                                             "FAILED"]
    assert info["enums"]["Event.Type"] == ["EVENT_TYPE_UNSPECIFIED", "ATTACHED", "INPUT_ENDED", "SESSION_ENDED",
                                           "BACKPRESSURE", "WARNING", "USER_SPEECH_STARTED", "USER_SPEECH_ENDED",
                                           "REPLY_STARTED", "DRAINING", "RESUMED"]
    assert info["enums"]["ConversationOptions.Mode"] == ["CONVERSATION_MODE_UNSPECIFIED", "REALTIME", "OFFLINE"]


def test_generated_field_types_and_package_exports():
    assert SERVICE_NAME == "facecast.v1.AvatarService"
    assert pb.DESCRIPTOR.services_by_name["AvatarService"].full_name == SERVICE_NAME
    assert pb.__name__ == "services.api.generated.facecast.v1.avatar_pb2"
    assert pb_grpc.__name__ == "services.api.generated.facecast.v1.avatar_pb2_grpc"
    fd = pb.VideoChunk.DESCRIPTOR.fields_by_name
    assert fd["frames"].is_repeated and fd["frames"].type == fd["frames"].TYPE_BYTES
    assert fd["pts_ms"].type == fd["pts_ms"].TYPE_UINT64 and fd["fps"].type == fd["fps"].TYPE_DOUBLE
    assert pb.ChunkStats.DESCRIPTOR.fields_by_name["stage_ms"].message_type.GetOptions().map_entry
    assert pb.Session.DESCRIPTOR.fields_by_name["created_at"].message_type.full_name == "google.protobuf.Timestamp"
    assert pb.SessionOptions.DESCRIPTOR.fields_by_name["seed"].has_presence
    assert pb.UpdateSessionRequest.DESCRIPTOR.fields_by_name["prompt"].has_presence
    gen = REPO / "services" / "api" / "generated"
    assert (gen / ".gitignore").read_text().split() == ["*", "!.gitignore"]
    assert not api_build.is_stale()


def test_stale_detection_follows_proto_content(tmp_path):
    protos = tmp_path / "protos"
    shutil.copytree(REPO / "protos" / "facecast", protos / "facecast")
    out = tmp_path / "gen"
    assert api_build.is_stale(out, protos)
    api_build.build(out_dir=out, proto_root=protos)
    assert not api_build.is_stale(out, protos)
    proto = protos / "facecast" / "v1" / "avatar.proto"
    proto.write_text(proto.read_text() + "\n// edited\n")
    assert api_build.is_stale(out, protos)
    api_build.build(out_dir=out, proto_root=protos)
    assert not api_build.is_stale(out, protos)
    proto.write_text(proto.read_text() + "\nmessage Broken {\n")
    with pytest.raises(api_build.BuildError, match="avatar.proto"):
        api_build.build(out_dir=out, proto_root=protos)
    assert (out / "facecast" / "v1" / "avatar_pb2.py").is_file()  # the last good build is left intact


def test_build_command_line_check():
    result = subprocess.run([sys.executable, "-m", "services.api.build", "--check"], cwd=REPO, capture_output=True,
                            text=True, timeout=60)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "up to date" in result.stdout


# ------------------------------------------------------------------------------------------------------------- #
# CreateSession validation
# ------------------------------------------------------------------------------------------------------------- #

def _create(**kwargs) -> pb.CreateSessionRequest:
    kwargs.setdefault("reference_image", _png())
    return pb.CreateSessionRequest(**kwargs)


def test_validate_create_fills_defaults():
    spec = validate_create(_create(prompt="hello"), PRESET_STREAM, ApiLimits())
    assert isinstance(spec, CreateSpec)
    assert spec.stream == PRESET_STREAM
    assert spec.image.mode == "RGB" and spec.image.size == (32, 24)
    assert spec.prompt == "hello" and spec.owner == "" and spec.characters == [FULL_FRAME]
    with pytest.raises(AttributeError):
        spec.prompt = "x"  # frozen


def test_validate_create_applies_options_characters_and_owner():
    request = _create(
        reference_image=_jpeg(),
        options=pb.SessionOptions(fps=30.0, width=128, steps=1, seed=0),
        characters=[pb.Character(region=pb.Region(x0=0.0, y0=0.1, x1=0.5, y1=0.9)),
                    pb.Character(region=pb.Region(x0=0.5, y0=0.1, x1=1.0, y1=0.9)),
                    pb.Character()],
        delivery=pb.Delivery(grpc=pb.GrpcStreamDelivery()),
        owner="tenant-42",
    )
    spec = validate_create(request, PRESET_STREAM, ApiLimits())
    assert spec.stream == PRESET_STREAM.replace(fps=30.0, width=128, steps=1, seed=0)
    assert spec.stream.height == 64 and spec.stream.chunk_latent_frames == 3  # unset -> preset default
    assert spec.characters == [(0.0, 0.1, 0.5, 0.9), (0.5, 0.1, 1.0, 0.9), FULL_FRAME]
    assert spec.owner == "tenant-42"
    # seed unset keeps the preset's seed
    assert validate_create(_create(options=pb.SessionOptions(steps=3)), PRESET_STREAM).stream.seed == 7


@pytest.mark.parametrize("options, field", [
    (dict(fps=500.0), "options.fps"),
    (dict(fps=float("nan")), "options.fps"),
    (dict(width=5000), "options.width"),
    (dict(height=8), "options.height"),
    (dict(steps=9), "options.steps"),
    (dict(chunk_latent_frames=30), "options.chunk_latent_frames"),
    (dict(seed=2**63), "options.seed"),
])
def test_validate_create_bad_options(options, field):
    message = _raises(INVALID, validate_create, _create(options=pb.SessionOptions(**options)), PRESET_STREAM,
                      ApiLimits())
    assert message.startswith(field + "="), message
    assert "invalid" in message


def test_validate_create_checks_resolution_against_the_preset():
    preset = get_preset("tiny")
    request = _create(options=pb.SessionOptions(width=72))
    message = _raises(INVALID, validate_create, request, preset.stream, ApiLimits(), preset=preset)
    assert message.startswith("options.width=72") and "multiple of" in message
    assert validate_create(_create(options=pb.SessionOptions(width=96)), preset.stream, preset=preset).stream.width \
        == 96


@pytest.mark.parametrize("data, expected", [
    (b"", "reference_image is required (PNG or JPEG bytes)"),
    (b"this is not an image", "reference_image"),
    (_png()[:40], "reference_image"),
])
def test_validate_create_bad_image(data, expected):
    message = _raises(INVALID, validate_create, _create(reference_image=data), PRESET_STREAM, ApiLimits())
    assert message.startswith(expected), message
    if data:
        assert "not a readable image" in message


def test_validate_create_image_size_limits():
    big = _png(64, 64)
    message = _raises(INVALID, validate_create, _create(reference_image=big), PRESET_STREAM,
                      ApiLimits(max_image_bytes=len(big) - 1))
    assert message.startswith("reference_image is") and "MiB" in message
    message = _raises(INVALID, validate_create, _create(reference_image=big), PRESET_STREAM,
                      ApiLimits(max_image_pixels=64 * 64 - 1))
    assert message.startswith("reference_image is 64x64 pixels")


def test_validate_create_prompt_owner_characters_delivery():
    limits = ApiLimits()
    message = _raises(INVALID, validate_create, _create(prompt="x" * 2001), PRESET_STREAM, limits)
    assert message.startswith("prompt") and "2000" in message
    assert validate_create(_create(prompt="x" * 2000), PRESET_STREAM, limits).prompt == "x" * 2000
    message = _raises(INVALID, validate_create, _create(owner="o" * 300), PRESET_STREAM, limits)
    assert message.startswith("owner")

    nine = [pb.Character() for _ in range(9)]
    message = _raises(INVALID, validate_create, _create(characters=nine), PRESET_STREAM, limits)
    assert message.startswith("characters") and "8" in message
    assert len(validate_create(_create(characters=nine[:8]), PRESET_STREAM, limits).characters) == 8

    for region in (dict(x0=0.6, y0=0.0, x1=0.4, y1=1.0), dict(x0=0.0, y0=0.0, x1=1.5, y1=1.0),
                   dict(x0=-0.1, y0=0.0, x1=0.5, y1=1.0), dict(x0=0.0, y0=0.5, x1=1.0, y1=0.5),
                   dict(x0=0.0, y0=0.0, x1=float("nan"), y1=1.0)):
        characters = [pb.Character(), pb.Character(region=pb.Region(**region))]
        message = _raises(INVALID, validate_create, _create(characters=characters), PRESET_STREAM, limits)
        assert message.startswith("characters[1].region"), message

    livekit = pb.Delivery(livekit=pb.LiveKitDelivery(room="r", identity="a"))
    message = _raises(grpc.StatusCode.FAILED_PRECONDITION, validate_create, _create(delivery=livekit), PRESET_STREAM,
                      limits)
    assert message.startswith("delivery.livekit: this server has no LiveKit configured")
    spec = validate_create(_create(delivery=livekit), PRESET_STREAM, limits, livekit=True)
    assert spec.delivery == {"kind": "livekit", "room": "r", "identity": "a", "also_stream": False,
                             "agent_identity": None}
    for room in ("", "a b", "x" * 129, "r/../s"):
        wanted = pb.Delivery(livekit=pb.LiveKitDelivery(room=room))
        message = _raises(INVALID, validate_create, _create(delivery=wanted), PRESET_STREAM, limits, livekit=True)
        assert message.startswith("delivery.livekit.room is invalid"), message


def test_validate_create_conversation_reply_characters():
    def create(characters: int, reply_characters=()):
        return _create(characters=[pb.Character() for _ in range(characters)], conversation=pb.ConversationOptions(
            mode=pb.ConversationOptions.OFFLINE, reply_characters=reply_characters))

    def voices(request):
        return validate_create(request, PRESET_STREAM, conversation_modes=("offline",)).conversation["reply_characters"]

    assert voices(create(0)) == [0] and voices(create(3)) == [0, 1, 2], "default: every character, in order"
    assert voices(create(3, [2, 0])) == [2, 0]
    for characters, wanted, expected in ((2, [0, 2], "conversation.reply_characters[1]=2 is out of range: the "
                                          "session has 2 character(s), allowed 0..1"),
                                         (0, [1], "conversation.reply_characters[0]=1 is out of range"),
                                         (3, [1, 1], "conversation.reply_characters[1]=1 repeats an earlier entry")):
        message = _raises(INVALID, validate_create, create(characters, wanted), PRESET_STREAM,
                          conversation_modes=("offline",))
        assert message.startswith(expected), message


# ------------------------------------------------------------------------------------------------------------- #
# Audio, control, update
# ------------------------------------------------------------------------------------------------------------- #

def _audio(samples: np.ndarray, rate: int = 16000, channels: int = 1, character: int = 0) -> pb.AudioInput:
    return pb.AudioInput(pcm_s16le=samples.astype("<i2").tobytes(), sample_rate_hz=rate, channels=channels,
                         character=character)


def test_validate_audio_mono_and_stereo_downmix():
    mono = np.array([0, 1000, -1000, 32767, -32768], dtype=np.int16)
    out, rate = validate_audio(_audio(mono), 1, None)
    assert rate == 16000 and out.dtype == np.int16 and np.array_equal(out, mono)
    left = np.array([100, -200, 32767, -32768], dtype=np.int16)
    right = np.array([300, -400, 32767, -32768], dtype=np.int16)
    stereo = np.stack([left, right], axis=1).reshape(-1)  # interleaved L R L R
    out, rate = validate_audio(_audio(stereo, rate=48000, channels=2, character=1), 2, 48000)
    assert rate == 48000 and out.dtype == np.int16
    assert out.tolist() == [200, -300, 32767, -32768]
    empty, _ = validate_audio(_audio(np.zeros(0, np.int16)), 1, 16000)
    assert empty.shape == (0,)


@pytest.mark.parametrize("kwargs, num_characters, session_rate, field", [
    (dict(rate=7999), 1, None, "audio.sample_rate_hz=7999"),
    (dict(rate=96001), 1, None, "audio.sample_rate_hz=96001"),
    (dict(rate=0), 1, None, "audio.sample_rate_hz=0"),
    (dict(channels=0), 1, None, "audio.channels=0"),
    (dict(channels=3), 1, None, "audio.channels=3"),
    (dict(character=1), 1, None, "audio.character=1"),
    (dict(character=5), 3, None, "audio.character=5"),
])
def test_validate_audio_errors(kwargs, num_characters, session_rate, field):
    message = _raises(INVALID, validate_audio, _audio(np.zeros(16, np.int16), **kwargs), num_characters,
                      session_rate)
    assert message.startswith(field), message
    if "sample_rate_hz" in field:
        assert "[8000, 96000]" in message
    if "channels" in field:
        assert "1 (mono) or 2" in message


def test_validate_audio_byte_length_rate_change_and_duration():
    odd = pb.AudioInput(pcm_s16le=b"\x00\x01\x02", sample_rate_hz=16000, channels=1)
    assert _raises(INVALID, validate_audio, odd, 1, None).startswith("audio.pcm_s16le")
    half_frame = pb.AudioInput(pcm_s16le=b"\x00" * 6, sample_rate_hz=16000, channels=2)
    message = _raises(INVALID, validate_audio, half_frame, 1, None)
    assert message.startswith("audio.pcm_s16le") and "multiple of 4" in message
    message = _raises(INVALID, validate_audio, _audio(np.zeros(10, np.int16), rate=44100), 1, 16000)
    assert message == "audio.sample_rate_hz=44100 differs from this session's 16000 Hz"
    ok, _ = validate_audio(_audio(np.zeros(8000 * 10, np.int16), rate=8000), 1, None)
    assert ok.shape == (80000,)
    message = _raises(INVALID, validate_audio, _audio(np.zeros(8000 * 10 + 1, np.int16), rate=8000), 1, None)
    assert message.startswith("audio.pcm_s16le") and "10 s" in message
    message = _raises(INVALID, validate_audio, _audio(np.zeros(8001, np.int16), rate=8000), 1, None,
                      ApiLimits(max_audio_s_per_message=1.0))
    assert message.startswith("audio.pcm_s16le")


def test_validate_control_and_update():
    control = pb.Control(speaking=[pb.SpeakingState(character=1, speaking=False)], end_of_input=True)
    assert validate_control(control, 2) == ([(1, False)], True)
    message = _raises(INVALID, validate_control, control, 1)
    assert message.startswith("control.speaking[0].character=1")

    update = pb.UpdateSessionRequest(session_id="s", session_token="t", prompt="",
                                     speaking=[pb.SpeakingState(character=0, speaking=True)])
    spec = validate_update(update, 1)
    assert spec.prompt == "" and spec.speaking == [(0, True)]  # "" is set: clears the prompt
    assert validate_update(pb.UpdateSessionRequest(session_id="s"), 1).prompt is None
    assert _raises(INVALID, validate_update, pb.UpdateSessionRequest(prompt="p" * 2001), 1).startswith("prompt")
    bad = pb.UpdateSessionRequest(speaking=[pb.SpeakingState(), pb.SpeakingState(character=4)])
    assert _raises(INVALID, validate_update, bad, 2).startswith("speaking[1].character=4")
    assert require_session_id("0123456789abcdef" * 2) == "0123456789abcdef" * 2
    assert _raises(INVALID, require_session_id, "", "attach.session_id") == "attach.session_id is required"
    for hostile in ("x" * 100_000, "abc", "0" * 31, "A" * 32, "0" * 32 + "\n", "../" + "0" * 29):
        message = _raises(INVALID, require_session_id, hostile)
        assert message.startswith("session_id is not a facecast session id") and len(message) < 200, message
        assert hostile not in message, "the value is not echoed"


# ------------------------------------------------------------------------------------------------------------- #
# Credentials
# ------------------------------------------------------------------------------------------------------------- #

RAW_KEYS = {"alpha": "k-alpha-123-0123456789", "beta": "k-beta-456-0123456789"}
KEYS = ApiKeyring.from_keys(RAW_KEYS)


def test_check_api_key_accepts_both_header_forms_and_names_the_key():
    assert check_api_key([], ApiKeyring()) is None  # no keys configured: open
    assert check_api_key(None, ApiKeyring()) is None
    assert check_api_key([("authorization", "Bearer k-alpha-123-0123456789")], KEYS) == "alpha"
    assert check_api_key([("authorization", "bearer   k-beta-456-0123456789 ")], KEYS) == "beta"
    assert check_api_key([("x-api-key", "k-beta-456-0123456789")], KEYS) == "beta"
    assert check_api_key([("user-agent", "grpc"), ("X-Api-Key", "k-alpha-123-0123456789")], KEYS) == "alpha"
    assert check_api_key([("bin-bin", b"\x00"), ("authorization", "Bearer wrong"),
                          ("x-api-key", "k-alpha-123-0123456789")], KEYS) == "alpha"


def test_the_keyring_holds_digests_only_and_compares_them_all():
    """No key text is kept; match hashes the presented key once and looks at every stored digest (a match on the
    first key takes the same comparisons as one on the last, or none)."""
    import hashlib
    import hmac

    assert all(len(digest) == 32 and isinstance(digest, bytes) for _, digest in KEYS.entries)
    assert not any(key.encode() in digest for key in RAW_KEYS.values() for _, digest in KEYS.entries)
    assert KEYS.hashes()["alpha"] == "sha256:" + hashlib.sha256(b"k-alpha-123-0123456789").hexdigest()
    calls, compare = [], hmac.compare_digest

    def counting(a, b):
        calls.append((a, b))
        return compare(a, b)

    ring = ApiKeyring.from_keys({f"k{i}": f"key-number-{i}-0123456789" for i in range(5)})
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr("services.api.keys.hmac.compare_digest", counting)
        for presented, name in (("key-number-0-0123456789", "k0"), ("key-number-4-0123456789", "k4"),
                                ("nothing-like-a-key-000", None)):
            calls.clear()
            assert ring.match(presented) == name
            assert len(calls) == 5 and all(len(a) == len(b) == 32 for a, b in calls)


@pytest.mark.parametrize("metadata", [
    [],
    [("user-agent", "grpc-python")],
    [("authorization", "Bearer not-a-key-999")],
    [("authorization", "Basic k-alpha-123-0123456789")],
    [("authorization", "k-alpha-123-0123456789")],
    [("x-api-key", "k-alpha-123-01234567890")],
    [("x-api-key", "")],
    [("authorization", "Bearer ")],
])
def test_check_api_key_rejects_without_echoing(metadata):
    message = _raises(grpc.StatusCode.UNAUTHENTICATED, check_api_key, metadata, KEYS)
    assert "authorization: Bearer <api key>" in message and "x-api-key: <api key>" in message
    for _, value in metadata:
        secret = value.split()[-1] if value.strip() else None
        if secret and secret.lower() not in ("bearer", "grpc-python"):
            assert secret not in message
    for key in RAW_KEYS.values():
        assert key not in message


def test_tokens():
    token, digest = new_token()
    assert len(token) >= 40 and digest == hash_token(token) and len(digest) == 64
    assert new_token()[0] != token
    check_token(digest, token)
    check_token(digest.upper(), token)
    message = _raises(grpc.StatusCode.PERMISSION_DENIED, check_token, digest, token + "x")
    assert token not in message
    assert _raises(grpc.StatusCode.PERMISSION_DENIED, check_token, digest, "").startswith("session_token")


def test_session_to_proto():
    stream = PRESET_STREAM.replace(fps=30.0, width=128)
    s = session_to_proto("sess-1", "STREAMING", stream, [(0.0, 0.0, 0.5, 1.0), FULL_FRAME], 1700000000.25, 3, 33,
                         session_token="tok", prompt="p", owner="o")
    assert s.session_id == "sess-1" and s.session_token == "tok" and s.state == pb.STREAMING
    assert (s.options.fps, s.options.width, s.options.height, s.options.steps, s.options.chunk_latent_frames) == \
        (30.0, 128, 64, 2, 3)
    assert s.options.HasField("seed") and s.options.seed == 7
    assert [(c.region.x0, c.region.x1) for c in s.characters] == [(0.0, 0.5), (0.0, 1.0)]
    assert s.created_at.seconds == 1700000000 and s.created_at.nanos == 250_000_000
    assert (s.chunks_emitted, s.frames_emitted, s.prompt, s.owner) == (3, 33, "p", "o")
    assert session_to_proto("x", "SESSION_STATE_CLOSED", stream).state == pb.CLOSED
    assert session_to_proto("x", "failed", stream).state == pb.FAILED
    assert session_to_proto("x", pb.ENDED, stream).state == pb.ENDED
    with pytest.raises(ValueError):
        session_to_proto("x", "BOGUS", stream)


# ------------------------------------------------------------------------------------------------------------- #
# Real gRPC over loopback
# ------------------------------------------------------------------------------------------------------------- #

class _Servicer(pb_grpc.AvatarServiceServicer):
    def __init__(self, api_keys: ApiKeyring = ApiKeyring()):
        self.api_keys = api_keys

    def CreateSession(self, request, context):
        try:
            check_api_key(context.invocation_metadata(), self.api_keys)
            spec = validate_create(request, PRESET_STREAM, ApiLimits())
        except ApiError as err:
            context.abort(err.code, err.message)
        token, _ = new_token()
        return session_to_proto("sess-1", "CREATED", spec.stream, spec.characters, 1.5, session_token=token,
                                prompt=spec.prompt, owner=spec.owner)


@pytest.fixture
def channel():
    from grpc_health.v1 import health, health_pb2, health_pb2_grpc
    from grpc_reflection.v1alpha import reflection

    server = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
    keys = ApiKeyring.from_keys({"ops": "secret-key-0123456789"})
    pb_grpc.add_AvatarServiceServicer_to_server(_Servicer(keys), server)
    health_servicer = health.HealthServicer()
    health_servicer.set(SERVICE_NAME, health_pb2.HealthCheckResponse.SERVING)
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    reflection.enable_server_reflection((SERVICE_NAME, reflection.SERVICE_NAME), server)
    port = server.add_insecure_port("127.0.0.1:0")
    assert port > 0
    server.start()
    with grpc.insecure_channel(f"127.0.0.1:{port}") as ch:
        yield ch
    server.stop(grace=None)


def test_grpc_loopback_status_codes(channel):
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    stub = pb_grpc.AvatarServiceStub(channel)
    auth = (("authorization", "Bearer secret-key-0123456789"),)

    with pytest.raises(grpc.RpcError) as info:
        stub.CreateSession(pb.CreateSessionRequest(reference_image=b"GIF89a nope"), metadata=auth, timeout=10)
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert info.value.details().startswith("reference_image")

    with pytest.raises(grpc.RpcError) as info:
        stub.CreateSession(pb.CreateSessionRequest(reference_image=_png()), timeout=10)
    assert info.value.code() == grpc.StatusCode.UNAUTHENTICATED
    assert "x-api-key" in info.value.details()

    livekit = pb.Delivery(livekit=pb.LiveKitDelivery(room="call-7"))
    with pytest.raises(grpc.RpcError) as info:
        stub.CreateSession(pb.CreateSessionRequest(reference_image=_png(), delivery=livekit),
                           metadata=(("x-api-key", "secret-key-0123456789"),), timeout=10)
    assert info.value.code() == grpc.StatusCode.FAILED_PRECONDITION

    session = stub.CreateSession(pb.CreateSessionRequest(reference_image=_png(), prompt="hi",
                                                         options=pb.SessionOptions(fps=30.0)),
                                 metadata=auth, timeout=10)
    assert session.state == pb.CREATED and session.session_token and session.prompt == "hi"
    assert (session.options.fps, session.options.width, session.options.steps) == (30.0, 64, 2)

    with pytest.raises(grpc.RpcError) as info:  # the minimal servicer leaves the rest unimplemented
        stub.GetSession(pb.GetSessionRequest(session_id="sess-1"), metadata=auth, timeout=10)
    assert info.value.code() == grpc.StatusCode.UNIMPLEMENTED

    health = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(service=SERVICE_NAME),
                                                       timeout=10)
    assert health.status == health_pb2.HealthCheckResponse.SERVING


def test_the_decoder_option_is_offered_only_where_the_server_has_it():
    request = _create(options=pb.SessionOptions(decoder="fast"))
    both = validate_create(request, PRESET_STREAM, ApiLimits(), decoders=("full", "fast"))
    assert both.stream.decoder == "fast"
    message = _raises(INVALID, validate_create, request, PRESET_STREAM, ApiLimits())
    assert message == "options.decoder='fast' is invalid; allowed on this server: full"
    message = _raises(INVALID, validate_create, _create(options=pb.SessionOptions(decoder="tiny")), PRESET_STREAM,
                      ApiLimits(), decoders=("full", "fast"))
    assert message == "options.decoder='tiny' is invalid; allowed on this server: full, fast"
    # unset: the server's default, reported back in the session's options
    assert validate_create(_create(), PRESET_STREAM.replace(decoder="fast"), ApiLimits()).stream.decoder == "fast"


def test_the_listening_hold_is_a_session_option_with_its_range_named():
    held = validate_create(_create(options=pb.SessionOptions(listening_hold=0.25)), PRESET_STREAM, ApiLimits())
    assert held.stream.listening_hold == 0.25
    assert validate_create(_create(options=pb.SessionOptions(listening_hold=1.0)), PRESET_STREAM,
                           ApiLimits()).stream.listening_hold == 1.0                  # off
    assert validate_create(_create(), PRESET_STREAM, ApiLimits()).stream.listening_hold == \
        PRESET_STREAM.listening_hold == 0.5                                            # unset: the server's
    for bad in (0.0, 1.5, -1.0):
        message = _raises(INVALID, validate_create, _create(options=pb.SessionOptions(listening_hold=bad)),
                          PRESET_STREAM, ApiLimits())
        assert message == f"options.listening_hold={bad!r} is invalid: must be in (0, 1] (1: off)"


# ------------------------------------------------------------------------------------------------------------- #
# Stream budgets and configurable limits
# ------------------------------------------------------------------------------------------------------------- #

def test_an_input_budget_allows_a_burst_then_the_rate_and_refuses_beyond_naming_the_limit():
    from services.api.validation import InputBudget

    limits = ApiLimits(max_audio_rate=2.0, audio_burst_s=3.0, max_messages_per_s=10.0, message_burst=5)
    budget = InputBudget(limits, started=100.0)
    for _ in range(5):
        budget.take(now=100.0)                     # the message burst
    message = _raises(grpc.StatusCode.RESOURCE_EXHAUSTED, budget.take, 0.0, 100.0)
    assert "at most 10 per second after a burst of 5" in message
    budget.take(now=100.2)                         # 0.2 s later: two more messages
    budget.take(now=100.2)
    audio = InputBudget(limits, started=0.0)
    audio.take(3.0, now=0.0)                       # three seconds ahead: the burst
    message = _raises(grpc.StatusCode.RESOURCE_EXHAUSTED, audio.take, 0.1, 0.0)
    assert "faster than 2x real time (after 3 s ahead)" in message
    audio.take(2.0, now=1.0)                       # one second later: two more seconds of audio
    assert _raises(grpc.StatusCode.RESOURCE_EXHAUSTED, audio.take, 0.1, 1.0)
    assert audio.audio_s == 5.0 and audio.messages == 2, "a refused message is not counted"


@pytest.mark.parametrize("values, needle", [
    ({"max_image_byte": 1}, "limits: unknown field(s) ['max_image_byte']"),
    ({"max_image_bytes": 0}, "limits.max_image_bytes=0 is invalid: a whole number >= 1"),
    ({"max_audio_rate": float("nan")}, "limits.max_audio_rate=nan is invalid: a number > 0"),
    ({"message_burst": 2.5}, "limits.message_burst=2.5 is invalid"),
])
def test_limits_from_a_config_name_the_bad_field(values, needle):
    from model_core.config import ConfigError

    with pytest.raises(ConfigError, match=re.escape(needle)):
        ApiLimits.from_config(values)
    assert ApiLimits.from_config({"max_image_bytes": 1000}).max_image_bytes == 1000


def test_bytes_that_do_not_parse_reach_the_servicer_marked_and_get_invalid_argument():
    """gRPC's own answer to a corrupt request is UNKNOWN; registered through services.api.servicer the servicer
    sees a marked empty message (the mark survives pickling, as across Ray) and answers INVALID_ARGUMENT."""
    import pickle

    from services.api import servicer

    class Servicer:
        def __getattr__(self, name):
            def handle(request, context):
                try:
                    servicer.require_decodable(request, "facecast.v1." + type(request).__name__)
                except ApiError as error:
                    context.abort(error.code, error.message)
                return pb.Session(session_id=request.session_id)
            return handle

    server = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
    servicer.add_AvatarServiceServicer_to_server(Servicer(), server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    try:
        with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
            call = channel.unary_unary("/facecast.v1.AvatarService/GetSession")
            good = pb.GetSessionRequest(session_id="a" * 32).SerializeToString()
            assert pb.Session.FromString(call(good, timeout=10)).session_id == "a" * 32
            assert pb.Session.FromString(call(good + b"\xf8\x06\x2a", timeout=10)).session_id == "a" * 32
            with pytest.raises(grpc.RpcError) as caught:
                call(good[:-1], timeout=10)
    finally:
        server.stop(None)
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert caught.value.details().startswith("the request is not a valid facecast.v1.GetSessionRequest (")
    marked = servicer._lenient(pb.SessionInput)(b"\x0a\x05ab")
    assert servicer.undecodable(pickle.loads(pickle.dumps(marked))) is not None
    assert servicer.undecodable(pb.SessionInput()) is None
