"""Tests for services.media: image/audio loading, tensor conversion, MP4 writing."""

from __future__ import annotations

import io
import wave
from pathlib import Path

import av
import numpy as np
import pytest
import torch
from PIL import Image

from services.media import (
    MediaError,
    decode_image_bytes,
    frames_to_uint8,
    image_to_tensor,
    load_audio,
    load_image,
)
from services.video import Mp4Writer, VideoInfo, probe_video

ASSETS = Path(__file__).resolve().parents[2] / "assets"


def _tone(seconds: float, rate: int, hz: float = 440.0, amp: float = 0.5) -> np.ndarray:
    t = np.arange(int(round(seconds * rate))) / rate
    return (amp * np.sin(2 * np.pi * hz * t)).astype(np.float32)


def _frames(n: int, height: int, width: int) -> np.ndarray:
    rng = np.random.default_rng(0)
    return rng.integers(0, 256, size=(n, height, width, 3), dtype=np.uint8)


def _write_wav(path: Path, samples_int16: np.ndarray, rate: int, channels: int) -> None:
    with wave.open(str(path), "wb") as w:
        w.setnchannels(channels)
        w.setsampwidth(2)
        w.setframerate(rate)
        w.writeframes(samples_int16.astype("<i2").tobytes())


# --------------------------------------------------------------------------- #
# Mp4Writer / probe_video
# --------------------------------------------------------------------------- #


def test_mp4_roundtrip_with_audio(tmp_path: Path) -> None:
    out = tmp_path / "out.mp4"
    frames = _frames(30, 48, 64)
    with Mp4Writer(out, fps=25, width=64, height=48, audio=_tone(1.2, 16000), sample_rate_hz=16000) as w:
        w.write(frames[:10])  # streamed in several chunks
        w.write(frames[10:])
    info = probe_video(out)
    assert isinstance(info, VideoInfo)
    assert info.num_frames == 30
    assert info.fps == pytest.approx(25.0)
    assert (info.width, info.height) == (64, 48)
    assert info.has_audio
    assert info.video_codec == "h264"
    assert info.audio_duration_s == pytest.approx(1.2, abs=0.05)

    # The audio track decodes back to a 440 Hz tone at the input rate.
    audio, rate = load_audio(out)
    assert rate == 16000
    spectrum = np.abs(np.fft.rfft(audio[2048:2048 + 8192]))
    peak_hz = np.argmax(spectrum) * rate / 8192
    assert peak_hz == pytest.approx(440, abs=5)


def test_mp4_fractional_fps(tmp_path: Path) -> None:
    out = tmp_path / "ntsc.mp4"
    with Mp4Writer(out, fps=29.97, width=32, height=32, audio=_tone(0.5, 44100), sample_rate_hz=44100) as w:
        w.write(_frames(15, 32, 32))
    info = probe_video(out)
    assert info.num_frames == 15
    assert info.fps == pytest.approx(29.97, abs=1e-3)
    assert info.audio_duration_s == pytest.approx(0.5, abs=0.05)


def test_mp4_without_audio_and_unsupported_rate(tmp_path: Path) -> None:
    silent = tmp_path / "silent.mp4"
    with Mp4Writer(silent, fps=25, width=32, height=32, audio=None, sample_rate_hz=None) as w:
        w.write(_frames(5, 32, 32))
    info = probe_video(silent)
    assert info.num_frames == 5 and not info.has_audio and info.audio_duration_s is None

    # 12345 Hz is not an AAC rate: resampled to 48 kHz, duration preserved.
    odd_rate = tmp_path / "odd_rate.mp4"
    with Mp4Writer(odd_rate, fps=25, width=32, height=32, audio=_tone(0.4, 12345), sample_rate_hz=12345) as w:
        w.write(_frames(10, 32, 32))
    assert probe_video(odd_rate).audio_duration_s == pytest.approx(0.4, abs=0.05)
    assert load_audio(odd_rate)[1] == 48000


def test_mp4_colors_roundtrip(tmp_path: Path) -> None:
    colors = [(200, 50, 30), (20, 180, 90), (128, 128, 128), (255, 255, 255), (0, 0, 0)]
    frames = np.zeros((len(colors), 32, 32, 3), dtype=np.uint8)
    for frame, color in zip(frames, colors):
        frame[:] = color
    out = tmp_path / "colors.mp4"
    with Mp4Writer(out, fps=25, width=32, height=32, audio=None, sample_rate_hz=None, crf=0) as w:
        w.write(frames)
    with av.open(str(out)) as container:
        decoded = [f.to_ndarray(format="rgb24")[16, 16] for f in container.decode(video=0)]
    np.testing.assert_allclose(np.array(decoded, dtype=float), np.array(colors, dtype=float), atol=3)


def test_mp4_odd_size_rejected(tmp_path: Path) -> None:
    with pytest.raises(MediaError, match="width"):
        Mp4Writer(tmp_path / "odd.mp4", fps=25, width=63, height=48, audio=None, sample_rate_hz=None)
    with pytest.raises(MediaError, match="height"):
        Mp4Writer(tmp_path / "odd.mp4", fps=25, width=64, height=47, audio=None, sample_rate_hz=None)
    assert not (tmp_path / "odd.mp4").exists()


def test_mp4_write_rejects_wrong_shape(tmp_path: Path) -> None:
    with Mp4Writer(tmp_path / "x.mp4", fps=25, width=32, height=32, audio=None, sample_rate_hz=None) as w:
        with pytest.raises(ValueError):
            w.write(_frames(2, 16, 32))
        w.write(_frames(1, 32, 32))


def test_probe_video_errors(tmp_path: Path) -> None:
    with pytest.raises(MediaError, match="not found"):
        probe_video(tmp_path / "missing.mp4")
    junk = tmp_path / "junk.mp4"
    junk.write_text("not a video")
    with pytest.raises(MediaError, match="junk.mp4"):
        probe_video(junk)


# --------------------------------------------------------------------------- #
# load_audio
# --------------------------------------------------------------------------- #


def test_load_audio_stereo_wav_downmixed(tmp_path: Path) -> None:
    rate, n = 44100, 22050
    left = np.full(n, 16384, dtype=np.int16)  # 0.5
    right = np.full(n, -8192, dtype=np.int16)  # -0.25
    path = tmp_path / "stereo.wav"
    _write_wav(path, np.stack([left, right], axis=1).reshape(-1), rate, channels=2)

    samples, sr = load_audio(path)
    assert sr == 44100
    assert samples.dtype == np.float32 and samples.ndim == 1
    assert samples.shape == (n,)
    np.testing.assert_allclose(samples, 0.125, atol=1e-4)  # average of channels


@pytest.mark.parametrize(("ext", "codec"), [("flac", "flac"), ("mp3", "libmp3lame"), ("m4a", "aac")])
def test_load_audio_compressed_formats(tmp_path: Path, ext: str, codec: str) -> None:
    if codec not in av.codecs_available:
        pytest.skip(f"{codec} encoder not in this FFmpeg build")
    rate = 44100
    stereo = np.stack([_tone(0.5, rate), np.zeros(int(0.5 * rate), np.float32)])
    path = tmp_path / f"clip.{ext}"
    with av.open(str(path), "w") as container:
        stream = container.add_stream(codec, rate=rate, layout="stereo")
        resampler = av.AudioResampler(format=stream.codec_context.format.name, layout="stereo", rate=rate)
        frame = av.AudioFrame.from_ndarray(stereo, format="fltp", layout="stereo")
        frame.sample_rate, frame.pts = rate, 0
        for f in [*resampler.resample(frame), *resampler.resample(None)]:
            container.mux(stream.encode(f))
        container.mux(stream.encode(None))

    samples, sr = load_audio(path)
    assert sr == rate
    assert len(samples) / sr == pytest.approx(0.5, abs=0.05)
    # Averaged with the silent channel: the 0.5-amplitude tone becomes ~0.25.
    assert np.abs(samples[4000:-4000]).max() == pytest.approx(0.25, abs=0.03)


def test_load_audio_errors(tmp_path: Path) -> None:
    with pytest.raises(MediaError, match="not found"):
        load_audio(tmp_path / "missing.wav")

    text = tmp_path / "notes.txt"
    text.write_text("this is not audio\n" * 20)
    with pytest.raises(MediaError, match="notes.txt"):
        load_audio(text)

    empty = tmp_path / "empty.wav"
    _write_wav(empty, np.zeros(0, dtype=np.int16), 16000, channels=1)
    with pytest.raises(MediaError, match="no audio samples"):
        load_audio(empty)


def test_load_audio_rejects_video_without_audio(tmp_path: Path) -> None:
    silent = tmp_path / "silent.mp4"
    with Mp4Writer(silent, fps=25, width=32, height=32, audio=None, sample_rate_hz=None) as w:
        w.write(_frames(3, 32, 32))
    with pytest.raises(MediaError, match="no audio stream"):
        load_audio(silent)


# --------------------------------------------------------------------------- #
# Images
# --------------------------------------------------------------------------- #


def test_load_image_errors(tmp_path: Path) -> None:
    text = tmp_path / "face.txt"
    text.write_text("hello")
    with pytest.raises(MediaError, match="face.txt.*not a readable image"):
        load_image(text)
    with pytest.raises(MediaError, match="not a readable image"):
        load_image(tmp_path / "missing.png")
    empty = tmp_path / "empty.png"
    empty.write_bytes(b"")
    with pytest.raises(MediaError, match="empty"):
        load_image(empty)
    with pytest.raises(MediaError, match="not a readable image"):
        decode_image_bytes(b"GIF89a-but-truncated")


def test_load_image_converts_to_rgb(tmp_path: Path) -> None:
    path = tmp_path / "rgba.png"
    Image.new("RGBA", (10, 8), (255, 0, 0, 0)).save(path)  # fully transparent
    image = load_image(path)
    assert image.mode == "RGB" and image.size == (10, 8)
    assert image.getpixel((0, 0)) == (255, 255, 255)  # flattened onto white

    buf = io.BytesIO()
    Image.new("L", (6, 4), 128).save(buf, format="JPEG")
    decoded = decode_image_bytes(buf.getvalue())
    assert decoded.mode == "RGB" and decoded.size == (6, 4)


def test_image_to_tensor_shape_and_range() -> None:
    image = Image.new("RGB", (50, 30), (0, 128, 255))
    tensor = image_to_tensor(image, width=40, height=24)
    assert tensor.shape == (3, 24, 40) and tensor.dtype == torch.float32
    assert tensor.min() >= -1.0 and tensor.max() <= 1.0
    assert tensor[0].mean().item() == pytest.approx(-1.0, abs=1e-3)
    assert tensor[2].mean().item() == pytest.approx(1.0, abs=1e-3)


def test_image_to_tensor_center_crops() -> None:
    # 200x100: red left quarter, green middle half, blue right quarter.
    pixels = np.zeros((100, 200, 3), dtype=np.uint8)
    pixels[:, :50] = (255, 0, 0)
    pixels[:, 50:150] = (0, 255, 0)
    pixels[:, 150:] = (0, 0, 255)
    tensor = image_to_tensor(Image.fromarray(pixels), width=64, height=64)
    assert tensor.shape == (3, 64, 64)
    # Center crop keeps only the green 100x100 middle: no stretching/padding.
    assert torch.all(tensor[1] > 0.99)
    assert torch.all(tensor[0] < -0.99) and torch.all(tensor[2] < -0.99)


def test_frames_to_uint8() -> None:
    frames = torch.zeros(2, 3, 4, 5)
    frames[0] = -1.0
    frames[1] = 1.0
    frames[1, 0, 0, 0] = 3.0  # clamped
    frames[0, 1, 0, 0] = -0.5  # (0.5 * 127.5) = 63.75 -> 64
    out = frames_to_uint8(frames)
    assert out.shape == (2, 4, 5, 3) and out.dtype == np.uint8
    assert out[0, 1, 1, 0] == 0 and out[1, 1, 1, 0] == 255
    assert out[1, 0, 0, 0] == 255
    assert out[0, 0, 0, 1] == 64


# --------------------------------------------------------------------------- #
# Bundled assets
# --------------------------------------------------------------------------- #


def test_bundled_assets_load() -> None:
    image = load_image(ASSETS / "reference.png")
    assert image.size == (128, 128)
    for other in ("drawn.png", "photo.png"):
        assert load_image(ASSETS / other).size == (256, 256)
    audio, rate = load_audio(ASSETS / "speech.wav")
    assert rate == 16000
    assert 6.0 < len(audio) / rate < 9.0
    assert np.sqrt(np.mean(audio**2)) > 0.02  # not silence
