"""The `facecast` entry point (services/cli/main.py): the installed script's target, `python -m services.cli`, the
command list, and a user error printed as one line with status 2."""

import subprocess
import sys
import tomllib
from importlib import import_module
from pathlib import Path

from model_core.config import PRESETS
from services.cli.main import main

REPO = Path(__file__).resolve().parents[3]


def test_the_installed_script_runs_main():
    scripts = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["scripts"]
    module, _, name = scripts["facecast"].partition(":")
    assert getattr(import_module(module), name) is main


def test_console_script_exits_2_without_traceback(tmp_path):
    not_an_image = tmp_path / "notes.txt"
    not_an_image.write_text("this is not an image\n")
    result = subprocess.run([sys.executable, "-m", "services.cli", "generate", "--image", str(not_an_image),
                             "--audio", str(not_an_image), "--out", str(tmp_path / "o.mp4"), "--preset", "tiny"],
                            capture_output=True, text=True, timeout=120, cwd=REPO)
    assert result.returncode == 2, result.stderr
    assert "Traceback" not in result.stderr and result.stderr.startswith("facecast generate: error:")
    assert "notes.txt" in result.stderr


def test_presets_lists_every_preset(capsys):
    assert main(["presets"]) == 0
    listed = [line.split()[0] for line in capsys.readouterr().out.splitlines()]
    assert listed == list(PRESETS)
