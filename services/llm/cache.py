"""The cascade's models: where their packages are, and the cache directory (`$FACECAST_CACHE_DIR`, else
~/.cache/facecast) where they are made once from them."""

from __future__ import annotations

import importlib.util
import os
import shutil
from pathlib import Path


def package_dir(module: str) -> Path:
    """Where an installed package's files are (the models ship inside wheels)."""
    return Path(importlib.util.find_spec(module).submodule_search_locations[0])


def atomic_dir(target: Path, build) -> Path:
    """`target`, made by build(tmp_dir) once (a crash leaves no half-made directory behind)."""
    if target.is_dir():
        return target
    tmp = target.with_name(f"{target.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    build(tmp)
    try:
        tmp.rename(target)
    except OSError:                     # another process made it first
        shutil.rmtree(tmp, ignore_errors=True)
    return target
