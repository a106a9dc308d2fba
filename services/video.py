"""MP4 video for facecast: :class:`Mp4Writer` streams frames into an H.264 MP4 with the voice muxed in as AAC
(the whole track up front, or streamed piece by piece with the video), and :func:`probe_video` inspects a written
file (tests and tooling). Input problems raise ``services.media.MediaError`` naming the file.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path

import av
import av.error
import numpy as np

from services.media import MediaError

__all__ = ["Mp4Writer", "VideoInfo", "probe_video"]

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
        stream_audio: bool = False,
    ) -> None:
        """``stream_audio``: the audio track (at ``sample_rate_hz``) arrives piecewise through
        :meth:`append_audio` as the video is written (``audio`` must then be None)."""
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
        self._audio_open = False     # streamed audio: more may come, so only whole AAC frames are encoded
        self._source_rate: int | None = None
        if stream_audio:
            if audio is not None:
                raise ValueError("stream_audio takes its audio through append_audio; pass audio=None")
            if not sample_rate_hz or sample_rate_hz <= 0:
                raise ValueError("sample_rate_hz is required (and positive) with stream_audio")
            self._source_rate = int(sample_rate_hz)
            rate = self._source_rate if self._source_rate in _aac_supported_rates() else _FALLBACK_AUDIO_RATE
            self._audio, self._audio_rate, self._audio_open = np.zeros(0, np.float32), rate, True
        elif audio is not None:
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
        self._catch_up_audio()

    def append_audio(self, samples: np.ndarray) -> None:
        """More of the audio track (mono, float in [-1, 1] or int16) at the ``sample_rate_hz`` given; only with
        ``stream_audio``."""
        if not self._audio_open:
            raise RuntimeError(f"{self.path}: append_audio needs a writer made with stream_audio=True, still open")
        samples = np.asarray(samples)
        if samples.ndim != 1:
            raise ValueError(f"audio must be a 1-D mono array, got shape {samples.shape}")
        if samples.dtype == np.int16:
            samples = samples.astype(np.float32) / 32768.0
        samples = np.clip(samples.astype(np.float32, copy=False), -1.0, 1.0)
        if self._source_rate != self._audio_rate:
            samples = _resample_mono(samples, self._source_rate, self._audio_rate)
        self._audio = np.concatenate([self._audio, samples])
        self._catch_up_audio()

    def _catch_up_audio(self) -> None:
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
            if stop - self._audio_pos < _AUDIO_FRAME_SAMPLES and (stop < len(self._audio) or self._audio_open):
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
        self._audio_open = False
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
