"""`AppSettings`: the cluster's configuration, checked once, shared by every deployment — and the one home of the
serving facts other rooms read (layouts, deployment names, gRPC servicer paths, replay depth).

This module is imported by the ingress, so it imports neither torch nor Ray (torch only inside the helpers that
workers call).  It is built from the Serve application's `args:` (see `ray_configs/*.yaml`) by
`services.serving.app.build_app`.  Every cross-deployment invariant is checked here, in one place, so a bad config
fails at build time with the field named — not later inside a replica.
"""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass

from model_core.config import DEVICES, DTYPES, ConfigError, get_preset

LAYOUTS = ("local", "1+1", "4+1")
"""The GPU layouts a Serve config may describe (ray_configs/<layout>.yaml)."""
DEPLOYMENT_NAMES = ("SessionIngress", "AudioEncoder", "ScoreWorkerGroup", "VAEDecoder", "LLMBridge")
GRPC_SERVICER = "services.api.servicer.add_AvatarServiceServicer_to_server"
GRPC_SERVICERS = (GRPC_SERVICER, "services.api.servicer.add_HealthServicer_to_server")
"""The generated registrations with request parsing that never fails (`services.api.servicer`): bytes that do not
parse get INVALID_ARGUMENT from the ingress, not gRPC's UNKNOWN."""
SCORE_MODES = ("sequential", "pipelined")
VAE_PLACEMENTS = ("separate", "colocated")
LATENT_TRANSPORTS = ("object_store", "collective")
REPLAY_CHUNKS = 16
"""Decoded chunks (and their audio tickets) kept per session for a re-attaching client."""


@dataclass(frozen=True)
class AppSettings:
    """Cluster settings (the Serve application's `args`)."""

    layout: str = "local"
    """Which GPU layout the config describes: local (CPU, logical GPUs), 1+1 or 4+1."""
    preset: str = "tiny"
    """Model preset (tiny, small, talk128, wan-1.3b, wan-14b)."""
    steps: int = 2
    """Denoising steps per chunk."""
    score_mode: str = "sequential"
    """sequential: one score worker runs every step; pipelined: one score worker per step."""
    vae_placement: str = "separate"
    """separate: the VAEDecoder decodes on its own GPU (disaggregated); colocated: the score worker decodes itself
    (self-contained, the baseline disaggregation is measured against)."""
    latent_transport: str = "object_store"
    """How a chunk's clean latents go from the score worker (or the last pipelined step) to the VAEDecoder:
    object_store (a Ray object, through host memory) or collective (a point-to-point link over Ray's collective API:
    NCCL GPU to GPU, gloo on CPU; `services.serving.latent_link`). collective needs vae_placement separate."""
    device: str = "cpu"
    """Where the score and VAE workers compute."""
    dtype: str = "float32"
    """Model dtype."""
    seed: int = 0
    """Seed of the random weights when no checkpoint is given (cluster == engine for the same seed)."""
    checkpoint: str | None = None
    """facecast checkpoint path on every worker (None: random weights)."""
    max_sessions: int = 8
    """Admission limit: concurrently active sessions."""
    max_sessions_per_key: int = 0
    """Admission limit per API key (by its name): concurrently active sessions one key may hold; 0: only
    max_sessions."""
    limits: dict | None = None
    """Request and stream limits (`services.api.validation.ApiLimits` fields: max_image_bytes, max_image_pixels,
    max_prompt_chars, max_owner_chars, max_characters, max_audio_s_per_message, max_audio_rate, audio_burst_s,
    max_messages_per_s, message_burst); unset fields keep their defaults."""
    max_chunks_in_flight: int = 2
    """Backpressure: chunks of one session being generated at once."""
    max_batch_size: int = 4
    """Chunks of different sessions at the same step batched into one forward (1: no batching)."""
    jpeg_quality: int = 90
    """Quality of the JPEG frames streamed to gRPC clients."""
    audio_backend: str | None = None
    """Audio front-end (None: the preset's); see model_core.audio for the backends."""
    audio_model_path: str | None = None
    """Local model directory for backends that need weights (wav2vec2, whisper), as `facecast generate
    --audio-encoder-path`."""
    session_ttl_s: float = 600.0
    """Seconds a session record lives in Redis without activity (refreshed by every write)."""
    session_sweep_s: float = 30.0
    """How often the ingress frees worker state of sessions whose record has expired or ended, closes idle ones and
    heartbeats the streams attached to it."""
    session_idle_timeout_s: float = 120.0
    """A session with no stream attached anywhere (no heartbeat) and no input for this long is closed: its worker
    state is freed on every deployment and its admission slot returned (a client that drops its stream without
    CloseSession). At least twice session_sweep_s."""
    redis_url: str | None = None
    """Session store; None: $REDIS_URL."""
    resume_snapshots: bool = True
    """After every chunk each worker saves what a replacement replica needs to continue the session exactly (audio
    front end, per-step KV caches and noise generator, decode cache) in Redis (`services.serving.resume`), so a
    worker that dies costs its sessions a short pause, not the call. Off: a worker failure ends its sessions."""
    fault_recovery_s: float = 60.0
    """How long a stream waits for a failed worker's replacement before it ends with UNAVAILABLE."""
    decoder: str = "full"
    """The sessions' default decoder: full (the VAE's, the reference) or fast (the preset's shipped fast decoder,
    several times cheaper); a session may choose either (`SessionOptions.decoder`) when the preset ships a fast one."""
    livekit_url: str | None = None
    """LiveKit server for `delivery.livekit` sessions (ws:// or wss://); None: $LIVEKIT_URL, and without either
    LiveKit delivery is off. The key and secret: $LIVEKIT_API_KEY / $LIVEKIT_API_SECRET (or the two fields below;
    prefer the environment, a config file is easily shared). Clients never name the server."""
    livekit_api_key: str | None = None
    livekit_api_secret: str | None = None
    livekit_token_ttl_s: float = 6 * 3600.0
    """Lifetime of the avatar tokens facecast mints."""
    livekit_public_url: str | None = None
    """The LiveKit URL browsers on the call page connect to, when it differs from livekit_url (a cluster-internal
    address); None: $LIVEKIT_PUBLIC_URL, else livekit_url."""
    realtime_url: str | None = None
    """WebSocket base URL of a realtime speech LLM speaking the OpenAI Realtime protocol (e.g. wss://api.openai.com/v1)
    for `conversation.mode=REALTIME` sessions; None: $FACECAST_REALTIME_URL, and without either the mode is off.
    The key: $OPENAI_API_KEY (or realtime_api_key)."""
    realtime_api_key: str | None = None
    realtime_model: str | None = None
    """The realtime model (None: $FACECAST_REALTIME_MODEL, else gpt-realtime)."""
    offline_conversation: bool = True
    """Offer `conversation.mode=OFFLINE`: the on-server cascade (silero VAD -> Whisper base -> SmolLM2-135M -> Piper,
    `services.llm.offline`), when its packages are installed (`make cascade`)."""
    cascade_cache_dir: str | None = None
    """Where the cascade keeps the models it prepares once from their wheels (None: $FACECAST_CACHE_DIR, else
    ~/.cache/facecast)."""
    api_keys: dict | None = None
    """Accepted API keys as {name: "sha256:<hex>"} (`facecast keys hash`; never the keys themselves); with
    $FACECAST_API_KEYS (`name=key,...`) and the file named by $FACECAST_API_KEY_FILE, all accepted together
    (`services.api.keys`). None of the three: no authentication."""

    internal_key_sha256: str | None = None
    """Hex SHA-256 of the key `facecast serve`'s front door adds to every call it forwards
    (`services.serving.front_door`); when set, calls without it (straight to Serve's own gRPC port, which listens on
    every interface) are refused. None (KubeRay, `serve deploy`): no such check."""

    def __post_init__(self) -> None:
        def check(ok: bool, name: str, allowed: str) -> None:
            if not ok:
                raise ConfigError(f"{name}={getattr(self, name)!r} is invalid: {allowed}")

        check(self.layout in LAYOUTS, "layout", f"allowed: {', '.join(LAYOUTS)}")
        get_preset(self.preset)
        check(1 <= self.steps <= 4, "steps", "allowed: 1 to 4")
        check(self.score_mode in SCORE_MODES, "score_mode", f"allowed: {', '.join(SCORE_MODES)}")
        check(self.vae_placement in VAE_PLACEMENTS, "vae_placement", f"allowed: {', '.join(VAE_PLACEMENTS)}")
        check(self.latent_transport in LATENT_TRANSPORTS, "latent_transport",
              f"allowed: {', '.join(LATENT_TRANSPORTS)}")
        check(self.latent_transport == "object_store" or self.vae_placement == "separate", "latent_transport",
              "collective moves latents between the score and the VAEDecoder processes; with vae_placement "
              "'colocated' they share one process, allowed: object_store")
        check(self.device in DEVICES, "device", f"allowed: {', '.join(DEVICES)}")
        check(self.dtype in DTYPES, "dtype", f"allowed: {', '.join(DTYPES)}")
        check(self.max_sessions >= 1, "max_sessions", "must be >= 1")
        check(self.max_sessions_per_key >= 0, "max_sessions_per_key", "must be >= 0 (0: no per-key limit)")
        self.api_limits()
        check(1 <= self.max_chunks_in_flight <= 16, "max_chunks_in_flight", "allowed: 1 to 16")
        check(1 <= self.max_batch_size <= 64, "max_batch_size", "allowed: 1 to 64")
        check(10 <= self.jpeg_quality <= 100, "jpeg_quality", "allowed: 10 to 100")
        check(self.session_ttl_s > 0, "session_ttl_s", "must be > 0 seconds")
        check(self.fault_recovery_s > 0, "fault_recovery_s", "must be > 0 seconds")
        if self.audio_backend is not None or self.audio_model_path is not None:
            self.audio_config()   # the front-end's own checks name audio backend / model_path and the allowed values
        check(self.internal_key_sha256 is None or (len(self.internal_key_sha256) == 64 and all(
            ch in "0123456789abcdef" for ch in self.internal_key_sha256)), "internal_key_sha256",
              "must be 64 lowercase hex digits")
        check(self.session_sweep_s > 0, "session_sweep_s", "must be > 0 seconds")
        check(self.session_idle_timeout_s >= 2 * self.session_sweep_s, "session_idle_timeout_s",
              f"must be at least twice session_sweep_s ({2 * self.session_sweep_s:g} s): live streams heartbeat once "
              "per sweep")
        check(self.livekit_token_ttl_s >= 60, "livekit_token_ttl_s", "must be >= 60 seconds")
        self.effective_api_keys()   # a raw key in the config, a short key, a bad name: named here
        self.livekit_config()   # a URL without its credentials fails here, naming what is missing
        self.realtime_config()
        check(self.decoder in self.decoders(), "decoder",
              f"allowed: {', '.join(self.decoders())}" + ("" if "fast" in self.decoders() else
                                                          f" (preset {self.preset!r} ships no fast decoder)"))

    def api_limits(self):
        """The request and stream limits (`ApiLimits`), the config's `limits:` over the defaults."""
        from services.api.validation import ApiLimits

        return ApiLimits.from_config(self.limits)

    def livekit_config(self):
        """The LiveKit server config (`services.delivery.livekit_room.LiveKitConfig`), or None when none is set."""
        from services.delivery.livekit_room import DeliveryError, LiveKitConfig

        try:
            return LiveKitConfig.from_settings(self.livekit_url, self.livekit_api_key, self.livekit_api_secret,
                                               self.livekit_token_ttl_s, public_url=self.livekit_public_url)
        except DeliveryError as error:
            raise ConfigError(str(error)) from None

    def realtime_config(self):
        """The realtime LLM config (`services.llm.realtime.RealtimeConfig`), or None when none is set."""
        from services.llm.conversation import ConversationError
        from services.llm.realtime import RealtimeConfig

        try:
            return RealtimeConfig.from_settings(self.realtime_url, self.realtime_api_key, self.realtime_model)
        except ConversationError as error:
            raise ConfigError(str(error)) from None

    def conversation_modes(self) -> tuple[str, ...]:
        """The conversation modes this server offers: "realtime" when a realtime LLM is configured, "offline" when
        the cascade is on and installed."""
        from services.llm.offline import missing_packages

        return ((("realtime",) if self.realtime_config() is not None else ())
                + (("offline",) if self.offline_conversation and not missing_packages() else ()))

    @classmethod
    def from_args(cls, args: dict | None) -> "AppSettings":
        args = dict(args or {})
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(args) - known)
        if unknown:
            raise ConfigError(f"unknown application args {unknown}; allowed: {sorted(known)}")
        return cls(**args)

    @property
    def preset_config(self):
        return get_preset(self.preset)

    @property
    def torch_dtype(self):
        from model_core.models import torch_dtype

        return torch_dtype(self.dtype)

    def worker_device(self) -> str:
        """The device a worker computes on: "cuda" when asked and present (Ray sets CUDA_VISIBLE_DEVICES to the
        worker's GPU), else "cpu"."""
        import torch

        return "cuda" if self.device == "cuda" and torch.cuda.is_available() else "cpu"

    def audio_config(self):
        from model_core.models import audio_config_for

        # unless named, the front end the checkpoint (or the preset's shipped weights) was trained on
        return audio_config_for(self.preset_config, self.checkpoint, self.audio_backend,
                                model_path=self.audio_model_path)

    def stream_defaults(self):
        return get_preset(self.preset).stream.replace(steps=self.steps, decoder=self.decoder)

    def decoders(self) -> tuple[str, ...]:
        """The decoders sessions may choose: full, and fast when the preset ships one (a file check: no torch)."""
        from model_core.shipped import fast_decoder_shipped

        return ("full", "fast") if fast_decoder_shipped(self.preset_config) else ("full",)

    def effective_api_keys(self):
        """Every accepted key (`services.api.keys.ApiKeyring`: names and digests); empty: no authentication."""
        from services.api.keys import ApiKeyError, ApiKeyring

        try:
            return ApiKeyring.load(self.api_keys or {})
        except ApiKeyError as error:
            raise ConfigError(str(error)) from None

    def effective_redis_url(self) -> str | None:
        return self.redis_url or os.environ.get("REDIS_URL")
