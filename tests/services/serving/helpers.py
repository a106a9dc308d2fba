"""Inputs and expectations shared by the serving tests: a seeded PNG, int16 PCM, and the in-process engine's JPEG
frames for the same image and audio (what the cluster must stream for the same seed)."""

from __future__ import annotations

import io

import numpy as np
from PIL import Image

from model_core.engine import AvatarEngine, iter_pieces
from services.media import decode_image_bytes, image_to_tensor
from services.serving.vae_decoder import encode_jpeg


def png(seed: int, size: int = 64) -> bytes:
    pixels = (np.random.default_rng(seed).random((size, size, 3)) * 255).astype(np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="PNG")
    return buffer.getvalue()


def pcm16(audio: np.ndarray) -> np.ndarray:
    return (np.clip(audio, -1, 1) * 32767).astype(np.int16)


def engine_jpegs(engine: AvatarEngine, image_png: bytes, pcm: np.ndarray, quality: int = 90) -> list[bytes]:
    """The engine's frames as JPEG for one session fed `pcm` (16 kHz) in 40 ms pieces, then end of input."""
    stream = engine.preset.stream
    image = image_to_tensor(decode_image_bytes(image_png), stream.width, stream.height)
    session = engine.open_session(image, "")
    chunks = []
    for piece in iter_pieces(pcm, 640):
        chunks += engine.push_audio(session, piece, 16000)
    chunks += engine.end_input(session)
    engine.close_session(session)
    return [jpeg for chunk in chunks for jpeg in encode_jpeg(chunk.frames, quality)]


async def settle_tasks(timeout_s: float = 10.0) -> None:
    """Cancel whatever the test left running on this loop and wait for it; a task that will not stop fails the test
    by name (instead of hanging `asyncio.run` at exit)."""
    import asyncio

    pending = [task for task in asyncio.all_tasks() if task is not asyncio.current_task()]
    for task in pending:
        task.cancel()
    if pending:
        _, stuck = await asyncio.wait(pending, timeout=timeout_s)
        assert not stuck, f"tasks that would not stop: {[repr(task) for task in stuck]}"


def replica_killer(deployment: str, app: str = "", replica: str = ""):
    """A callable that kills (no restart: Serve starts a replacement) the first replica of `deployment` (of `app`,
    when given; the one whose unique id is `replica`, when given) in the connected Ray cluster."""
    def kill() -> None:
        import ray

        for actor in ray.util.list_named_actors(all_namespaces=True):
            if f"{app}#{deployment}#" in actor["name"] and actor["name"].endswith(f"#{replica}" if replica else ""):
                ray.kill(ray.get_actor(actor["name"], namespace=actor["namespace"]), no_restart=True)
                return
        raise AssertionError(f"no {deployment} replica {replica} found" + (f" in app {app!r}" if app else ""))

    return kill


def step_actor_killer(app: str, step: int = 1):
    """A callable that kills pipelined step `step`'s actor of `app`'s ScoreWorkerGroup replica, the replica itself
    left running (its step actors are named `facecast-step<k>:<replica id>:...`)."""
    def kill() -> None:
        import ray

        named = ray.util.list_named_actors(all_namespaces=True)
        replicas = [actor["name"].rsplit("#", 1)[-1] for actor in named if f"{app}#ScoreWorkerGroup#" in actor["name"]]
        for actor in named:
            if any(actor["name"].startswith(f"facecast-step{step}:{replica}:") for replica in replicas):
                ray.kill(ray.get_actor(actor["name"], namespace=actor["namespace"]), no_restart=True)
                return
        raise AssertionError(f"no step {step} actor of app {app!r} found (replicas {replicas})")

    return kill
