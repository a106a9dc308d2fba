"""`facecast bench cluster`: what the cluster costs and buys, measured in one run on one machine.

1. Overhead: the same preset and seed through the in-process `AvatarEngine` and through the cluster (gRPC ingress,
   Ray hops, JPEG), audio sent as fast as possible; ratio of the mean time between chunks (TTBC).
2. Disaggregation: score and VAE on different workers (the default) against one self-contained worker doing both,
   same load; ratio of TTBC.  With two chunks in flight the score worker denoises chunk n+1 while the VAE decodes
   chunk n, so TTBC tends to max(score, decode) instead of their sum.
3. Capacity: how many sessions streaming in real time one score group keeps up with, without and with cross-session
   batching.  A session keeps up when its last chunk arrives within two chunk durations of the end of its audio.

Three Serve applications share one local Ray cluster (logical GPUs), so all figures come from the same run.
"""

from __future__ import annotations

import io
import threading
import time

import numpy as np
from PIL import Image

from model_core.bench import cpu_label, speechlike
from model_core.config import get_preset
from model_core.engine import AvatarEngine
from services.api.client import AvatarClient
from services.deploy.local_cluster import APP_NAME, LocalCluster
from services.net import free_port

SELF_CONTAINED, BATCHED = "selfcontained", "batched"


def _png(stream, seed: int = 0) -> bytes:
    pixels = (np.random.default_rng(seed).random((stream.height, stream.width, 3)) * 255).astype(np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="PNG")
    return buffer.getvalue()


def _engine_intervals(engine: AvatarEngine, image_png: bytes, pcm: np.ndarray) -> list[float]:
    from services.media import decode_image_bytes, image_to_tensor

    stream = engine.preset.stream
    session = engine.open_session(image_to_tensor(decode_image_bytes(image_png), stream.width, stream.height))
    arrivals, started = [], time.perf_counter()
    for offset in range(0, pcm.shape[0], 640):
        for _ in engine.push_audio(session, pcm[offset:offset + 640], 16000):
            arrivals.append(time.perf_counter() - started)
    for _ in engine.end_input(session):
        arrivals.append(time.perf_counter() - started)
    engine.close_session(session)
    return list(np.diff(arrivals))


def _cluster_intervals(target: str, application: str, image_png: bytes, pcm: np.ndarray):
    client = AvatarClient(target, application=application)
    try:
        session = client.create_session(image_png)
        result = client.stream(session, pcm, 16000, realtime=False)
        client.close_session(session.session_id, session.session_token)
        return result
    finally:
        client.close()


def stage_split(chunks) -> dict[str, float]:
    """Mean milliseconds of each stage a chunk passed (ChunkStats.stage_ms: audio, score steps, VAE decode, JPEG,
    ...) over the chunks of a stream, skipping the first (warm-up)."""
    totals: dict[str, list[float]] = {}
    for chunk in chunks[1:] or chunks:
        for name, value in chunk.stats.stage_ms.items():
            totals.setdefault(name, []).append(value)
    return {name: float(np.mean(values)) for name, values in sorted(totals.items())}


def _realtime_sessions(target: str, application: str, image_png: bytes, pcm: np.ndarray, count: int,
                       chunk_s: float) -> dict:
    client = AvatarClient(target, application=application)
    sessions = [client.create_session(image_png) for _ in range(count)]
    results: list = [None] * count
    audio_s = pcm.shape[0] / 16000

    def run(index: int) -> None:
        results[index] = client.stream(sessions[index], pcm, 16000, realtime=True)

    threads = [threading.Thread(target=run, args=(index,)) for index in range(count)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=audio_s * 4 + 120)
    for session in sessions:
        client.close_session(session.session_id, session.session_token)
    client.close()
    lags = [result.arrival_s[-1] - audio_s if result and result.arrival_s else float("inf") for result in results]
    return {"sessions": count, "max_lag_s": float(max(lags)), "keeps_up": bool(max(lags) <= 2 * chunk_s),
            "mean_ttbc_ms": float(np.mean([np.mean(r.intervals_s) for r in results if r and r.intervals_s]) * 1000)}


def bench_cluster(preset_name: str = "tiny", chunks: int = 8, max_sessions: int = 6,
                  progress: bool = True, decoder: str = "full", latent_transport: str = "object_store") -> dict:
    """The disaggregated applications move latents by `latent_transport`; the self-contained one decodes in place."""
    preset = get_preset(preset_name)
    stream = preset.stream
    ratio = preset.dit.temporal_compression
    chunk_s = ratio * stream.chunk_latent_frames / stream.fps
    pcm = (speechlike(chunks * chunk_s + 0.2) * 32767).astype(np.int16)
    image = _png(stream)
    say = print if progress else (lambda *a, **k: None)

    engine = AvatarEngine.from_preset(preset, seed=0, decoder=decoder)
    _engine_intervals(engine, image, pcm[: 16000])            # warm-up
    engine_ttbc = _engine_intervals(engine, image, pcm)

    say("starting the local cluster (3 applications) ...")
    base = {"preset": preset_name, "max_sessions": max_sessions * 2 + 2, "max_batch_size": 1,
            "max_chunks_in_flight": 2, "decoder": decoder, "latent_transport": latent_transport}
    cluster = LocalCluster.start(base, grpc_port=free_port(), num_cpus=8, num_gpus=8)
    try:
        cluster.deploy_app(SELF_CONTAINED, {"vae_placement": "colocated", "latent_transport": "object_store"})
        cluster.deploy_app(BATCHED, {"max_batch_size": 8})
        for application in (APP_NAME, SELF_CONTAINED, BATCHED):          # warm-up
            _cluster_intervals(cluster.target, application, image, pcm[: 16000])
        say("overhead and disaggregation ...")
        streamed = _cluster_intervals(cluster.target, APP_NAME, image, pcm)
        cluster_ttbc, stages = streamed.intervals_s, stage_split(streamed.chunks)
        self_contained_ttbc = _cluster_intervals(cluster.target, SELF_CONTAINED, image, pcm).intervals_s
        capacity = {}
        for application, label in ((APP_NAME, "without_batching"), (BATCHED, "with_batching")):
            trials = []
            for count in range(1, max_sessions + 1):
                say(f"capacity {label}: {count} real-time session(s) ...")
                trial = _realtime_sessions(cluster.target, application, image, pcm, count, chunk_s)
                trials.append(trial)
                if not trial["keeps_up"]:
                    break
            capacity[label] = {"max_realtime_sessions": max([t["sessions"] for t in trials if t["keeps_up"]],
                                                             default=0), "trials": trials}
    finally:
        cluster.stop()

    engine_ms, cluster_ms = float(np.mean(engine_ttbc) * 1000), float(np.mean(cluster_ttbc) * 1000)
    self_contained_ms = float(np.mean(self_contained_ttbc) * 1000)
    return {
        "preset": preset_name, "machine": cpu_label(), "decoder": decoder, "latent_transport": latent_transport,
        "stage_ms": stages,
        "chunk_duration_ms": chunk_s * 1000, "chunks": chunks,
        "engine_ttbc_ms": engine_ms, "cluster_ttbc_ms": cluster_ms,
        "cluster_overhead_ratio": cluster_ms / engine_ms,
        "self_contained_ttbc_ms": self_contained_ms, "disaggregated_ttbc_ms": cluster_ms,
        "disaggregation_speedup": self_contained_ms / cluster_ms,
        "capacity": capacity,
    }


def format_cluster_report(report: dict) -> str:
    capacity = report["capacity"]
    lines = [
        f"facecast bench cluster — preset {report['preset']} on {report['machine']} "
        f"(chunk plays {report['chunk_duration_ms']:.0f} ms, {report['chunks']} chunks per stream, "
        f"{report['decoder']} decoder, latents by {report.get('latent_transport', 'object_store')})",
        "  by stage (ms, the disaggregated layout) " + ", ".join(f"{name} {value:.1f}"
                                                                 for name, value in report["stage_ms"].items()),
        f"  TTBC in-process engine     {report['engine_ttbc_ms']:.1f} ms",
        f"  TTBC through the cluster   {report['cluster_ttbc_ms']:.1f} ms   "
        f"overhead x{report['cluster_overhead_ratio']:.2f}",
        f"  TTBC self-contained worker {report['self_contained_ttbc_ms']:.1f} ms   disaggregated is "
        f"x{report['disaggregation_speedup']:.2f} faster",
        f"  real-time sessions, one score group: {capacity['without_batching']['max_realtime_sessions']} without "
        f"batching, {capacity['with_batching']['max_realtime_sessions']} with cross-session batching",
    ]
    for label, data in capacity.items():
        for trial in data["trials"]:
            verdict = "keeps up" if trial["keeps_up"] else "falls behind"
            lines.append(f"    {label:17s} {trial['sessions']} sessions: max lag {trial['max_lag_s'] * 1000:.0f} ms, "
                         f"mean TTBC {trial['mean_ttbc_ms']:.0f} ms, {verdict}")
    return "\n".join(lines)
