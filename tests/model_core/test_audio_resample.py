"""Tests for model_core/audio_resample.py: the streaming-exact resampler.

Key property under test: pushing a signal in arbitrary pieces and flushing gives exactly the whole-signal result.
"""

from __future__ import annotations

import math

import numpy as np
import pytest

from model_core.audio_resample import RESAMPLER_LOOKAHEAD_S, StreamingResampler, resample

from .helpers import split_points


def _noise(rng, seconds: float, rate: int, scale: float = 0.1) -> np.ndarray:
    return (rng.standard_normal(int(round(seconds * rate))) * scale).astype(np.float32)


@pytest.mark.parametrize("src_rate_hz", [44100, 48000, 8000, 22050])
def test_resample_chunked_equals_whole(src_rate_hz):
    rng = np.random.default_rng(src_rate_hz)
    x = _noise(rng, 0.73, src_rate_hz, 0.3)
    whole = resample(x, src_rate_hz, 16000)
    assert whole.dtype == np.float32
    assert len(whole) == math.ceil(len(x) * 16000 / src_rate_hz)
    rs = StreamingResampler(src_rate_hz, 16000)
    for max_piece in (1, 37, 700, 5000):
        st = rs.new_state()
        outs = []
        # single samples for a short stretch only (keeps the test fast)
        xs = x if max_piece > 1 else x[: src_rate_hz // 50]
        for a, b in split_points(len(xs), rng, max_piece):
            st, y = rs.push(st, xs[a:b])
            outs.append(y)
        st, y = rs.flush(st)
        outs.append(y)
        chunked = np.concatenate(outs)
        ref = whole if max_piece > 1 else resample(xs, src_rate_hz, 16000)
        assert chunked.shape == ref.shape
        np.testing.assert_allclose(chunked, ref, atol=1e-6, rtol=0)


@pytest.mark.parametrize("src_rate_hz", [44100, 48000, 8000, 22050])
def test_resample_sine_keeps_frequency(src_rate_hz):
    n = src_rate_hz  # 1 s
    t_s = np.arange(n) / src_rate_hz
    x = (0.5 * np.sin(2 * np.pi * 440.0 * t_s)).astype(np.float32)
    y = resample(x, src_rate_hz, 16000)
    assert len(y) == 16000
    spec = np.abs(np.fft.rfft(y * np.hanning(len(y))))
    peak_hz = np.argmax(spec) * 16000 / len(y)
    assert abs(peak_hz - 440.0) <= 1.0
    # the waveform itself is preserved away from the edges
    ref = 0.5 * np.sin(2 * np.pi * 440.0 * np.arange(16000) / 16000)
    np.testing.assert_allclose(y[200:-200], ref[200:-200], atol=2e-3)


def test_resample_suppresses_aliasing():
    # a 10 kHz tone cannot be represented at 16 kHz; it must be filtered, not aliased to 6 kHz
    x = (0.5 * np.sin(2 * np.pi * 10000.0 * np.arange(44100) / 44100)).astype(np.float32)
    y = resample(x, 44100, 16000)
    assert np.sqrt(np.mean(y[500:-500] ** 2)) < 0.5 / np.sqrt(2) * 1e-2  # < -40 dB


def test_resample_passthrough_and_int16():
    rng = np.random.default_rng(1)
    x16 = rng.integers(-32768, 32767, size=1000).astype(np.int16)
    y = resample(x16, 16000, 16000)
    np.testing.assert_array_equal(y, x16.astype(np.float32) / 32768.0)
    np.testing.assert_allclose(
        resample(x16, 48000, 16000), resample(x16.astype(np.float32) / 32768.0, 48000, 16000)
    )
    assert StreamingResampler(16000, 16000).lookahead_s == 0.0
    assert 0 < StreamingResampler(8000, 16000).lookahead_s <= RESAMPLER_LOOKAHEAD_S


def test_resample_bad_rate():
    with pytest.raises(ValueError, match="src_rate_hz"):
        resample(np.zeros(10, np.float32), 7999, 16000)
    with pytest.raises(ValueError, match="dst_rate_hz"):
        resample(np.zeros(10, np.float32), 16000, 100000)
