"""The one place the deployment graph is bound.

    gRPC client ──► SessionIngress ──► AudioEncoder            (CPU: pcm -> per-chunk audio windows)
                          │      └──► ScoreWorkerGroup ──► VAEDecoder
                          │            (GPU bundle(s): DiT;    (its own GPU: streaming decode, JPEG,
                          │             pipelined: + one        replay buffer; latents arrive from the
                          │             stage actor per step)   score group, never via the ingress)
                          └──► LLMBridge                (the audio-LLM seam; raw audio works without it)
                          └──► Redis (session records)

`build_app(args)` is the Serve `import_path` target (`services.serving.app:build_app`); `args` are `AppSettings` fields.
"""

from __future__ import annotations

from ray.serve import Application

from services.serving.ingress import SessionIngress
from services.serving.settings import DEPLOYMENT_NAMES, GRPC_SERVICER, GRPC_SERVICERS, AppSettings  # noqa: F401
from services.serving.workers import AudioEncoder, LLMBridge, ScoreWorkerGroup, VAEDecoder



def build_app(args: dict | None = None, deployment_options: dict[str, dict] | None = None) -> Application:
    """Bind the graph. `deployment_options` (name -> Serve deployment options) is for programmatic deploys such as
    `LocalCluster`; config-file deploys (serve deploy, KubeRay) get the same options from the file's `deployments`."""
    settings = AppSettings.from_args(args)
    options = deployment_options or {}
    unknown = sorted(set(options) - set(DEPLOYMENT_NAMES))
    if unknown:
        raise ValueError(f"deployment_options names {unknown} are not deployments; allowed: {DEPLOYMENT_NAMES}")

    def bind(deployment, *init_args):
        return deployment.options(**options.get(deployment.name, {})).bind(*init_args)

    vae = bind(VAEDecoder, settings)
    score = bind(ScoreWorkerGroup, settings, vae)
    audio = bind(AudioEncoder, settings)
    llm = bind(LLMBridge, settings)
    return bind(SessionIngress, settings, audio, score, vae, llm)
