"""The cascade's models: where their packages are, and the cache directory (`$FACECAST_CACHE_DIR`, else
~/.cache/facecast) where they are made once from them. The helpers live with the first model that needed them outside
the cascade (Whisper base, also the score model's speech encoder: `model_core.audio_whisper`)."""

from model_core.audio_whisper import atomic_dir, package_dir

__all__ = ["atomic_dir", "package_dir"]
