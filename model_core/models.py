"""Model construction: the DiT and VAE of a preset, from a facecast checkpoint or seeded random weights, on a device.

    build_models(preset, checkpoint, device, dtype, seed, audio_config) -> (dit, vae, weights note)
      audio_config_for    the audio front end a checkpoint was trained with (else the preset's)
      resolve_checkpoint  the checkpoint given, else the preset's shipped weights (`weights`), else None (random)
      build_dit    checkpoint: `load_facecast_checkpoint`; none: `random_dit(dit_config_for(...))`
      build_vae    checkpoint with a VAE inside: its weights; else the preset's shipped VAE (`vae_weights`);
                   else the preset's VAE shape, seeded
    resolve_device("auto" | "cpu" | "cuda" | "cuda:N") -> torch.device
    torch_dtype("float32" | "bfloat16" | "float16") -> torch.dtype

Every process that needs weights builds them here: the in-process engine (`AvatarEngine.from_preset`), each score
and VAE worker of the cluster, and the CLI.  The same preset, checkpoint and seed give the same weights on the same
device type everywhere, which is what lets the cluster's frames equal the engine's.

This module knows presets, checkpoints and devices; it knows nothing of sessions, streaming or Ray.  The allowed
device and dtype names are `model_core.config.DEVICES` / `DTYPES` (torch-free, so configs can check them).
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import torch

from .audio import AudioConfig, AudioFrontend
from .checkpoint import (VAE_PREFIX, CheckpointError, audio_backend_of, dit_config_from_metadata,
                         load_facecast_checkpoint, read_facecast_metadata, read_state_dict)
from .config import DEVICES, DTYPES, ConfigError, DiTConfig, PresetConfig
from .dit import CausalAvatarDiT
from .shipped import shipped_path
from .vae import StreamingVAE

# ============================================================================================ device and dtype


def resolve_device(name: str, field: str = "device") -> torch.device:
    """'auto' (CUDA when this machine has it, else CPU), 'cpu', 'cuda' or 'cuda:N' -> a usable torch.device.

    `field` is how the caller names the setting in errors (e.g. "--device" for the CLI).
    """
    allowed = f"allowed: auto, {', '.join(DEVICES)}, cuda:N"
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    kind, colon, number = str(name).partition(":")
    if kind not in DEVICES or (colon and (kind != "cuda" or not number.isdigit())):
        raise ConfigError(f"{field}={name!r} is invalid: {allowed}")
    if kind == "cuda":
        if not torch.cuda.is_available():
            raise ConfigError(f"{field}={name!r} asks for CUDA, but this machine has no CUDA device; use cpu")
        count = torch.cuda.device_count()
        if colon and int(number) >= count:
            raise ConfigError(f"{field}={name!r} is invalid: this machine has {count} CUDA device(s), "
                              f"cuda:0 to cuda:{count - 1}")
    return torch.device(name)


def torch_dtype(name: str, field: str = "dtype") -> torch.dtype:
    """'float32', 'bfloat16' or 'float16' -> the torch dtype. `field` names the setting in errors."""
    if name not in DTYPES:
        raise ConfigError(f"{field}={name!r} is invalid: allowed: {', '.join(DTYPES)}")
    return getattr(torch, name)


# ============================================================================================ models


def build_models(preset: PresetConfig, *, checkpoint: str | None, device, dtype, seed: int,
                 audio_config: AudioConfig) -> tuple[CausalAvatarDiT, StreamingVAE, str]:
    """The DiT and VAE for a preset, from a facecast checkpoint or seeded random weights, and a note saying which."""
    dit, note = build_dit(preset, checkpoint=checkpoint, device=device, dtype=dtype, seed=seed,
                          audio_config=audio_config)
    return dit, build_vae(preset, checkpoint=checkpoint, device=device, seed=seed), note


def resolve_checkpoint(preset: PresetConfig, checkpoint: str | None, required: bool = True) -> str | None:
    """The checkpoint to load: the one given; else the trained weights the preset ships (`preset.weights`, in
    `checkpoints/`), which must then exist (`required`; else None when they do not); else None (the preset's shape
    with seeded random weights)."""
    if checkpoint or not preset.weights:
        return checkpoint or None
    path = shipped_path(preset.weights)
    if not path.is_file():
        if not required:
            return None
        raise CheckpointError(f"preset {preset.name!r} streams the trained weights {str(path)!r}, which are missing; "
                              f"train them with `facecast train student` (or restore checkpoints/ from git), or "
                              f"choose a random-weight preset (tiny, small)")
    return str(path)


def audio_config_for(preset: PresetConfig, checkpoint: str | None, backend: str | None = None,
                     **fields) -> AudioConfig:
    """The audio front end a session feeds this preset/checkpoint: `backend` when the caller names one, else the one
    the checkpoint (or the preset's shipped weights) was trained with, else the preset's (`PresetConfig.audio_backend`).
    `fields`: AudioConfig's others."""
    if backend is None:
        checkpoint = resolve_checkpoint(preset, checkpoint, required=False)
        backend = audio_backend_of(read_facecast_metadata(checkpoint)) if checkpoint else preset.audio_backend
    return AudioConfig(backend=backend, **fields)


def dit_config_for(preset: PresetConfig, checkpoint: str | None, audio_config: AudioConfig) -> DiTConfig:
    """The DiT shape a preset/checkpoint gives (random weights: audio width follows the audio front-end)."""
    checkpoint = resolve_checkpoint(preset, checkpoint)
    if checkpoint:
        return dit_config_from_metadata(read_facecast_metadata(checkpoint))
    return dataclasses.replace(preset.dit, audio_dim=AudioFrontend(audio_config).feature_dim)


def build_dit(preset: PresetConfig, *, checkpoint: str | None, device, dtype, seed: int,
              audio_config: AudioConfig) -> tuple[CausalAvatarDiT, str]:
    """The DiT from `checkpoint` (or the preset's shipped weights), or seeded random weights of the preset's shape;
    and a note saying which."""
    checkpoint = resolve_checkpoint(preset, checkpoint)
    if checkpoint:
        dit, _, _ = load_facecast_checkpoint(checkpoint, device=device, dtype=dtype)
        return dit, f"weights: {checkpoint}"
    dit = random_dit(dit_config_for(preset, None, audio_config), seed, device, dtype)
    return dit, "weights: RANDOM (no trained checkpoint given) - the video shows noise, not a face"


def build_vae(preset: PresetConfig, *, checkpoint: str | None, device, seed: int) -> StreamingVAE:
    """The VAE stored in `checkpoint` (or the preset's shipped weights) when it carries one, else the preset's shipped
    VAE (`vae_weights`), else the preset's VAE shape with seeded weights. (The training stages ask for the preset's
    VAE before its score model exists: missing shipped weights are not an error here.)"""
    checkpoint = resolve_checkpoint(preset, checkpoint, required=False)
    if checkpoint:
        metadata = read_facecast_metadata(checkpoint)
        if "vae_config" in metadata:
            state = read_state_dict(checkpoint)
            vae_state = {key[len(VAE_PREFIX):]: value for key, value in state.items() if key.startswith(VAE_PREFIX)}
            return StreamingVAE.from_state(metadata["vae_config"], vae_state, device=device)
    if preset.vae_weights:
        path = shipped_path(preset.vae_weights)
        if not (path / "config.json").is_file():
            raise CheckpointError(f"preset {preset.name!r} uses the trained VAE {str(path)!r}, which is missing; "
                                  f"train it with `facecast train vae` (or restore checkpoints/ from git)")
        return StreamingVAE.from_pretrained(path, device=device)
    vae = StreamingVAE.from_config(preset.vae, seed=seed)
    return StreamingVAE(vae.vae.to(device=device))


def build_fast_decoder(preset: PresetConfig, vae: StreamingVAE, *, device="cpu", dtype=torch.float32,
                       path: str | None = None):
    """The fast decoder at `path`, else the preset's shipped one (`fast_decoder_weights`); None when the preset has
    none, its file is missing or it belongs to another VAE (sessions then cannot choose decoder='fast', and say so).
    A `path` distilled for another VAE than `vae` is refused: it would draw nonsense from these latents."""
    import json

    from .fastdecode import CONFIG_FILE, FastDecoder
    from .vae import vae_digest

    shipped = path is None
    if shipped:
        if not preset.fast_decoder_weights or not (shipped_path(preset.fast_decoder_weights) / CONFIG_FILE).is_file():
            return None
        path = str(shipped_path(preset.fast_decoder_weights))
    recorded = json.loads((Path(path) / CONFIG_FILE).read_text()).get("vae_digest") if Path(path).is_dir() else None
    if shipped and recorded != vae_digest(vae):
        return None          # a checkpoint brought its own VAE: the shipped fast decoder does not belong to it
    decoder = FastDecoder.from_pretrained(path, device=device, dtype=dtype)
    if recorded and recorded != vae_digest(vae):
        raise CheckpointError(f"the fast decoder {path!r} was distilled for another VAE (digest {recorded}, this one "
                              f"{vae_digest(vae)}); train one for it with `facecast train fast-decoder --vae ...`")
    return decoder


def random_dit(config: DiTConfig, seed: int, device="cpu", dtype=torch.float32) -> CausalAvatarDiT:
    """A model with seeded random weights everywhere (the zero-initialised audio layers included,
    so audio changes the output as it would in a trained model). Built directly on `device`, so the
    wan-14b shape never materialises in host memory; the same seed gives the same weights on the same device type.
    """
    device = torch.device(device)
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []), torch.device(device):
        torch.manual_seed(seed)
        model = CausalAvatarDiT(config)
        for block in model.blocks:
            torch.nn.init.normal_(block.attn2.audio_v_proj.weight, std=config.dim ** -0.5)
        if model.audio_injection is not None:
            torch.nn.init.normal_(model.audio_injection.out.weight, std=model.audio_injection.out.in_features ** -0.5)
    return model.to(dtype)
