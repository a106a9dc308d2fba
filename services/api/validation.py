"""Request validation for the public gRPC API: every bad input becomes an `ApiError` with the exact status code.

Servicers call these functions first and turn an `ApiError` into the RPC's status:

    try:
        spec = validate_create(request, preset.stream, limits, preset=preset)
    except ApiError as err:
        context.abort(err.code, err.message)          # grpc.aio: await context.abort(err.code, err.message)

Messages name the offending field the way the client spells it (`options.fps`, `characters[1].region`,
`audio.sample_rate_hz`) together with the bad value and what is allowed; secrets (API keys, tokens) are never
echoed. Status codes: INVALID_ARGUMENT for malformed input, FAILED_PRECONDITION for LiveKit delivery on a server
without LiveKit configured, UNAUTHENTICATED for a missing/unknown API key, PERMISSION_DENIED for a wrong session
token. NOT_FOUND and RESOURCE_EXHAUSTED belong to the session registry / admission control, which raise `ApiError`
themselves.

Nothing here touches torch, Ray or the engine; the image is decoded with `services.media.decode_image_bytes`, and a
session token is hashed by `services.store.sessions.hash_token` (the store owns what it stores).
"""

from __future__ import annotations

import dataclasses
import hashlib
import hmac
import io
import math
import re
import secrets
import time
from collections.abc import Sequence
from dataclasses import dataclass, field

import grpc
import numpy as np
import PIL.Image

from model_core.config import ConfigError, PresetConfig, StreamConfig
from services.media import MediaError, decode_image_bytes
from services.store.sessions import hash_token

FULL_FRAME: tuple[float, float, float, float] = (0.0, 0.0, 1.0, 1.0)
MIN_SAMPLE_RATE_HZ = 8000
MAX_SAMPLE_RATE_HZ = 96000
_OPTION_FIELDS = ("fps", "width", "height", "steps", "chunk_latent_frames")  # 0 means "server default"


class ApiError(Exception):
    """A request the API refuses: `code` is the gRPC status to return, `message` the client-facing detail."""

    def __init__(self, code: grpc.StatusCode, message: str):
        super().__init__(f"{code.name}: {message}")
        self.code = code
        self.message = message


_LIVEKIT_NAME = re.compile(r"[A-Za-z0-9_.\-]{1,128}")


def _invalid(message: str) -> ApiError:
    return ApiError(grpc.StatusCode.INVALID_ARGUMENT, message)


@dataclass(frozen=True)
class ApiLimits:
    """Per-request and per-stream limits; messages quote them. Each may be set in the Serve config's application
    args (`limits: {max_image_bytes: ...}`, `AppSettings.limits`)."""

    max_image_bytes: int = 10 * 2**20
    """Largest encoded reference image accepted."""
    max_prompt_chars: int = 2000
    """Longest prompt (CreateSession and UpdateSession)."""
    max_audio_s_per_message: float = 10.0
    """Most seconds of audio in one AudioInput message."""
    max_characters: int = 8
    """Most on-screen characters per session."""
    max_image_pixels: int = 40_000_000
    """Largest decoded reference image (width x height), checked from the header before decoding."""
    max_owner_chars: int = 256
    """Longest `owner` string."""
    max_audio_rate: float = 16.0
    """How much faster than real time one stream may send audio, after `audio_burst_s` (time spent paused by
    backpressure counts, so a client sending as fast as it is read is never refused)."""
    audio_burst_s: float = 30.0
    """Seconds of audio a stream may send ahead of `max_audio_rate` x the time since it attached."""
    max_messages_per_s: float = 200.0
    """StreamSession messages per second, after `message_burst` (40 ms audio pieces in real time are 25/s)."""
    message_burst: int = 400
    """Messages a stream may send ahead of `max_messages_per_s` x the time since it attached."""

    def __post_init__(self) -> None:
        for name in ("max_image_bytes", "max_prompt_chars", "max_characters", "max_image_pixels", "max_owner_chars",
                     "message_burst"):
            if not isinstance(getattr(self, name), int) or getattr(self, name) < 1:
                raise ConfigError(f"limits.{name}={getattr(self, name)!r} is invalid: a whole number >= 1")
        for name in ("max_audio_s_per_message", "max_audio_rate", "audio_burst_s", "max_messages_per_s"):
            value = getattr(self, name)
            if not isinstance(value, (int, float)) or not math.isfinite(value) or value <= 0:
                raise ConfigError(f"limits.{name}={value!r} is invalid: a number > 0")

    @classmethod
    def from_config(cls, values: dict | None) -> "ApiLimits":
        """ApiLimits from the config's `limits:` mapping; ConfigError naming an unknown field."""
        values = dict(values or {})
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise ConfigError(f"limits: unknown field(s) {unknown}; allowed: {sorted(known)}")
        return cls(**values)


@dataclass
class InputBudget:
    """How fast one StreamSession may send (`ApiLimits.max_audio_rate`, `max_messages_per_s` and their bursts),
    counted from the attach. `take` raises RESOURCE_EXHAUSTED naming the limit when a message would exceed it."""

    limits: ApiLimits
    started: float = field(default_factory=time.monotonic)
    audio_s: float = 0.0
    messages: int = 0

    def take(self, audio_s: float = 0.0, now: float | None = None) -> None:
        elapsed = (time.monotonic() if now is None else now) - self.started
        limits = self.limits
        if self.messages + 1 > limits.message_burst + limits.max_messages_per_s * elapsed:
            raise ApiError(grpc.StatusCode.RESOURCE_EXHAUSTED,
                           f"too many messages: at most {limits.max_messages_per_s:g} per second after a burst of "
                           f"{limits.message_burst} (send audio in pieces of 20 ms or more); re-attach to go on")
        if self.audio_s + audio_s > limits.audio_burst_s + limits.max_audio_rate * elapsed:
            raise ApiError(grpc.StatusCode.RESOURCE_EXHAUSTED,
                           f"audio arrives faster than {limits.max_audio_rate:g}x real time (after "
                           f"{limits.audio_burst_s:g} s ahead); pace it, then re-attach to go on")
        self.messages += 1
        self.audio_s += audio_s


@dataclass(frozen=True)
class CreateSpec:
    """A validated CreateSession request, ready for the session manager."""

    image: PIL.Image.Image
    """The reference image, decoded to RGB (not yet cropped or resized)."""
    prompt: str
    stream: StreamConfig
    """Effective stream options: the preset's defaults with the request's options applied."""
    characters: list[tuple[float, float, float, float]] = field(default_factory=lambda: [FULL_FRAME])
    """Regions (x0, y0, x1, y1) in fractions of the frame; one full-frame character when none were given."""
    owner: str = ""
    conversation: dict | None = None
    """None, or {"mode": "realtime", "instructions": str}: the caller talks to an audio LLM through the avatar."""
    delivery: dict = field(default_factory=lambda: {"kind": "grpc"})
    """{"kind": "grpc"} or {"kind": "livekit", "room", "identity" (None: the server's default), "also_stream",
    "agent_identity" (None: the client streams the audio; set: a voice agent's avatar)}."""


@dataclass(frozen=True)
class UpdateSpec:
    """A validated UpdateSession request: `prompt` is None when unchanged; `speaking` as (character, speaking)."""

    prompt: str | None
    speaking: list[tuple[int, bool]]


# --------------------------------------------------------------------------------------------------------------- #
# CreateSession
# --------------------------------------------------------------------------------------------------------------- #

def _check_prompt(prompt: str, limits: ApiLimits) -> str:
    if len(prompt) > limits.max_prompt_chars:
        raise _invalid(f"prompt is {len(prompt)} characters long; at most {limits.max_prompt_chars} are allowed")
    return prompt


def _apply_options(request, preset_stream: StreamConfig, preset: PresetConfig | None,
                   decoders: tuple[str, ...] = ("full",)) -> StreamConfig:
    stream = preset_stream
    if request.HasField("options"):
        options = request.options
        changes: dict = {}
        for name in _OPTION_FIELDS:
            value = getattr(options, name)
            if value:  # 0 / unset -> server default
                changes[name] = float(value) if name == "fps" else int(value)
        if options.HasField("seed"):
            changes["seed"] = int(options.seed)
        if options.HasField("listening_hold"):
            changes["listening_hold"] = float(options.listening_hold)
        if options.decoder:
            if options.decoder not in decoders:
                raise _invalid(f"options.decoder={options.decoder!r} is invalid; allowed on this server: "
                               f"{', '.join(decoders)}")
            changes["decoder"] = options.decoder
        for name, value in changes.items():  # one at a time, so the error names the exact field
            try:
                stream.replace(**{name: value})
            except ConfigError as exc:
                text = str(exc)
                raise _invalid(f"options.{text}" if text.startswith(f"{name}=") else f"options.{name}: {text}") \
                    from None
        try:
            stream = stream.replace(**changes)
        except ConfigError as exc:  # pragma: no cover - every field was checked alone above
            raise _invalid(f"options: {exc}") from None
    if preset is not None:
        try:
            preset.check_resolution(stream)
        except ConfigError as exc:
            raise _invalid(f"options.{exc}") from None
    return stream


def _check_characters(request, limits: ApiLimits) -> list[tuple[float, float, float, float]]:
    n = len(request.characters)
    if n > limits.max_characters:
        raise _invalid(f"characters has {n} entries; at most {limits.max_characters} are allowed")
    if n == 0:
        return [FULL_FRAME]
    regions = []
    for i, character in enumerate(request.characters):
        if not character.HasField("region"):
            regions.append(FULL_FRAME)
            continue
        r = character.region
        # proto floats are float32: round so 0.3 stays 0.3 in logs and in the Session we send back
        x0, y0, x1, y1 = (round(float(v), 6) for v in (r.x0, r.y0, r.x1, r.y1))
        if not (0.0 <= x0 < x1 <= 1.0 and 0.0 <= y0 < y1 <= 1.0):
            raise _invalid(f"characters[{i}].region=(x0={x0:g}, y0={y0:g}, x1={x1:g}, y1={y1:g}) is invalid: need "
                           "0 <= x0 < x1 <= 1 and 0 <= y0 < y1 <= 1 (fractions of width and height)")
        regions.append((x0, y0, x1, y1))
    return regions


def _check_image(data: bytes, limits: ApiLimits) -> PIL.Image.Image:
    if not data:
        raise _invalid("reference_image is required (PNG or JPEG bytes)")
    if len(data) > limits.max_image_bytes:
        raise _invalid(f"reference_image is {len(data) / 2**20:.1f} MiB; at most "
                       f"{limits.max_image_bytes / 2**20:g} MiB is allowed")
    try:  # header only: refuse huge pixel counts before the full decode allocates them
        with PIL.Image.open(io.BytesIO(data)) as probe:
            width, height = probe.size
    except Exception:  # not an image at all: decode_image_bytes below gives the precise message
        width = height = 0
    if width * height > limits.max_image_pixels:
        raise _invalid(f"reference_image is {width}x{height} pixels; at most {limits.max_image_pixels:,} pixels "
                       "are allowed")
    try:
        return decode_image_bytes(data, name="reference_image")
    except MediaError as exc:
        text = str(exc)
        raise _invalid(text if text.startswith("reference_image") else f"reference_image: {text}") from None


def validate_create(request, preset_stream: StreamConfig, limits: ApiLimits = ApiLimits(), *,
                    preset: PresetConfig | None = None, decoders: tuple[str, ...] = ("full",),
                    livekit: bool = False, conversation_modes: tuple[str, ...] = ()) -> CreateSpec:
    """Check a `CreateSessionRequest` and resolve it against the server's defaults.

    `preset_stream` supplies the defaults for unset options; pass `preset` too to also check that width and
    height tile into the model's patches; `decoders`: the decoders this server offers (`options.decoder`);
    `livekit`: whether this server has LiveKit configured; `conversation_modes`: the conversation modes it offers
    ("realtime", "offline"). Cheap checks run first; the
    image is decoded last.

    Raises:
        ApiError: FAILED_PRECONDITION for LiveKit delivery on a server without LiveKit; INVALID_ARGUMENT naming the
        field for anything else.
    """
    delivery = _check_delivery(request, livekit)
    conversation = _check_conversation(request, conversation_modes, limits, max(1, len(request.characters)))
    if len(request.owner) > limits.max_owner_chars:
        raise _invalid(f"owner is {len(request.owner)} characters long; at most {limits.max_owner_chars} "
                       "are allowed")
    prompt = _check_prompt(request.prompt, limits)
    stream = _apply_options(request, preset_stream, preset, decoders)
    characters = _check_characters(request, limits)
    image = _check_image(request.reference_image, limits)
    return CreateSpec(image=image, prompt=prompt, stream=stream, characters=characters, owner=request.owner,
                      delivery=delivery, conversation=conversation)


MAX_INSTRUCTIONS_CHARS = 4000


def _check_conversation(request, modes: tuple[str, ...], limits: ApiLimits, num_characters: int) -> dict | None:
    if not request.HasField("conversation") or not request.conversation.mode:
        return None
    wanted = request.conversation
    names = {wanted.REALTIME: "realtime", wanted.OFFLINE: "offline"}
    if wanted.mode not in names:
        raise _invalid(f"conversation.mode={wanted.mode} is invalid: allowed REALTIME (1), OFFLINE (2)")
    mode = names[wanted.mode]
    if mode not in modes:
        why = ("this server has no realtime LLM configured (its realtime_url and OPENAI_API_KEY)" if mode == "realtime"
               else "this server does not offer the on-server cascade (offline_conversation is off, or its "
                    "packages are not installed: `make cascade`)")
        raise ApiError(grpc.StatusCode.FAILED_PRECONDITION, f"conversation.mode={mode.upper()}: {why}")
    if len(wanted.instructions) > MAX_INSTRUCTIONS_CHARS:
        raise _invalid(f"conversation.instructions is {len(wanted.instructions)} characters long; at most "
                       f"{MAX_INSTRUCTIONS_CHARS} are allowed")
    voices = [int(c) for c in wanted.reply_characters] or list(range(num_characters))
    for i, character in enumerate(voices):
        if character >= num_characters:
            raise _invalid(f"conversation.reply_characters[{i}]={character} is out of range: the session has "
                           f"{num_characters} character(s), allowed 0..{num_characters - 1}")
        if character in voices[:i]:
            raise _invalid(f"conversation.reply_characters[{i}]={character} repeats an earlier entry; each "
                           "character answers once per round")
    return {"mode": mode, "instructions": wanted.instructions, "reply_characters": voices}


def _check_delivery(request, livekit: bool) -> dict:
    if not request.HasField("delivery") or request.delivery.WhichOneof("kind") != "livekit":
        return {"kind": "grpc"}
    if not livekit:
        raise ApiError(grpc.StatusCode.FAILED_PRECONDITION, "delivery.livekit: this server has no LiveKit "
                       "configured (its livekit_url and LIVEKIT_API_KEY / LIVEKIT_API_SECRET); leave delivery unset "
                       "to receive video on StreamSession")
    wanted = request.delivery.livekit
    for name, value, required in (("room", wanted.room, True), ("identity", wanted.identity, False),
                                  ("agent_identity", wanted.agent_identity, False)):
        if not value and not required:
            continue
        if not _LIVEKIT_NAME.fullmatch(value):
            raise _invalid(f"delivery.livekit.{name} is invalid: 1 to 128 characters of letters, digits, '-', '_' "
                           f"and '.' (got {len(value)} characters)")
    if wanted.agent_identity and wanted.agent_identity == wanted.identity:
        raise _invalid("delivery.livekit.agent_identity is the avatar's own identity; the avatar needs one of its own")
    return {"kind": "livekit", "room": wanted.room, "identity": wanted.identity or None,
            "also_stream": bool(wanted.also_stream), "agent_identity": wanted.agent_identity or None}


# --------------------------------------------------------------------------------------------------------------- #
# StreamSession / UpdateSession
# --------------------------------------------------------------------------------------------------------------- #

def validate_audio(msg, num_characters: int, session_rate_hz: int | None,
                   limits: ApiLimits = ApiLimits()) -> tuple[np.ndarray, int]:
    """Check an `AudioInput` and decode it to mono int16 samples.

    `session_rate_hz` is the rate of the session's first audio message (None before it). Stereo is downmixed by
    averaging the two channels. Returns (samples [N] int16, sample_rate_hz); an empty message gives N = 0.

    Raises:
        ApiError: INVALID_ARGUMENT naming audio.sample_rate_hz, audio.channels, audio.pcm_s16le or
        audio.character.
    """
    rate = int(msg.sample_rate_hz)
    if not MIN_SAMPLE_RATE_HZ <= rate <= MAX_SAMPLE_RATE_HZ:
        raise _invalid(f"audio.sample_rate_hz={rate} is invalid: must be in [{MIN_SAMPLE_RATE_HZ}, "
                       f"{MAX_SAMPLE_RATE_HZ}] Hz")
    channels = int(msg.channels)
    if channels not in (1, 2):
        raise _invalid(f"audio.channels={channels} is invalid: must be 1 (mono) or 2 (interleaved stereo)")
    data = msg.pcm_s16le
    frame_bytes = 2 * channels
    if len(data) % frame_bytes:
        raise _invalid(f"audio.pcm_s16le has {len(data)} bytes, not a multiple of {frame_bytes} "
                       f"(16-bit samples x {channels} channel{'s' if channels > 1 else ''})")
    character = int(msg.character)
    if character >= num_characters:
        raise _invalid(f"audio.character={character} is invalid: this session has {num_characters} "
                       f"character{'s' if num_characters != 1 else ''} (valid: 0..{num_characters - 1})")
    if session_rate_hz is not None and rate != session_rate_hz:
        raise _invalid(f"audio.sample_rate_hz={rate} differs from this session's {session_rate_hz} Hz")
    frames = len(data) // frame_bytes
    if frames > limits.max_audio_s_per_message * rate:
        raise _invalid(f"audio.pcm_s16le holds {frames / rate:.2f} s of audio; at most "
                       f"{limits.max_audio_s_per_message:g} s per message are allowed (send smaller pieces)")
    samples = np.frombuffer(data, dtype="<i2")
    if channels == 2:
        pairs = samples.reshape(-1, 2).astype(np.int32)
        mono = ((pairs[:, 0] + pairs[:, 1]) // 2).astype(np.int16)
    else:
        mono = samples.astype(np.int16)  # native byte order, writable copy
    return mono, rate


def _check_speaking(speaking, num_characters: int, field_name: str) -> list[tuple[int, bool]]:
    out = []
    for i, state in enumerate(speaking):
        if state.character >= num_characters:
            raise _invalid(f"{field_name}[{i}].character={state.character} is invalid: this session has "
                           f"{num_characters} character{'s' if num_characters != 1 else ''} "
                           f"(valid: 0..{num_characters - 1})")
        out.append((int(state.character), bool(state.speaking)))
    return out


def validate_control(msg, num_characters: int) -> tuple[list[tuple[int, bool]], bool]:
    """Check a `Control` message; returns ([(character, speaking), ...], end_of_input)."""
    return _check_speaking(msg.speaking, num_characters, "control.speaking"), bool(msg.end_of_input)


def validate_update(request, num_characters: int, limits: ApiLimits = ApiLimits()) -> UpdateSpec:
    """Check an `UpdateSessionRequest` (ids and token are checked by `require_session_id` / `check_token`)."""
    prompt = _check_prompt(request.prompt, limits) if request.HasField("prompt") else None
    return UpdateSpec(prompt=prompt, speaking=_check_speaking(request.speaking, num_characters, "speaking"))


_SESSION_ID = re.compile(r"[0-9a-f]{32}")


def require_session_id(session_id: str, field_name: str = "session_id") -> str:
    """INVALID_ARGUMENT when a request's session id is empty or not of the form facecast issues (32 lowercase hex
    characters); the value is never echoed (a hostile id of any length stays out of the status). An unknown id of the
    right form is the registry's NOT_FOUND."""
    if not session_id:
        raise _invalid(f"{field_name} is required")
    if not _SESSION_ID.fullmatch(session_id):
        raise _invalid(f"{field_name} is not a facecast session id (32 lowercase hex characters, as CreateSession "
                       f"returns; got {len(session_id)} characters)")
    return session_id


# --------------------------------------------------------------------------------------------------------------- #
# Credentials
# --------------------------------------------------------------------------------------------------------------- #

_KEY_HINT = "send metadata 'authorization: Bearer <api key>' or 'x-api-key: <api key>'"


def check_api_key(metadata: Sequence[tuple[str, str]] | None, keyring) -> str | None:
    """Require a key of `keyring` (`services.api.keys.ApiKeyring`) in the call's metadata; returns the matching
    key's name (None, and no check, when the keyring is empty).

    Accepts `authorization: Bearer <key>` (scheme case-insensitive) or `x-api-key: <key>`. Keys are compared as
    SHA-256 digests in constant time and never appear in error messages.

    Raises:
        ApiError: UNAUTHENTICATED when no key is sent or none of the sent keys is valid.
    """
    if not keyring:
        return None
    presented: list[str] = []
    malformed_authorization = False
    for key, value in metadata or ():
        if isinstance(value, bytes):  # binary (-bin) metadata never carries keys
            continue
        name = key.lower()
        if name == "x-api-key":
            presented.append(value.strip())
        elif name == "authorization":
            scheme, _, credential = value.strip().partition(" ")
            if scheme.lower() == "bearer" and credential.strip():
                presented.append(credential.strip())
            else:
                malformed_authorization = True
    if not presented:
        if malformed_authorization:
            raise ApiError(grpc.StatusCode.UNAUTHENTICATED,
                           f"authorization metadata must have the form 'Bearer <api key>'; {_KEY_HINT}")
        raise ApiError(grpc.StatusCode.UNAUTHENTICATED, f"missing API key: {_KEY_HINT}")
    for candidate in presented[:4]:   # a flood of keys in one call is not a faster way to guess
        name = keyring.match(candidate)
        if name is not None:
            return name
    raise ApiError(grpc.StatusCode.UNAUTHENTICATED, f"invalid API key: {_KEY_HINT} with a key this server accepts")


INTERNAL_KEY_HEADER = "x-facecast-internal"
"""The metadata key `facecast serve`'s front door adds (`services.serving.front_door`)."""


def check_internal_key(metadata: Sequence[tuple[str, str]] | None, expected_sha256: str) -> None:
    """UNAUTHENTICATED unless the call carries the front door's key (its SHA-256 equals `expected_sha256`)."""
    presented = next((value for key, value in metadata or () if key.lower() == INTERNAL_KEY_HEADER
                      and isinstance(value, str)), "")
    if not hmac.compare_digest(hashlib.sha256(presented.encode()).hexdigest().encode(), expected_sha256.encode()):
        raise ApiError(grpc.StatusCode.UNAUTHENTICATED, "this is the cluster's internal port; connect to the port "
                       "`facecast serve` prints (its front door)")


def new_token() -> tuple[str, str]:
    """A fresh session token and its sha256 hex digest: (token, digest). Give the token out once; keep the digest."""
    token = secrets.token_urlsafe(32)
    return token, hash_token(token)


def check_token(expected_hash: str, given_token: str) -> None:
    """PERMISSION_DENIED unless sha256(given_token) equals `expected_hash` (constant-time comparison)."""
    if not given_token:
        raise ApiError(grpc.StatusCode.PERMISSION_DENIED,
                       "session_token is required: send the token CreateSession returned")
    if not hmac.compare_digest(hash_token(given_token).encode(), expected_hash.lower().encode()):
        raise ApiError(grpc.StatusCode.PERMISSION_DENIED, "session_token does not match this session")


# --------------------------------------------------------------------------------------------------------------- #
# Responses
# --------------------------------------------------------------------------------------------------------------- #

def session_to_proto(session_id: str, state: str | int, stream: StreamConfig,
                     characters: Sequence[Sequence[float]] = (FULL_FRAME,), created_at: float = 0.0,
                     chunks_emitted: int = 0, frames_emitted: int = 0, *, session_token: str = "",
                     prompt: str = "", owner: str = ""):
    """Build a `facecast.v1.Session` from plain values.

    `state`: a SessionState name ("STREAMING", case-insensitive, "SESSION_STATE_" prefix optional) or number;
    `stream`: the effective StreamConfig (becomes `options`, every field set); `characters`: regions
    (x0, y0, x1, y1); `created_at`: Unix time in seconds; `session_token` only in CreateSession's answer.
    """
    from services.api import pb

    if isinstance(state, str):
        name = state.upper()
        if name not in pb.SessionState.keys():
            name = name.removeprefix("SESSION_STATE_")
        state_value = pb.SessionState.Value(name)  # ValueError on an unknown name: a server bug
    else:
        state_value = int(state)
        pb.SessionState.Name(state_value)  # ValueError on an unknown number
    seconds = math.floor(created_at)
    nanos = min(int(round((created_at - seconds) * 1e9)), 999_999_999)
    session = pb.Session(
        session_id=session_id,
        session_token=session_token,
        state=state_value,
        options=pb.SessionOptions(fps=float(stream.fps), width=stream.width, height=stream.height,
                                  steps=stream.steps, chunk_latent_frames=stream.chunk_latent_frames,
                                  seed=stream.seed, decoder=stream.decoder, listening_hold=stream.listening_hold),
        characters=[pb.Character(region=pb.Region(x0=r[0], y0=r[1], x1=r[2], y1=r[3])) for r in characters],
        chunks_emitted=int(chunks_emitted),
        frames_emitted=int(frames_emitted),
        prompt=prompt,
        owner=owner,
    )
    session.created_at.seconds = int(seconds)
    session.created_at.nanos = nanos
    return session


__all__ = [
    "ApiError", "ApiLimits", "InputBudget", "CreateSpec", "UpdateSpec", "FULL_FRAME", "validate_create",
    "validate_audio", "validate_control", "validate_update", "require_session_id", "check_api_key",
    "check_internal_key", "check_token", "new_token", "session_to_proto",
]
