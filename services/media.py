"""Media input/output for facecast: images, audio and MP4 video.

This module is the boundary between user-supplied files and the model:

* :func:`load_image` / :func:`decode_image_bytes` read a reference portrait
  (PNG, JPEG, WebP, ... anything Pillow decodes) as an RGB image, and
  :func:`image_to_tensor` turns it into the ``[3, H, W]`` float tensor in
  ``[-1, 1]`` that the generator consumes.
* :func:`load_audio` decodes any audio file PyAV/FFmpeg understands (WAV, MP3,
  FLAC, Ogg, M4A, ...) to mono float32 samples.
* :func:`frames_to_uint8` converts generated frames back to ``uint8`` pixels
  (``services.video``'s :class:`Mp4Writer` streams them into an H.264 MP4 with
  the driving audio muxed in as AAC; :func:`probe_video` inspects one).

Problems caused by the user's input (missing file, not an image, no audio
samples, odd video size, ...) raise :class:`MediaError`, whose message names
the file and the problem, so callers can report it verbatim. Programming
errors (wrong array shapes or dtypes) raise plain ``ValueError``/``TypeError``.

torch is imported only inside the two tensor conversions: the gRPC ingress validates images with this module and
must not load torch.
"""

from __future__ import annotations

import io
from pathlib import Path
from typing import TYPE_CHECKING, BinaryIO

import av
import av.error
import numpy as np
import PIL.Image
import PIL.ImageOps

if TYPE_CHECKING:
    import torch

__all__ = [
    "MediaError",
    "decode_image_bytes",
    "frames_to_uint8",
    "image_to_tensor",
    "load_audio",
    "load_image",
]


class MediaError(ValueError):
    """A user-caused input problem; message names the file and the problem."""


# --------------------------------------------------------------------------- #
# Images
# --------------------------------------------------------------------------- #

_IMAGE_KINDS = "PNG/JPEG/WebP..."


def _not_an_image(name: str, reason: str) -> MediaError:
    return MediaError(f"{name} is not a readable image ({_IMAGE_KINDS}): {reason}")


def _open_image(source: BinaryIO | Path, name: str) -> PIL.Image.Image:
    """Fully decode ``source`` into an RGB image, mapping failures to MediaError."""
    try:
        with PIL.Image.open(source) as image:
            image.load()  # force a full decode so truncated files fail here
            image = PIL.ImageOps.exif_transpose(image)  # honour phone-camera rotation
            if image.width == 0 or image.height == 0:
                raise _not_an_image(name, "image has zero width or height")
            return _to_rgb(image)
    except MediaError:
        raise
    except PIL.UnidentifiedImageError:
        raise _not_an_image(name, "unrecognised image format") from None
    except PIL.Image.DecompressionBombError as exc:
        raise _not_an_image(name, f"image is too large ({exc})") from None
    except (OSError, SyntaxError, ValueError, EOFError) as exc:
        # Pillow reports truncated/corrupt data as OSError or SyntaxError.
        raise _not_an_image(name, f"corrupt or truncated image data ({exc})") from None


def _to_rgb(image: PIL.Image.Image) -> PIL.Image.Image:
    """Convert to RGB; transparent areas are flattened onto white."""
    if image.mode == "RGB":
        return image.copy()
    has_alpha = image.mode in ("RGBA", "LA", "PA") or (
        image.mode == "P" and "transparency" in image.info
    )
    if has_alpha:
        rgba = image.convert("RGBA")
        background = PIL.Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return PIL.Image.alpha_composite(background, rgba).convert("RGB")
    return image.convert("RGB")


def load_image(path: str | Path) -> PIL.Image.Image:
    """Read an image file (any format Pillow decodes) as an RGB ``PIL.Image``.

    EXIF orientation is applied and transparency is flattened onto white.

    Raises:
        MediaError: the file is missing, empty, not an image, or corrupt.
    """
    path = Path(path)
    name = str(path)
    if not path.exists():
        raise _not_an_image(name, "file not found")
    if not path.is_file():
        raise _not_an_image(name, "not a regular file")
    if path.stat().st_size == 0:
        raise _not_an_image(name, "file is empty (0 bytes)")
    return _open_image(path, name)


def decode_image_bytes(data: bytes, name: str = "image data") -> PIL.Image.Image:
    """Decode an in-memory encoded image (e.g. from an upload) to RGB.

    ``name`` is used in error messages to identify the input.

    Raises:
        MediaError: the bytes are empty, not an image, or corrupt.
    """
    if not isinstance(data, (bytes, bytearray, memoryview)):
        raise TypeError(f"expected bytes, got {type(data).__name__}")
    if len(data) == 0:
        raise _not_an_image(name, "no data (0 bytes)")
    return _open_image(io.BytesIO(bytes(data)), f"{name} ({len(data)} bytes)")


def fit_image(image: PIL.Image.Image, width: int, height: int) -> PIL.Image.Image:
    """The RGB image at exactly ``width x height``: *center-cropped* to the target aspect ratio first (cutting equal
    amounts from both sides of the longer dimension), then resized with a Lanczos filter. No padding or stretching.
    """
    if width <= 0 or height <= 0:
        raise ValueError(f"target size must be positive, got width={width} height={height}")
    image = _to_rgb(image) if image.mode != "RGB" else image
    src_w, src_h = image.size
    if src_w == 0 or src_h == 0:
        raise MediaError("image has zero width or height")

    # Largest crop with the target aspect ratio, centered.
    target_aspect = width / height
    if src_w / src_h > target_aspect:  # too wide: crop left/right
        crop_w, crop_h = max(1, round(src_h * target_aspect)), src_h
    else:  # too tall (or exact): crop top/bottom
        crop_w, crop_h = src_w, max(1, round(src_w / target_aspect))
    left = (src_w - crop_w) // 2
    top = (src_h - crop_h) // 2
    box = (left, top, left + crop_w, top + crop_h)

    # Crop first (rather than resize(box=...)) so the filter never samples
    # pixels from outside the crop.
    return image.crop(box).resize((width, height), PIL.Image.Resampling.LANCZOS)


def image_to_tensor(image: PIL.Image.Image, width: int, height: int) -> "torch.Tensor":
    """Convert an image to a ``[3, height, width]`` float32 tensor in ``[-1, 1]`` (framed by `fit_image`: centre crop
    to the aspect ratio, then a Lanczos resize)."""
    import torch

    pixels = np.asarray(fit_image(image, width, height), dtype=np.float32)  # [H, W, 3] in 0..255
    tensor = torch.from_numpy(pixels / 127.5 - 1.0).permute(2, 0, 1).contiguous()
    return tensor.clamp_(-1.0, 1.0)


def frames_to_uint8(frames: "torch.Tensor") -> np.ndarray:
    """Map frames ``[T, 3, H, W]`` in ``[-1, 1]`` to ``[T, H, W, 3]`` uint8.

    Values are scaled with ``(x + 1) * 127.5``, rounded and clamped to 0..255,
    so -1 -> 0 and 1 -> 255.
    """
    import torch

    if frames.ndim != 4 or frames.shape[1] != 3:
        raise ValueError(f"expected frames of shape [T, 3, H, W], got {tuple(frames.shape)}")
    scaled = (frames.detach().to(torch.float32) + 1.0) * 127.5
    pixels = scaled.round_().clamp_(0, 255).to(torch.uint8)
    return pixels.permute(0, 2, 3, 1).contiguous().cpu().numpy()


# --------------------------------------------------------------------------- #
# Audio
# --------------------------------------------------------------------------- #

# Scale factors for converting integer sample formats to float in [-1, 1].
_INT_SCALE = {
    "s16": 32768.0,
    "s32": 2147483648.0,
    "s64": 9223372036854775808.0,
}


def _frame_to_mono(frame: av.AudioFrame) -> np.ndarray:
    """Decoded audio frame (any sample format/layout) -> mono float32."""
    fmt = frame.format
    channels = max(1, len(frame.layout.channels))
    data = frame.to_ndarray()
    if fmt.is_planar:
        data = data.reshape(channels, -1)
    else:  # packed / interleaved: [1, n * channels]
        data = data.reshape(-1, channels).T
    base = fmt.name.rstrip("p")
    if base == "u8":
        samples = (data.astype(np.float32) - 128.0) / 128.0
    elif base in _INT_SCALE:
        samples = (data.astype(np.float64) / _INT_SCALE[base]).astype(np.float32)
    else:  # flt / dbl
        samples = data.astype(np.float32)
    return samples.mean(axis=0, dtype=np.float32) if channels > 1 else samples[0]


def load_audio(path: str | Path) -> tuple[np.ndarray, int]:
    """Decode an audio file to ``(samples, sample_rate_hz)``.

    Accepts anything PyAV's FFmpeg can decode (WAV, MP3, FLAC, Ogg/Vorbis/Opus,
    M4A/AAC, and the audio track of video files). Multi-channel audio is
    downmixed by averaging channels. Samples are mono float32 in ``[-1, 1]``
    at the file's native rate (no resampling).

    Raises:
        MediaError: the file is missing, unreadable, has no audio stream, or
            contains no audio samples.
    """
    path = Path(path)
    name = str(path)
    if not path.exists():
        raise MediaError(f"{name} is not a readable audio file: file not found")
    if not path.is_file():
        raise MediaError(f"{name} is not a readable audio file: not a regular file")
    if path.stat().st_size == 0:
        raise MediaError(f"{name} is not a readable audio file: file is empty (0 bytes)")

    chunks: list[np.ndarray] = []
    try:
        with av.open(str(path), mode="r") as container:
            if not container.streams.audio:
                raise MediaError(f"{name} has no audio stream")
            stream = container.streams.audio[0]
            sample_rate = stream.codec_context.sample_rate or stream.rate
            for frame in container.decode(stream):
                if frame.samples:
                    chunks.append(_frame_to_mono(frame))
                    sample_rate = sample_rate or frame.sample_rate
    except MediaError:
        raise
    except (av.error.FFmpegError, OSError, ValueError) as exc:
        raise MediaError(f"{name} is not a readable audio file ({exc})") from None

    if not chunks or sum(len(c) for c in chunks) == 0:
        raise MediaError(f"{name} contains no audio samples")
    if not sample_rate:
        raise MediaError(f"{name} has an unknown sample rate")
    samples = np.concatenate(chunks).astype(np.float32, copy=False)
    np.clip(samples, -1.0, 1.0, out=samples)
    return samples, int(sample_rate)
