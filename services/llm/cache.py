"""The cascade's cache directory (`$FACECAST_CACHE_DIR`, else ~/.cache/facecast): models made once from packages."""

from __future__ import annotations

import os
import shutil
from pathlib import Path


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
