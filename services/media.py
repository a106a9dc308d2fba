"""Media input/output for facecast: images, audio and MP4 video.

This module is the boundary between user-supplied files and the model:

* :func:`load_image` / :func:`decode_image_bytes` read a reference portrait
  (PNG, JPEG, WebP, ... anything Pillow decodes) as an RGB image, and
  :func:`image_to_tensor` turns it into the ``[3, H, W]`` float tensor in
  ``[-1, 1]`` that the generator consumes.
* :func:`load_audio` decodes any audio file PyAV/FFmpeg understands (WAV, MP3,
  FLAC, Ogg, M4A, ...) to mono float32 samples.
* :func:`frames_to_uint8` converts generated frames back to ``uint8`` pixels,
  and :class:`Mp4Writer` streams them into an H.264 MP4 with the driving audio
  muxed in as AAC.
* :func:`probe_video` inspects a written video (used by tests and tooling).

Problems caused by the user's input (missing file, not an image, no audio
samples, odd video size, ...) raise :class:`MediaError`, whose message names
the file and the problem, so callers can report it verbatim. Programming
errors (wrong array shapes or dtypes) raise plain ``ValueError``/``TypeError``.

torch is imported only inside the two tensor conversions: the gRPC ingress validates images with this module and
must not load torch.
"""

from __future__ import annotations

import io
import math
from dataclasses import dataclass
from fractions import Fraction
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
    "Mp4Writer",
    "VideoInfo",
    "decode_image_bytes",
    "frames_to_uint8",
    "image_to_tensor",
    "load_audio",
    "load_image",
    "probe_video",
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


def image_to_tensor(image: PIL.Image.Image, width: int, height: int) -> "torch.Tensor":
    """Convert an image to a ``[3, height, width]`` float32 tensor in ``[-1, 1]``.

    The aspect ratio is preserved by *center-cropping* the image to the target
    aspect ratio first (cutting equal amounts from both sides of the longer
    dimension), then resizing the crop to exactly ``width x height`` with a
    Lanczos filter. No padding or stretching is applied.
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
    resized = image.crop(box).resize((width, height), PIL.Image.Resampling.LANCZOS)
    import torch

    pixels = np.asarray(resized, dtype=np.float32)  # [H, W, 3] in 0..255
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


# --------------------------------------------------------------------------- #
# Video writing
# --------------------------------------------------------------------------- #

_AUDIO_FRAME_SAMPLES = 1024  # AAC frame size
_FALLBACK_AUDIO_RATE = 48000
_AUDIO_BIT_RATE = 128_000
_BT709 = 1  # AVCOL_SPC/PRI/TRC_BT709


def _h264_encoder_name() -> str:
    """Prefer libx264 (supports crf/preset); fall back to FFmpeg's default 'h264'."""
    return "libx264" if "libx264" in av.codecs_available else "h264"


def _aac_supported_rates() -> set[int]:
    rates = av.codec.Codec("aac", "w").audio_rates
    return set(rates) if rates else {_FALLBACK_AUDIO_RATE}


def _resample_mono(audio: np.ndarray, src_rate: int, dst_rate: int) -> np.ndarray:
    """Resample mono float32 audio with FFmpeg's swresample."""
    resampler = av.AudioResampler(format="flt", layout="mono", rate=dst_rate)
    out: list[np.ndarray] = []
    step = 65536
    for start in range(0, len(audio), step):
        chunk = np.ascontiguousarray(audio[start : start + step], dtype=np.float32)
        frame = av.AudioFrame.from_ndarray(chunk[None, :], format="flt", layout="mono")
        frame.sample_rate = src_rate
        frame.pts = start
        frame.time_base = Fraction(1, src_rate)
        out.extend(f.to_ndarray().reshape(-1) for f in resampler.resample(frame))
    out.extend(f.to_ndarray().reshape(-1) for f in resampler.resample(None))
    if not out:
        return np.zeros(0, dtype=np.float32)
    return np.concatenate(out).astype(np.float32, copy=False)


class Mp4Writer:
    """Streams frames into an H.264 MP4 (yuv420p) with the input audio muxed as AAC.

    Use as a context manager::

        with Mp4Writer("out.mp4", fps=25, width=256, height=256,
                       audio=samples, sample_rate_hz=16000) as writer:
            for chunk in generated_chunks:
                writer.write(frames_to_uint8(chunk))

    The whole audio track is supplied up front. As video is written, audio up
    to the current video timestamp is encoded alongside it so the file is
    interleaved; :meth:`close` encodes the remainder of the audio (the full
    track is always muxed, even if it is longer than the video), flushes both
    encoders and finalises the container. The audio is encoded at its own
    sample rate if AAC supports it, otherwise resampled to 48 kHz.

    Video uses ``libx264`` when PyAV's FFmpeg has it (else the ``h264``
    encoder) with constant-quality ``crf`` and x264 ``preset``; frames are
    converted to yuv420p as BT.709 limited range and tagged so. Width and
    height must be even. ``fps`` may be fractional (29.97 -> 2997/100).
    """

    def __init__(
        self,
        path: str | Path,
        fps: float,
        width: int,
        height: int,
        audio: np.ndarray | None,
        sample_rate_hz: int | None,
        crf: int = 20,
        preset: str = "veryfast",
    ) -> None:
        self.path = Path(path)
        name = str(self.path)
        if width <= 0 or height <= 0:
            raise MediaError(
                f"{name}: video size must be positive, got width={width} height={height}"
            )
        if width % 2 or height % 2:
            raise MediaError(
                f"{name}: H.264 (yuv420p) needs an even width and height, "
                f"got width={width} height={height}"
            )
        if not (isinstance(fps, (int, float, Fraction)) and math.isfinite(fps) and fps > 0):
            raise MediaError(f"{name}: fps must be positive, got {fps}")

        self.width = int(width)
        self.height = int(height)
        self.rate = Fraction(fps).limit_denominator(1001)
        self.fps = float(self.rate)
        self.encoder_name = _h264_encoder_name()
        self.frames_written = 0
        self._closed = False

        # Validate and prepare audio before creating any file.
        self._audio: np.ndarray | None = None
        self._audio_rate: int | None = None
        self._audio_pos = 0
        if audio is not None:
            samples = np.asarray(audio)
            if samples.ndim != 1:
                raise ValueError(f"audio must be a 1-D mono array, got shape {samples.shape}")
            if samples.size == 0:
                raise MediaError(f"{name}: the audio track contains no audio samples")
            if not sample_rate_hz or sample_rate_hz <= 0:
                raise ValueError("sample_rate_hz is required (and positive) when audio is given")
            samples = np.clip(samples.astype(np.float32, copy=False), -1.0, 1.0)
            rate = int(sample_rate_hz)
            if rate not in _aac_supported_rates():
                samples = _resample_mono(samples, rate, _FALLBACK_AUDIO_RATE)
                rate = _FALLBACK_AUDIO_RATE
            self._audio = samples
            self._audio_rate = rate

        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self._container = av.open(
                str(self.path), mode="w", format="mp4", options={"movflags": "+faststart"}
            )
        except (av.error.FFmpegError, OSError) as exc:
            raise MediaError(f"{name} cannot be opened for writing ({exc})") from None

        try:
            self._video = self._container.add_stream(self.encoder_name, rate=self.rate)
            self._video.width = self.width
            self._video.height = self.height
            self._video.pix_fmt = "yuv420p"
            ctx = self._video.codec_context
            ctx.colorspace = ctx.color_primaries = ctx.color_trc = _BT709
            ctx.color_range = 1  # MPEG / limited range
            self._video.codec_context.time_base = 1 / self.rate
            if self.encoder_name.startswith("libx264"):
                self._video.options = {"crf": str(int(crf)), "preset": preset}

            self._audio_stream = None
            if self._audio is not None:
                self._audio_stream = self._container.add_stream(
                    "aac", rate=self._audio_rate, layout="mono"
                )
                self._audio_stream.codec_context.time_base = Fraction(1, self._audio_rate)
                # FFmpeg's native AAC encoder defaults to a low bit rate that audibly
                # distorts tonal content; ask for up to 128 kb/s (AAC caps mono at
                # 6144 bits per 1024-sample frame, i.e. 6 bits/sample).
                self._audio_stream.bit_rate = min(_AUDIO_BIT_RATE, 6 * self._audio_rate)
        except BaseException:
            self._container.close()
            raise

    # -- context manager ---------------------------------------------------- #

    def __enter__(self) -> Mp4Writer:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.close()
        else:
            # Don't mask the original error with a secondary one from closing.
            try:
                self.close()
            except Exception:
                pass

    # -- writing ------------------------------------------------------------ #

    def write(self, frames_uint8: np.ndarray) -> None:
        """Encode frames ``[T, H, W, 3]`` (uint8 RGB) and mux them."""
        if self._closed:
            raise RuntimeError(f"{self.path}: writer is closed")
        frames = np.asarray(frames_uint8)
        if frames.ndim == 3:
            frames = frames[None]
        expected = (self.height, self.width, 3)
        if frames.ndim != 4 or frames.shape[1:] != expected:
            raise ValueError(
                f"expected frames of shape [T, {self.height}, {self.width}, 3], "
                f"got {frames.shape}"
            )
        if frames.dtype != np.uint8:
            raise TypeError(f"expected uint8 frames, got {frames.dtype}")

        time_base = 1 / self.rate
        for rgb in frames:
            frame = av.VideoFrame.from_ndarray(np.ascontiguousarray(rgb), format="rgb24")
            # Convert explicitly so the pixels match the BT.709 tags set on the
            # stream (swscale's implicit default would be untagged BT.601).
            frame = frame.reformat(
                format="yuv420p",
                dst_colorspace="ITU709",
                dst_color_range="MPEG",
                dst_color_trc=_BT709,
                dst_color_primaries=_BT709,
            )
            frame.pts = self.frames_written
            frame.time_base = time_base
            self._container.mux(self._video.encode(frame))
            self.frames_written += 1

        # Keep audio roughly in step with video so the file is interleaved.
        if self._audio is not None:
            until = int(self.frames_written / self.rate * self._audio_rate)
            self._encode_audio(until)

    def _encode_audio(self, until: int) -> None:
        """Encode audio samples up to ``until`` in whole AAC-sized frames."""
        assert self._audio is not None and self._audio_stream is not None
        end = min(until, len(self._audio))
        time_base = Fraction(1, self._audio_rate)
        while self._audio_pos < end:
            stop = min(self._audio_pos + _AUDIO_FRAME_SAMPLES, len(self._audio))
            if stop - self._audio_pos < _AUDIO_FRAME_SAMPLES and stop < len(self._audio):
                break  # wait for a full frame unless it's the end of the track
            chunk = np.ascontiguousarray(self._audio[None, self._audio_pos : stop])
            frame = av.AudioFrame.from_ndarray(chunk, format="fltp", layout="mono")
            frame.sample_rate = self._audio_rate
            frame.pts = self._audio_pos
            frame.time_base = time_base
            self._container.mux(self._audio_stream.encode(frame))
            self._audio_pos = stop

    def close(self) -> None:
        """Flush video, encode and mux the rest of the audio, close the file."""
        if self._closed:
            return
        self._closed = True
        try:
            self._container.mux(self._video.encode(None))
            if self._audio is not None:
                self._encode_audio(len(self._audio))
                self._container.mux(self._audio_stream.encode(None))
        finally:
            self._container.close()


# --------------------------------------------------------------------------- #
# Probing
# --------------------------------------------------------------------------- #


@dataclass(frozen=True)
class VideoInfo:
    """Summary of a video file as returned by :func:`probe_video`."""

    num_frames: int
    fps: float
    width: int
    height: int
    has_audio: bool
    audio_duration_s: float | None
    video_codec: str


def probe_video(path: str | Path) -> VideoInfo:
    """Inspect a video file.

    The frame count is exact (all video frames are decoded); fps comes from
    the stream's average frame rate; the audio duration is the first audio
    stream's stated duration (falling back to counting decoded samples).

    Raises:
        MediaError: the file is missing, unreadable, or has no video stream.
    """
    path = Path(path)
    name = str(path)
    if not path.is_file():
        raise MediaError(f"{name} is not a readable video file: file not found")
    try:
        with av.open(str(path), mode="r") as container:
            if not container.streams.video:
                raise MediaError(f"{name} has no video stream")
            video = container.streams.video[0]
            rate = video.average_rate or video.guessed_rate or video.base_rate
            fps = float(rate) if rate else 0.0
            codec = video.codec_context.name
            width = video.codec_context.width
            height = video.codec_context.height
            audio = container.streams.audio[0] if container.streams.audio else None
            has_audio = audio is not None
            audio_rate = audio.codec_context.sample_rate if audio is not None else 0

            # One pass over the file, decoding video and (first) audio stream.
            num_frames = 0
            audio_samples = 0
            streams = [video] if audio is None else [video, audio]
            for packet in container.demux(*streams):
                for frame in packet.decode():
                    if packet.stream.index == video.index:
                        num_frames += 1
                    else:
                        audio_samples += frame.samples
                        audio_rate = audio_rate or frame.sample_rate

            audio_duration: float | None = None
            if audio is not None:
                # Prefer the container's stated duration: for MP4 it honours the
                # edit list, which trims AAC priming and end-of-track padding that
                # decoding would count. Fall back to the decoded sample count.
                if audio.duration is not None and audio.time_base is not None:
                    audio_duration = float(audio.duration * audio.time_base)
                elif audio_rate:
                    audio_duration = audio_samples / audio_rate
    except MediaError:
        raise
    except (av.error.FFmpegError, OSError, ValueError) as exc:
        raise MediaError(f"{name} is not a readable video file ({exc})") from None

    return VideoInfo(
        num_frames=num_frames,
        fps=fps,
        width=width,
        height=height,
        has_audio=has_audio,
        audio_duration_s=audio_duration,
        video_codec=codec,
    )
