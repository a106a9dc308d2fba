"""The small messages the serving deployments exchange, in the order a chunk meets them.

    SessionIngress ──push(pcm)──► AudioEncoder ──► ChunkTicket ──► SessionIngress   (no tensors: the chunk's
                                                                                      features stay a reference)
    SessionIngress ── ticket.features (a Ray ObjectRef, passed on unresolved) ──► ScoreWorkerGroup: ChunkFeatures
    ScoreWorkerGroup ──► ScoredChunk (latents, or a ref to the last step actor's output) ──► VAEDecoder
                                                                                        (again passed unresolved)
                         with latent_transport 'collective': a LatentTicket instead of the latents, which go over
                         the latent link (`services.serving.latent_link`), device to device
    VAEDecoder ──► DecodedFrames (JPEG frames, timings, who decoded) ──► SessionIngress ──► egress
                   + the ChunkTicket's audio span, which went straight from the AudioEncoder to the ingress

This module imports neither torch nor Ray: the ingress (which must not import torch) reads `ChunkTicket` and
`DecodedFrames`; `ChunkFeatures` and `ScoredChunk` carry tensors but are only ever unpickled on the workers.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


@dataclass(frozen=True)
class ChunkTicket:
    """A chunk the AudioEncoder has cut: where it sits in the video and the input audio its frames show.

    first_frame/num_frames: the video frames of this chunk (already trimmed at the end of input).
    audio_pcm_s16le: the mixed input audio over exactly those frames, mono int16 little-endian at sample_rate_hz.
    audio_ms: time the audio front-end spent on this chunk.
    features: a reference (Ray ObjectRef) to the chunk's `ChunkFeatures` in the object store; the ingress hands it
    to the score group as a top-level argument, so Ray resolves it there and the tensors never enter the ingress.
    """

    session_id: str
    chunk_index: int
    first_frame: int
    num_frames: int
    fps: float
    final: bool
    audio_pcm_s16le: bytes
    sample_rate_hz: int
    audio_ms: float = 0.0
    features: Any = None

    def decode_request(self) -> "DecodeRequest":
        return DecodeRequest(self.session_id, self.chunk_index, self.num_frames)


@dataclass(frozen=True)
class ChunkFeatures:
    """One chunk's audio conditioning, from the AudioEncoder to the score group through the object store.

    features: [1, K, C, T, D] float per character, latent frame and window token; speaking: [1, K, C, T] bool.
    Duck-types the fields of `model_core.audio_stage.ChunkAudioInput` that the score stage reads.
    """

    session_id: str
    chunk_index: int
    features: Any
    speaking: Any
    audio_s: float = 0.0


@dataclass(frozen=True)
class LatentTicket:
    """A chunk's clean latents went over a latent link instead of travelling in the message: the decoder takes
    them from its end of link `link` by (session, chunk). shape/dtype: what was sent, for checks and errors."""

    link: str
    session_id: str
    chunk_index: int
    shape: tuple[int, ...]
    dtype: str


@dataclass
class ScoredChunk:
    """The score group's output for one chunk, handed to the decoder unresolved.

    latents: [1, 16, C, h, w] clean latents; or None when `ticket` is set (they went over the latent link), or when
    `pending` is set: a Ray ObjectRef to the last step actor's `NoisyChunk` (latents plus per-step timings) or
    `LinkedChunk` (its ticket), which only the decoder resolves — so in the pipelined layout the latents go from
    the last step actor to the decoder without touching the score replica.
    """

    session_id: str
    chunk_index: int
    latents: Any = None
    pending: Any = None
    stage_ms: dict[str, float] = field(default_factory=dict)
    ticket: LatentTicket | None = None


@dataclass
class LinkedChunk:
    """The last pipelined step's answer when its latents went over the latent link: the ticket, the step timings,
    and for chunk 0 the first clean latent frame [1, 16, 1, h, w] (the adaptive sink the score replica needs)."""

    ticket: LatentTicket
    step_s: list[float]
    sink: Any = None


@dataclass(frozen=True)
class DecodeRequest:
    """What the decoder needs besides the latents: whose chunk it is and how many frames to keep."""

    session_id: str
    chunk_index: int
    num_frames: int


@dataclass
class DecodedFrames:
    """A decoded chunk as the decoder returns and buffers it for replay.

    frames_jpeg: one baseline JPEG per video frame; stage_ms: per-stage wall time so far ("audio", "score",
    "score_step_k", "vae"); decoded_by: which deployment, replica and GPU ids decoded it (placement is asserted on
    this, not on what a deployment says about itself).
    """

    session_id: str
    chunk_index: int
    width: int
    height: int
    frames_jpeg: list[bytes]
    stage_ms: dict[str, float] = field(default_factory=dict)
    decoded_by: dict[str, Any] = field(default_factory=dict)
