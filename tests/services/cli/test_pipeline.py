"""`facecast train all --profile tiny`: every stage, in order, in one command, on a handful of clips; the dry run
that must pass before a GPU is spent on the same command with `--profile gpu`."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

from model_core.checkpoint import read_facecast_metadata
from model_core.training.latents import vae_digest
from model_core.vae import StreamingVAE
from model_core.world.speech import espeak_available

REPO = Path(__file__).resolve().parents[3]
pytestmark = [pytest.mark.skipif(not espeak_available(), reason="libespeak-ng missing: run `make espeak-ng`"),
              pytest.mark.integration, pytest.mark.slow]


def facecast(*args, timeout=1200):
    return subprocess.run([sys.executable, "-m", "services.cli", *args], capture_output=True, text=True,
                          timeout=timeout, cwd=REPO, env={**__import__("os").environ, "OMP_NUM_THREADS": "1"})


def test_train_all_tiny_runs_every_stage_into_one_folder_and_resumes(tmp_path):
    root = tmp_path / "pipeline"
    first = facecast("train", "all", "--profile", "tiny", "--run-dir", str(root), "--quiet")
    assert first.returncode == 0, first.stderr[-4000:]
    summary = json.loads((root / "summary.json").read_text())
    assert list(summary["wall_s"]) == ["world", "vae", "vae-decoder", "vae-motion", "vae-noise", "probe", "teacher",
                                       "student-init", "distill", "package", "eval"]
    assert summary["eval"]["clips"] >= 1 and -1.0 <= summary["eval"]["sync_r"] <= 1.0
    # the DiT stages trained in the pipeline's own latent space, not the shipped VAE's ...
    own = StreamingVAE.from_pretrained(root / "vae")
    recipe = json.loads((root / "vae" / "decoder-train.json").read_text())["train"]
    assert (recipe["motion_weight"], recipe["latent_noise"]) == (1.0, 0.5)
    manifest = json.loads((root / "latents" / "manifest.json").read_text())
    assert manifest["vae_digest"] == vae_digest(own)
    # ... and the student ships with that VAE inside, so `--checkpoint` alone decodes it right
    metadata = read_facecast_metadata(root / "student.safetensors")
    assert metadata["vae_config"]["z_dim"] == own.z_dim and metadata["stage"] == "distill"
    assert not (REPO / "checkpoints" / "student.safetensors").exists()
    again = facecast("train", "all", "--profile", "tiny", "--run-dir", str(root), "--quiet")
    assert again.returncode == 0, again.stderr[-4000:]
    assert again.stdout.count("done already") == 11
