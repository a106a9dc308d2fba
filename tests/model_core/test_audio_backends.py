"""Tests for model_core/audio_backends.py: spectral helpers checked against an independent implementation.

The backends' streaming behaviour (push/flush == encode, lookahead, emission) is tested through the front end in
test_audio.py; the loaders' errors are there too, beside the tiny model fixtures.
"""

from __future__ import annotations

import numpy as np

from model_core.audio_backends import mel_filterbank


def test_mel_filterbank_matches_transformers():
    from transformers.audio_utils import mel_filter_bank

    ref = mel_filter_bank(
        num_frequency_bins=201,
        num_mel_filters=80,
        min_frequency=0.0,
        max_frequency=8000.0,
        sampling_rate=16000,
        norm="slaney",
        mel_scale="slaney",
    )
    ours = mel_filterbank(80, 400, 16000)
    assert ours.shape == (201, 80)
    np.testing.assert_allclose(ours, ref, atol=1e-6, rtol=1e-4)
