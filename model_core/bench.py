"""The engine benchmark behind `facecast bench engine`, and the analytic FLOP count of one denoising step.

It runs one session on synthetic speech-like audio through the real `AvatarEngine` (one warm-up chunk, then
`chunks` measured ones) and reports TTFF, time between chunks split by stage (audio, each denoising step, VAE),
FPS, real-time factor and peak memory.  On CUDA it adds the FLOP-bound time per step (model FLOPs / peak dense
bf16 throughput of the GPU), so the distance to the hardware limit is visible.

Timing lives here and in BENCHMARKS.md, never in tests.
"""

from __future__ import annotations

import math
import os
import platform
import resource
import time

import numpy as np
import torch

from .config import DiTConfig, get_preset
from .engine import AvatarEngine, Character, region_masks, token_grid

# Dense bf16 tensor-core peaks (TFLOP/s, no sparsity) of GPUs we run on.
PEAK_BF16_TFLOPS = {"H100": 989.0, "H200": 989.0, "H800": 989.0, "A100": 312.0, "L40S": 362.0, "A10": 125.0}


def step_flops(config: DiTConfig, chunk_frames: int, tokens_per_frame: int, sink_frames: int = 1) -> float:
    """Matmul FLOPs of one denoising step of one chunk (2 x multiply-adds), with cached text/image keys/values."""
    dim, queries = config.dim, chunk_frames * tokens_per_frame
    self_keys = (sink_frames + 2 * chunk_frames) * tokens_per_frame
    audio_tokens = chunk_frames * config.audio_tokens_per_frame
    rh, rw = config.reference_patch
    context = config.text_len + tokens_per_frame * config.patch_size[1] * config.patch_size[2] // (rh * rw)
    per_block = (
        2 * queries * dim * dim * 4                          # attn1 q, k, v, out
        + 4 * queries * self_keys * dim                      # attn1 scores + weighted sum
        + 2 * queries * dim * dim * 2                        # attn2 q, out
        + 4 * queries * context * dim                        # attn2 over prompt + reference
        + 2 * audio_tokens * dim * dim * 2 + 4 * queries * config.audio_tokens_per_frame * dim  # audio branch
        + 2 * queries * dim * config.ffn_dim * 2             # ffn
    )
    embed = 2 * queries * dim * (config.in_channels * math.prod(config.patch_size)) * 2
    return float(config.num_layers * per_block + embed)


def speechlike(duration_s: float, sample_rate_hz: int = 16000, seed: int = 0) -> np.ndarray:
    """A voiced, syllable-rate-modulated signal: harmonics of a wandering pitch under a 4 Hz envelope."""
    rng = np.random.default_rng(seed)
    t = np.arange(int(duration_s * sample_rate_hz)) / sample_rate_hz
    pitch = 140 + 30 * np.sin(2 * np.pi * 0.7 * t)
    phase = 2 * np.pi * np.cumsum(pitch) / sample_rate_hz
    voice = sum(np.sin(k * phase) / k for k in range(1, 8))
    envelope = np.clip(np.sin(2 * np.pi * 4 * t), 0, None) ** 2
    signal = voice * envelope + 0.01 * rng.standard_normal(t.shape)
    return (0.3 * signal / np.max(np.abs(signal))).astype(np.float32)


CPU_FLAGS = ("avx2", "fma", "avx512f", "avx512_bf16", "avx512_vnni", "amx_bf16", "amx_tile")
"""The instruction-set flags that decide which CPU kernels PyTorch runs (named in every CPU figure)."""


def cpu_label() -> str:
    """The CPU as `lscpu` names it, with its cores and the flags of `CPU_FLAGS` it has: the label every absolute CPU
    figure carries (two VMs of one class can differ by 2-3x)."""
    name, flags = platform.processor() or platform.machine(), set()
    try:
        with open("/proc/cpuinfo") as handle:
            for line in handle:
                key, _, value = line.partition(":")
                if key.strip() == "model name":
                    name = value.strip()
                elif key.strip() == "flags":
                    flags = set(value.split())
                    break
    except OSError:
        pass
    present = [flag for flag in CPU_FLAGS if flag in flags]
    return f"{name}, {os.cpu_count()} cores, {' '.join(present) or 'no AVX2'}"


def _gpu_peak(device: torch.device) -> tuple[str, float | None]:
    name = torch.cuda.get_device_name(device)
    for key, peak in PEAK_BF16_TFLOPS.items():
        if key in name:
            return name, peak
    return name, None


def bench_engine(preset_name: str, device: str = "cpu", dtype: torch.dtype = torch.float32, steps: int | None = None,
                 chunk: int | None = None, chunks: int = 6, width: int | None = None, height: int | None = None,
                 compile: bool = False, progress: bool = True, sessions: int = 1, decoder: str = "full",
                 engine: AvatarEngine | None = None) -> dict:
    """One session streamed through the engine; with `sessions` > 1 also `bench_batch` (the report's "batch").
    `engine`: one already built for this preset, device and dtype (`bench gpu` builds each model once)."""
    preset = get_preset(preset_name)
    if sessions < 1:
        raise ValueError(f"sessions={sessions} is invalid: at least 1")
    if chunks < 1:
        raise ValueError(f"chunks={chunks} is invalid; need at least 1 measured chunk")
    torch_device = torch.device(device)
    if torch_device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(torch_device)
    build_started = time.perf_counter()
    if engine is None:
        engine = AvatarEngine.from_preset(preset, device=device, dtype=dtype, decoder=decoder)
    if compile:   # True: inductor; "reduce-overhead": inductor with the step captured as a CUDA graph
        engine.compile(**({"mode": compile} if isinstance(compile, str) else {}))
    stream = engine.stream_config(steps=steps, chunk_latent_frames=chunk, width=width, height=height)
    build_s = time.perf_counter() - build_started
    config = engine.dit.config
    ratio = config.temporal_compression
    total_latents = (chunks + 1) * stream.chunk_latent_frames
    duration_s = (ratio * (total_latents + config.audio_lookahead_latent_frames) + 2) / stream.fps
    audio = speechlike(duration_s)
    reference = torch.rand(3, stream.height, stream.width) * 2 - 1

    open_started = time.perf_counter()
    session = engine.open_session(reference, "a person talking to the camera", stream)
    open_s = time.perf_counter() - open_started
    piece = 640
    results, push_times = [], []
    chunk_ready_at, audio_needed_at = [], []
    started = time.perf_counter()
    from tqdm import tqdm

    with tqdm(total=chunks + 1, unit="chunk", desc=f"bench {preset.name}", disable=not progress) as bar:
        for offset in range(0, audio.shape[0], piece):
            push_times.append(time.perf_counter())
            produced = engine.push_audio(session, audio[offset:offset + piece], 16000)
            for result in produced:
                results.append(result)
                chunk_ready_at.append(time.perf_counter())
                audio_needed_at.append(push_times[-1])
                bar.update(1)
            if len(results) >= chunks + 1:
                break
    total_s = time.perf_counter() - started
    measured = results[1:chunks + 1]
    engine.close_session(session)

    frames = sum(result.num_frames for result in measured)
    gen_s = sum(result.timings.total_s for result in measured)
    chunk_duration_s = ratio * stream.chunk_latent_frames / stream.fps
    step_ms = [float(np.mean([r.timings.step_s[k] for r in measured]) * 1000) for k in range(stream.steps)]
    latent_h, latent_w = stream.height // preset.vae.spatial_compression, stream.width // preset.vae.spatial_compression
    tokens_per_frame = (latent_h // config.patch_size[1]) * (latent_w // config.patch_size[2])
    flops = step_flops(config, stream.chunk_latent_frames, tokens_per_frame, stream.sink_frames)
    report = {
        "preset": preset.name,
        "device": str(torch_device),
        "device_name": torch.cuda.get_device_name(torch_device) if torch_device.type == "cuda" else cpu_label(),
        "dtype": str(dtype).replace("torch.", ""),
        "compiled": compile,
        "decoder": decoder,
        "weights": engine.weights_note,
        "resolution": f"{stream.width}x{stream.height}",
        "chunk_latent_frames": stream.chunk_latent_frames,
        "steps": stream.steps,
        "parameters": sum(p.numel() for p in engine.dit.parameters()),
        "build_s": build_s,
        "session_open_ms": open_s * 1000,
        "ttff_ms": results[0].timings.total_s * 1000,
        "ttff_from_audio_ms": (chunk_ready_at[0] - audio_needed_at[0]) * 1000,
        "time_between_chunks_ms": gen_s / len(measured) * 1000,
        "stage_ms": {
            "audio": float(np.mean([r.timings.audio_s for r in measured]) * 1000),
            **{f"step_{k + 1}": value for k, value in enumerate(step_ms)},
            "vae_decode": float(np.mean([r.timings.vae_s for r in measured]) * 1000),
        },
        "chunk_duration_ms": chunk_duration_s * 1000,
        "fps": frames / gen_s,
        "real_time_factor": (gen_s / len(measured)) / chunk_duration_s,
        "wall_s": total_s,
        "step_tflops": flops / 1e12,
        "peak_memory_gib": (torch.cuda.max_memory_allocated(torch_device) if torch_device.type == "cuda"
                            else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024) / 2**30,
        "peak_memory_kind": "cuda max allocated" if torch_device.type == "cuda" else "process max RSS",
    }
    if sessions > 1:
        report["batch"] = bench_batch(engine, stream, sessions, chunks, progress=progress)
    if torch_device.type == "cuda":
        name, peak = _gpu_peak(torch_device)
        if peak:
            bound_ms = flops / (peak * 1e12) * 1000
            report["flop_bound_step_ms"] = bound_ms
            report["step_efficiency"] = bound_ms / float(np.mean(step_ms))
    return report


def bench_batch(engine: AvatarEngine, stream, sessions: int, chunks: int, progress: bool = True) -> dict:
    """Cross-session batching on the engine's score stage: `sessions` + 1 sessions share one pool; `chunks` batches
    of the `sessions` in consecutive slots (a view of the pool: the forward reads and writes the caches where they
    live), then `chunks` batches of as many sessions with a hole in their slots (the gathered path: each step copies
    the sessions' caches out of the pool and their new entries back, as every batch did before the pool). Reports
    the time per batched chunk and the bytes of session state copied per denoising step for each."""
    from tqdm import tqdm

    stage = engine.score
    reference = torch.rand(3, stream.height, stream.width, generator=torch.Generator().manual_seed(1)) * 2 - 1
    latent = engine.decoder.encode_reference(reference)
    grid = token_grid(engine.dit.config, latent)
    text = engine.text_states("a person talking to the camera")
    ratio = engine.dit.config.temporal_compression
    duration_s = (ratio * (2 * chunks + 2) * stream.chunk_latent_frames + 8) / stream.fps
    members, feeds = [], []
    for index in range(sessions + 1):
        session_stream = stream.replace(seed=stream.seed + index)
        members.append(stage.open(f"batch-{index}", session_stream, latent, text, region_masks([Character()], *grid)))
        audio = engine.audio.open(f"batch-{index}", session_stream, 1)
        pcm = speechlike(duration_s, seed=index)
        feeds.append(iter(engine.audio.push(audio, pcm, 16000) + engine.audio.end(audio)))
    pool = members[0].pool
    layouts = {"pool view": members[:sessions], "gathered": [members[0]] + members[2:]}
    report = {"sessions": sessions, "pool_capacity": pool.capacity}
    with tqdm(total=2 * (chunks + 1), unit="batch", desc=f"bench batch x{sessions}", disable=not progress) as bar:
        for layout, batch in layouts.items():
            times, copied = [], []
            for position in range(chunks + 1):       # the first batch of each layout warms up
                before = pool.gathered_bytes
                started = time.perf_counter()
                stage.denoise_batch(batch, [next(feeds[members.index(session)]) for session in batch])
                times.append(time.perf_counter() - started)
                copied.append(pool.gathered_bytes - before)
                bar.update(1)
            report[layout.replace(" ", "_")] = {
                "slots": [pool.slot_of(session) for session in batch],
                "chunk_ms": float(np.mean(times[1:]) * 1000),
                "copied_bytes_per_step": float(np.mean(copied[1:])) / stream.steps,
            }
    report["state_bytes_per_session"] = pool.nbytes / pool.capacity
    for session in members:
        stage.close(session)
    return report


def bench_decode(preset_name: str, chunks: int = 6, progress: bool = True) -> dict:
    """The streaming decode of one session's chunks, in one run, by every decoder the preset has: the full VAE with
    PyTorch's own conv3d choice (the before), the full VAE with its 3D convolutions through oneDNN (the default) and
    the fast decoder (when the preset ships one). Milliseconds per chunk and per frame, and the speed-up over the
    first; the same random latents (the decoders' cost does not depend on what they draw)."""
    from tqdm import tqdm

    from .models import build_fast_decoder, build_vae
    from .vae import set_conv3d_path

    preset = get_preset(preset_name)
    if chunks < 1:
        raise ValueError(f"chunks={chunks} is invalid; need at least 1 measured chunk")
    vae = build_vae(preset, checkpoint=None, device="cpu", seed=0)
    fast = build_fast_decoder(preset, vae)
    stream = preset.stream
    latent_h = stream.height // vae.spatial_compression
    latents = torch.randn(1, vae.z_dim, (chunks + 1) * stream.chunk_latent_frames, latent_h,
                          stream.width // vae.spatial_compression, generator=torch.Generator().manual_seed(0))
    variants = [("full, PyTorch's conv3d", vae, "native"), ("full", vae, "onednn")]
    if fast is not None:
        variants.append(("fast", fast, None))
    rows = []
    with tqdm(total=len(variants) * (chunks + 1), unit="chunk", desc=f"bench decode {preset.name}",
              disable=not progress) as bar:
        for name, decoder, conv3d in variants:
            if conv3d:
                set_conv3d_path(decoder.vae, conv3d)
            cache, times, frames = decoder.new_decode_cache(), [], 0
            for index in range(chunks + 1):      # chunk 0 (one latent frame less of video) warms up
                piece = latents[:, :, index * stream.chunk_latent_frames:(index + 1) * stream.chunk_latent_frames]
                started = time.perf_counter()
                out, cache = decoder.decode_chunk(piece, cache)
                if index:
                    times.append(time.perf_counter() - started)
                    frames += out.shape[2]
                bar.update(1)
            rows.append({"decoder": name, "chunk_ms": float(np.mean(times) * 1000),
                         "frame_ms": float(np.sum(times) * 1000 / frames)})
    set_conv3d_path(vae.vae, "onednn")
    for row in rows:
        row["speedup"] = rows[0]["chunk_ms"] / row["chunk_ms"]
    return {"preset": preset.name, "device_name": cpu_label(), "resolution": f"{stream.width}x{stream.height}",
            "chunk_latent_frames": stream.chunk_latent_frames, "chunks": chunks,
            "threads": torch.get_num_threads(), "decoders": rows}


def format_decode_report(report: dict) -> str:
    lines = [f"facecast bench decode — preset {report['preset']} ({report['resolution']}, chunk "
             f"{report['chunk_latent_frames']} latent frames) on {report['device_name']}, {report['threads']} "
             f"thread(s), {report['chunks']} chunks"]
    for row in report["decoders"]:
        lines.append(f"  {row['decoder']:24s} {row['chunk_ms']:8.1f} ms a chunk  {row['frame_ms']:6.2f} ms a frame  "
                     f"x{row['speedup']:.2f}")
    return "\n".join(lines)


def format_engine_report(report: dict) -> str:
    stages = ", ".join(f"{name} {value:.1f}" for name, value in report["stage_ms"].items())
    lines = [
        f"facecast bench engine — preset {report['preset']} on {report['device']} ({report['device_name']}), "
        f"{report['dtype']}{' compiled' if report['compiled'] else ''}, {report['decoder']} decoder",
        f"  {report['resolution']}, chunk {report['chunk_latent_frames']} latent frames, {report['steps']} steps, "
        f"{report['parameters'] / 1e6:.1f} M parameters",
        f"  session open            {report['session_open_ms']:.1f} ms",
        f"  TTFF (first chunk)      {report['ttff_ms']:.1f} ms  ({report['ttff_from_audio_ms']:.1f} ms after its audio "
        "arrived)",
        f"  time between chunks     {report['time_between_chunks_ms']:.1f} ms  (chunk plays "
        f"{report['chunk_duration_ms']:.0f} ms)",
        f"  by stage (ms)           {stages}",
        f"  FPS                     {report['fps']:.2f}",
        f"  real-time factor        {report['real_time_factor']:.3f}  (< 1: faster than real time)",
        f"  step FLOPs              {report['step_tflops']:.3f} TFLOP",
        f"  peak memory             {report['peak_memory_gib']:.2f} GiB ({report['peak_memory_kind']})",
    ]
    if "batch" in report:
        batch = report["batch"]
        lines.append(f"  batch of {batch['sessions']} sessions ({batch['state_bytes_per_session'] / 2**20:.2f} MiB of "
                     "state each):")
        for layout in ("pool_view", "gathered"):
            row = batch[layout]
            lines.append(f"    {layout.replace('_', ' '):10s} slots {row['slots']}: {row['chunk_ms']:.1f} ms a chunk, "
                         f"{row['copied_bytes_per_step'] / 2**20:.2f} MiB copied per step")
    if "flop_bound_step_ms" in report:
        lines.append(f"  FLOP-bound step         {report['flop_bound_step_ms']:.1f} ms  "
                     f"(achieved {report['step_efficiency'] * 100:.0f}% of peak bf16)")
    return "\n".join(lines)
