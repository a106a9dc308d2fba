"""`facecast bench gpu`: the score step and the VAE decode at the shapes the GPU layouts serve, against the FLOP bound,
and what they project for the 1+1 and 4+1 layouts. One command, sized to run in minutes on one GPU.

    bench_gpu(shapes="full", device="cuda") -> report        ("tiny": the CPU dry run of the same code)
    format_gpu_table(report) -> the BENCHMARKS.md table

Cases: `wan-1.3b` and `wan-14b` (random weights: a step costs the same whatever the weights), each at 512x512 and at
720x416 (the 720x400 class: the reference patches tile at multiples of 32), chunk 3, bf16, eager, compiled
(`torch.compile` of the step) and, on CUDA, compiled with the step captured as a CUDA graph (mode
"reduce-overhead": one graph launch per step instead of one launch per kernel). Each case streams one session of 4
steps through the engine (`bench.bench_engine` with the model built once per preset) and records the mean time of
a step, of the VAE decode of a chunk (the preset's VAE is the real Wan2.1 shape) and of the audio front-end. 2 and
4 steps cost 2 and 4 of those steps.

Projections from the measured stage times (one session, no batching):
* 1+1 (TalkingMachines: score on one GPU, VAE on another, 2 steps, 512x512): the two GPUs overlap consecutive
  chunks, so a chunk is ready every max(audio + 2 steps, decode); TTFF = audio + 2 steps + decode.
* 4+1 (Live Avatar: one GPU per step, pipelined, plus the VAE's, 4 steps, 720x416): a chunk leaves every
  max(audio + 1 step, 1 step, decode); TTFF = audio + 4 steps + decode. The hops between GPUs (a chunk's latents,
  ~100 kB) are left out.
FPS = video frames per chunk / that interval. The FLOP-bound step is `bench.step_flops` over the GPU's dense bf16
peak (`bench.PEAK_BF16_TFLOPS`); on a CPU there is none.
"""

from __future__ import annotations

import time

import torch

FULL_CASES = (("wan-1.3b", (512, 512)), ("wan-1.3b", (720, 416)), ("wan-14b", (512, 512)), ("wan-14b", (720, 416)))
TINY_CASES = (("tiny", (64, 64)), ("tiny", (96, 64)))
LAYOUTS = {"1+1": {"steps": 2, "resolution": (512, 512)}, "4+1": {"steps": 4, "resolution": (720, 416)}}
TINY_LAYOUTS = {"1+1": {"steps": 2, "resolution": (64, 64)}, "4+1": {"steps": 4, "resolution": (96, 64)}}


def bench_gpu(shapes: str = "full", device: str = "cuda", chunks: int = 3, compile_modes=None,
              progress: bool = True) -> dict:
    """`compile_modes`: the step variants measured per case (default: eager, compiled and, on CUDA, compiled as a
    CUDA graph)."""
    from .bench import bench_engine, cpu_label
    from .engine import AvatarEngine
    from .sampler import step

    if shapes not in ("full", "tiny"):
        raise ValueError(f"shapes={shapes!r} is invalid; allowed: full, tiny")
    torch_device = torch.device(device)
    if shapes == "full" and torch_device.type != "cuda":
        raise ValueError("shapes='full' needs a CUDA device (wan-14b bf16 steps); the CPU dry run is shapes='tiny'")
    dtype = torch.bfloat16 if torch_device.type == "cuda" else torch.float32
    if compile_modes is None:
        compile_modes = (False, True, "reduce-overhead") if torch_device.type == "cuda" else (False, True)
    cases = FULL_CASES if shapes == "full" else TINY_CASES
    began = time.perf_counter()
    rows, engines = [], {}
    for preset, (width, height) in cases:
        if preset not in engines:
            engines.clear()            # one model at a time on the device
            if torch_device.type == "cuda":
                torch.cuda.empty_cache()
            engines[preset] = AvatarEngine.from_preset(preset, device=device, dtype=dtype)
        engine = engines[preset]
        for compiled in compile_modes:
            engine.score.step_fn = step
            report = bench_engine(preset, device=device, dtype=dtype, steps=4, chunks=chunks, width=width,
                                  height=height, compile=compiled, progress=progress, engine=engine)
            step_ms = [value for name, value in report["stage_ms"].items() if name.startswith("step_")]
            rows.append({
                "preset": preset, "resolution": f"{width}x{height}", "compiled": compiled,
                "step_ms": sum(step_ms) / len(step_ms), "vae_decode_ms": report["stage_ms"]["vae_decode"],
                "audio_ms": report["stage_ms"]["audio"], "step_tflops": report["step_tflops"],
                "flop_bound_step_ms": report.get("flop_bound_step_ms"),
                "frames_per_chunk": round(report["chunk_duration_ms"] * 25 / 1000),
                "chunk_duration_ms": report["chunk_duration_ms"],
                "peak_memory_gib": report["peak_memory_gib"],
            })
            bound = rows[-1]["flop_bound_step_ms"]
            rows[-1]["fraction_of_flop_bound"] = bound / rows[-1]["step_ms"] if bound else None
    engines.clear()
    return {"shapes": shapes, "device": str(torch_device),
            "device_name": torch.cuda.get_device_name(torch_device) if torch_device.type == "cuda" else cpu_label(),
            "dtype": str(dtype).replace("torch.", ""), "chunk_latent_frames": 3, "cases": rows,
            "projections": project(rows, LAYOUTS if shapes == "full" else TINY_LAYOUTS),
            "wall_s": time.perf_counter() - began}


def project(rows: list[dict], layouts: dict) -> list[dict]:
    """FPS and TTFF of each layout for each preset, from its measured stage times (the faster of eager/compiled)."""
    out = []
    for preset in dict.fromkeys(row["preset"] for row in rows):
        for layout, spec in layouts.items():
            resolution = "x".join(map(str, spec["resolution"]))
            measured = [row for row in rows if row["preset"] == preset and row["resolution"] == resolution]
            if not measured:
                continue
            best = min(measured, key=lambda row: row["step_ms"])
            steps, step_ms, decode, audio = spec["steps"], best["step_ms"], best["vae_decode_ms"], best["audio_ms"]
            if layout == "1+1":
                interval = max(audio + steps * step_ms, decode)
            else:
                interval = max(audio + step_ms, step_ms, decode)
            out.append({"preset": preset, "layout": layout, "steps": steps, "resolution": resolution,
                        "compiled": best["compiled"], "chunk_interval_ms": interval,
                        "fps": best["frames_per_chunk"] / interval * 1000,
                        "ttff_ms": audio + steps * step_ms + decode,
                        "real_time": interval <= best["chunk_duration_ms"]})
    return out


def format_gpu_table(report: dict) -> str:
    """The two Markdown tables BENCHMARKS.md records (measured cases; projected layouts)."""
    lines = [f"`facecast bench gpu` on {report['device_name']} ({report['dtype']}, chunk "
             f"{report['chunk_latent_frames']}, {report['wall_s']:.0f} s):", "",
             "| preset | resolution | compiled | step ms | FLOP-bound step ms | of the bound | VAE decode ms a chunk "
             "| peak GiB |", "| --- | --- | --- | --- | --- | --- | --- | --- |"]
    for row in report["cases"]:
        bound = f"{row['flop_bound_step_ms']:.1f}" if row["flop_bound_step_ms"] else "–"
        fraction = f"{row['fraction_of_flop_bound'] * 100:.0f} %" if row["fraction_of_flop_bound"] else "–"
        compiled = {False: "no", True: "yes"}.get(row["compiled"], f"yes, {row['compiled']} (CUDA graph)")
        lines.append(f"| {row['preset']} | {row['resolution']} | {compiled} | "
                     f"{row['step_ms']:.1f} | {bound} | {fraction} | {row['vae_decode_ms']:.1f} | "
                     f"{row['peak_memory_gib']:.1f} |")
    lines += ["", "| preset | layout | steps | resolution | chunk every ms | FPS | TTFF ms | real time |",
              "| --- | --- | --- | --- | --- | --- | --- | --- |"]
    for row in report["projections"]:
        lines.append(f"| {row['preset']} | {row['layout']} | {row['steps']} | {row['resolution']} | "
                     f"{row['chunk_interval_ms']:.1f} | {row['fps']:.1f} | {row['ttff_ms']:.0f} | "
                     f"{'yes' if row['real_time'] else 'no'} |")
    return "\n".join(lines)
