"""The one place the deployment graph is bound.

    gRPC client ─► SessionIngress ─► AudioEncoder ─┐ ChunkTicket (frame span + audio + features ref) to the ingress
     (facecast.v1)      │                          └► ChunkFeatures ─► ScoreWorkerGroup ─► ScoredChunk ─► VAEDecoder
                        │                              (object ref,              (KV caches per step;  (unresolved)  │
                        │                               unresolved)                                                │
                        │                                                        pipelined: + one actor            │
                        │                                                        per further step)                 │
                        ◄──────────────────────────── DecodedFrames (JPEG + timings + who decoded) ◄───────────────┘
                        ├─► LLMBridge  (the audio-LLM seam; sessions run on raw audio without it)
                        └─► Redis      (session records)

The ingress calls every deployment itself, but the heavy data never passes through it: it hands the ticket's
reference to the features (an ObjectRef the AudioEncoder put in the object store) to the score group and the score
group's response to the decoder unresolved (Ray and Serve resolve a top-level ObjectRef or DeploymentResponse
argument inside the callee), and gets back only frames.  In the self-contained layout
(`vae_placement: colocated`) the score group is bound as the decoder too, so the ingress never knows where decoding
runs.

Each deployment may run several replicas: the ones that hold sessions (AudioEncoder, ScoreWorkerGroup, VAEDecoder)
route every call about a session to the replica holding it (`services.serving.affinity`).

`build_app(args)` is the Serve `import_path` target (`services.serving.app:build_app`; Serve calls a builder with
exactly one parameter, the config's `args`, which are `AppSettings` fields); `bind_app(args, deployment_options)`
is the same graph for programmatic deploys (`LocalCluster`), with per-deployment option overrides.
"""

from __future__ import annotations

from ray.serve import Application

from model_core.config import ConfigError
from services.serving.audio_encoder import AudioEncoder
from services.serving.ingress import SessionIngress
from services.serving.llm_bridge import LLMBridge
from services.serving.score_group import ScoreWorkerGroup
from services.serving.settings import DEPLOYMENT_NAMES, AppSettings
from services.serving.vae_decoder import VAEDecoder


def build_app(args: dict) -> Application:
    """The application of a config file's `args` (serve deploy, KubeRay's serveConfigV2); the file's `deployments`
    set their options."""
    return bind_app(args)


def bind_app(args: dict | None = None, deployment_options: dict[str, dict] | None = None) -> Application:
    """Bind the graph. `deployment_options` (name -> Serve deployment options) is for programmatic deploys such as
    `LocalCluster`; config-file deploys get the same options from the file's `deployments` (`build_app`)."""
    settings = AppSettings.from_args(args)
    options = deployment_options or {}
    unknown = sorted(set(options) - set(DEPLOYMENT_NAMES))
    if unknown:
        raise ConfigError(f"deployment_options names {unknown} are not deployments; allowed: {DEPLOYMENT_NAMES}")

    def bind(deployment, *init_args, **init_kwargs):
        return deployment.options(**options.get(deployment.name, {})).bind(*init_args, **init_kwargs)

    if settings.vae_placement == "colocated":
        decoder = score = bind(ScoreWorkerGroup, settings)
    else:   # the score group holds the decoder's handle for the latent link (latent_transport 'collective')
        decoder = bind(VAEDecoder, settings)
        score = bind(ScoreWorkerGroup, settings, decoder=decoder)
    audio = bind(AudioEncoder, settings)
    llm = bind(LLMBridge, settings)
    return bind(SessionIngress, settings, audio, score, decoder, llm)
