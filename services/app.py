"""The one place the deployment graph is bound.

    gRPC client ──► SessionIngress ──► AudioEncoder            (CPU: pcm -> per-chunk audio windows)
                          │      └──► ScoreWorkerGroup ──► VAEDecoder
                          │            (GPU bundle(s): DiT;    (its own GPU: streaming decode, JPEG,
                          │             pipelined: + one        replay buffer; latents arrive from the
                          │             stage actor per step)   score group, never via the ingress)
                          └──► LLMBridge                (the audio-LLM seam; raw audio works without it)
                          └──► Redis (session records)

`build_app(args)` is the Serve `import_path` target (`services.app:build_app`); `args` are `AppSettings` fields.
"""

from __future__ import annotations

from ray.serve import Application

from services.ingress import SessionIngress
from services.settings import AppSettings
from services.workers import AudioEncoder, LLMBridge, ScoreWorkerGroup, VAEDecoder

DEPLOYMENT_NAMES = ("SessionIngress", "AudioEncoder", "ScoreWorkerGroup", "VAEDecoder", "LLMBridge")
GRPC_SERVICER = "services.api.generated.facecast.v1.avatar_pb2_grpc.add_AvatarServiceServicer_to_server"


def build_app(args: dict | None = None) -> Application:
    settings = AppSettings.from_args(args)
    vae = VAEDecoder.bind(settings)
    score = ScoreWorkerGroup.bind(settings, vae)
    audio = AudioEncoder.bind(settings)
    llm = LLMBridge.bind(settings)
    return SessionIngress.bind(settings, audio, score, vae, llm)
