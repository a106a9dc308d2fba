"""Checkpoints in safetensors.

* `load_wan_transformer(model, path)` — a Wan2.1 transformer in diffusers layout (a directory with `config.json` and
  `diffusion_pytorch_model*.safetensors`, sharded or not, or a single `.safetensors` file) into `CausalAvatarDiT`.
  Every base key must match; only the new layers (audio, reference embedder) may be missing.  Anything else
  is an error that lists the keys.
* `save_facecast_checkpoint` / `load_facecast_checkpoint` — our own single-file format: the DiT weights plus its
  `DiTConfig` (and optionally the VAE's) in the safetensors metadata, so `--checkpoint` alone rebuilds the model;
  a trained one also records its audio front end (`audio_backend_of`).

Loading never downloads anything: paths are local.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from .config import DiTConfig
from .dit import CausalAvatarDiT

NEW_LAYER_MARKERS = ("audio_projection.", "reference_embedder.", ".audio_k_proj.", ".audio_v_proj.",
                     ".norm_audio_k.")
IGNORED_KEYS = ("norm_added_q",)  # present in some Wan checkpoints, unused (diffusers ignores it too)
AUDIO_FRONTEND_KEY = "audio_frontend"
"""Metadata of a trained score model: the audio front end ({"backend", "fps", "feature_dim"}) its features came from.
Checkpoints without it were trained on "logmel" (`audio_backend_of`)."""
FORMAT_KEY = "facecast_format"
FORMAT_VERSION = "1"


class CheckpointError(ValueError):
    """The checkpoint at a user-given path cannot be used; the message says why."""


@dataclass(frozen=True)
class LoadReport:
    loaded: int
    new_layers: list[str]
    ignored: list[str]


def _is_new(key: str) -> bool:
    return any(marker in key for marker in NEW_LAYER_MARKERS)


def _safetensors_files(path: Path) -> list[Path]:
    if path.is_file():
        return [path]
    if path.is_dir():
        files = sorted(path.glob("*.safetensors"))
        if files:
            return files
        raise CheckpointError(f"no .safetensors files in {str(path)!r}")
    raise CheckpointError(f"checkpoint {str(path)!r} does not exist")


def read_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    state: dict[str, torch.Tensor] = {}
    for file in _safetensors_files(Path(path)):
        try:
            state.update(load_file(str(file)))
        except Exception as error:  # safetensors raises its own error types for corrupt files
            raise CheckpointError(f"{str(file)!r} is not a readable safetensors file: {error}") from None
    return state


def dit_config_from_diffusers(config: dict, audio_dim: int, text_len: int = 512, **overrides) -> DiTConfig:
    """Map a diffusers `WanTransformer3DModel` config.json onto `DiTConfig` (audio settings are ours)."""
    image_dim = config.get("image_dim")
    if image_dim is None:
        raise CheckpointError("the transformer has no image branch (image_dim is null: a Wan text-to-video model); "
                              "facecast needs the I2V layout with image_dim and added_kv_proj_dim")
    return DiTConfig(
        num_layers=config["num_layers"], num_heads=config["num_attention_heads"],
        head_dim=config["attention_head_dim"], ffn_dim=config["ffn_dim"], text_dim=config["text_dim"],
        text_len=text_len, image_dim=image_dim, audio_dim=audio_dim, in_channels=config["in_channels"],
        out_channels=config.get("out_channels") or config["in_channels"], patch_size=tuple(config["patch_size"]),
        freq_dim=config["freq_dim"], cross_attn_norm=config["cross_attn_norm"], eps=config["eps"], **overrides)


def load_wan_transformer(model: CausalAvatarDiT, path: str | Path, strict_base: bool = True) -> LoadReport:
    """Load Wan2.1 diffusers-layout weights into `model`; every base key must be present and used."""
    state = read_state_dict(path)
    ignored = [key for key in state if any(marker in key for marker in IGNORED_KEYS)]
    for key in ignored:
        del state[key]
    expected = model.state_dict()
    unexpected = sorted(set(state) - set(expected))
    missing = sorted(set(expected) - set(state))
    missing_base = [key for key in missing if not _is_new(key)]
    mismatched = sorted(key for key in set(state) & set(expected) if state[key].shape != expected[key].shape)
    problems = []
    if unexpected:
        problems.append(f"{len(unexpected)} key(s) in the checkpoint have no place in the model: {unexpected[:8]}")
    if missing_base and strict_base:
        problems.append(f"{len(missing_base)} base key(s) missing from the checkpoint: {missing_base[:8]}")
    if mismatched:
        problems.append("shape mismatch: " + ", ".join(
            f"{key} {tuple(state[key].shape)} vs model {tuple(expected[key].shape)}" for key in mismatched[:8]))
    if problems:
        raise CheckpointError(f"{path}: " + "; ".join(problems))
    model.load_state_dict(state, strict=False)
    return LoadReport(loaded=len(state), new_layers=[key for key in missing if _is_new(key)], ignored=ignored)


VAE_PREFIX = "vae."


def save_facecast_checkpoint(model: CausalAvatarDiT, path: str | Path, vae=None, extra: dict | None = None) -> None:
    """DiT weights (+ optionally a `StreamingVAE`'s, under `vae.`) and their configs in one safetensors file."""
    metadata = {FORMAT_KEY: FORMAT_VERSION, "dit_config": json.dumps(dataclasses.asdict(model.config))}
    tensors = {key: value.detach().contiguous().cpu() for key, value in model.state_dict().items()}
    if vae is not None:
        metadata["vae_config"] = json.dumps(vae.config_dict())
        tensors.update({VAE_PREFIX + key: value.detach().contiguous().cpu()
                        for key, value in vae.vae.state_dict().items()})
    for key, value in (extra or {}).items():
        metadata[key] = json.dumps(value)
    save_file(tensors, str(path), metadata=metadata)


def audio_backend_of(metadata: dict) -> str:
    """The audio front end a checkpoint was trained with (its `AUDIO_FRONTEND_KEY`; older checkpoints: "logmel")."""
    record = metadata.get(AUDIO_FRONTEND_KEY)
    return record["backend"] if record else "logmel"


def read_facecast_metadata(path: str | Path) -> dict:
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint {str(path)!r} does not exist")
    try:
        with safe_open(str(path), framework="pt") as handle:
            metadata = handle.metadata() or {}
    except Exception as error:
        raise CheckpointError(f"{str(path)!r} is not a readable safetensors file: {error}") from None
    if metadata.get(FORMAT_KEY) != FORMAT_VERSION:
        raise CheckpointError(f"{str(path)!r} is not a facecast checkpoint (no '{FORMAT_KEY}' metadata); "
                              "Wan diffusers checkpoints load with --wan-transformer")
    return {key: (value if key == FORMAT_KEY else json.loads(value)) for key, value in metadata.items()}


def dit_config_from_metadata(metadata: dict) -> DiTConfig:
    fields = dict(metadata["dit_config"])
    for key in ("patch_size", "reference_patch"):
        fields[key] = tuple(fields[key])
    return DiTConfig(**fields)


def load_facecast_checkpoint(path: str | Path, device="cpu",
                             dtype=torch.float32) -> tuple[CausalAvatarDiT, dict, dict | None]:
    """Returns (model, metadata, VAE state dict or None)."""
    metadata = read_facecast_metadata(path)
    model = CausalAvatarDiT(dit_config_from_metadata(metadata))
    state = read_state_dict(path)
    vae_state = {key[len(VAE_PREFIX):]: state.pop(key) for key in list(state) if key.startswith(VAE_PREFIX)}
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as error:
        raise CheckpointError(f"{str(path)!r} does not match its own dit_config: {error}") from None
    return model.to(device=device, dtype=dtype).eval(), metadata, (vae_state or None)
