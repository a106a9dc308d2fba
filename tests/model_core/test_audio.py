"""Tests for model_core/audio.py: the streaming front end over the log-mel and encoder backends.

Key property under test: for every backend, pushing the audio in arbitrary pieces
and flushing gives exactly the same features as ``encode`` on the whole clip.
"""

from __future__ import annotations

import math
from fractions import Fraction

import numpy as np
import pytest
import torch

from model_core.audio import AUDIO_BACKENDS, SUPPORTED_BACKENDS, AudioConfig, AudioFrontend, AudioStreamState
from model_core.audio_backends import load_wav2vec2, load_whisper_encoder, mel_filterbank
from model_core.audio_resample import RESAMPLER_LOOKAHEAD_S
from model_core.config import ConfigError

from .helpers import split_points

ATOL = 1e-5


# ----------------------------------------------------------------------------------
# helpers
# ----------------------------------------------------------------------------------


def _stream(fe: AudioFrontend, x: np.ndarray, rate: int, rng, max_piece: int):
    """push() in random pieces + flush(); returns (features [N, D], per-push frame counts)."""
    st = fe.new_state()
    outs, counts = [], []
    for a, b in split_points(len(x), rng, max_piece):
        st, f = fe.push(st, x[a:b], rate)
        assert f.shape[1] == fe.feature_dim
        outs.append(f)
        counts.append(f.shape[0])
    st, f = fe.flush(st)
    outs.append(f)
    assert st.finished
    return torch.cat(outs, 0), counts


def _noise(rng, seconds: float, rate: int, scale: float = 0.1) -> np.ndarray:
    return (rng.standard_normal(int(round(seconds * rate))) * scale).astype(np.float32)


def _expected_frames(n_samples: int, rate: int, fps: float) -> int:
    return math.ceil(Fraction(n_samples) * Fraction(repr(float(fps))) / rate)


def _n_samples_for(seconds: float, rate: int) -> int:
    return math.ceil(seconds * rate)


# ----------------------------------------------------------------------------------
# logmel backend
# ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "fps,rate", [(25.0, 16000), (25.0, 44100), (30.0, 48000), (30.0, 8000), (29.97, 22050)]
)
def test_logmel_push_flush_equals_encode(fps, rate):
    rng = np.random.default_rng(int(fps * 100) + rate)
    fe = AudioFrontend(AudioConfig(fps=fps))
    assert fe.feature_dim == 80 * 4
    x = _noise(rng, 1.37, rate)
    ref = fe.encode(x, rate)
    assert ref.shape == (_expected_frames(len(x), rate, fps), 320)
    assert ref.dtype == torch.float32
    assert torch.isfinite(ref).all()
    for max_piece in (5, 333, 4000, len(x)):
        got, counts = _stream(fe, x, rate, rng, max_piece)
        assert got.shape == ref.shape
        torch.testing.assert_close(got, ref, atol=ATOL, rtol=0)
    # int16 and torch input give the same features as the equivalent float input
    x16 = (x * 32767).astype(np.int16)
    torch.testing.assert_close(
        fe.encode(x16, rate), fe.encode(x16.astype(np.float32) / 32768, rate), atol=ATOL, rtol=0
    )
    torch.testing.assert_close(fe.encode(torch.from_numpy(x), rate), ref, atol=ATOL, rtol=0)


@pytest.mark.parametrize("fps", [25.0, 30.0, 29.97, 12.5])
@pytest.mark.parametrize("seconds", [0.0, 1 / 16000, 0.04, 1.0, 1.001, 2.5 / 3])
def test_logmel_frame_count(fps, seconds):
    fe = AudioFrontend(AudioConfig(fps=fps))
    n = int(round(seconds * 16000))
    out = fe.encode(np.zeros(n, np.float32), 16000)
    assert out.shape == (_expected_frames(n, 16000, fps), fe.feature_dim)


def test_logmel_frame_count_other_rate():
    fe = AudioFrontend(AudioConfig(fps=30))
    n = 44100 * 2 + 1  # 2 s + one sample -> 61 frames
    assert fe.encode(np.zeros(n, np.float32), 44100).shape[0] == 61


def test_logmel_silence_is_constant():
    fe = AudioFrontend(AudioConfig())
    out = fe.encode(np.zeros(16000, np.int16), 16000)
    assert out.shape == (25, 320)
    torch.testing.assert_close(out, torch.full_like(out, (math.log10(1e-5) + 4) / 4))


def test_logmel_tone_lands_in_expected_mel_bin():
    fe = AudioFrontend(AudioConfig())
    sr = 16000
    x = (0.5 * np.sin(2 * np.pi * 1000.0 * np.arange(sr) / sr)).astype(np.float32)
    feats = fe.encode(x, sr).reshape(-1, 4, 80)[2:-2]  # skip the edges
    profile = feats.mean(dim=(0, 1))
    fb = mel_filterbank(80)
    centre_hz = fb.argmax(axis=0) * sr / 400
    expected = int(np.argmin(np.abs(centre_hz - 1000.0)))
    assert abs(int(profile.argmax()) - expected) <= 1
    far = int(np.argmin(np.abs(centre_hz - 4000.0)))
    assert profile[expected] - profile[far] > 1.0  # > 4 decades of power
    # every mel frame of every video frame sees the tone (subframes are all populated)
    assert (feats[:, :, expected] > 0.5).all()


def test_logmel_subframe_centres():
    """An impulse at the centre of mel frame (t, j) peaks there, symmetrically in j-1 / j+1."""
    fps, S = 25.0, 4
    fe = AudioFrontend(AudioConfig(fps=fps, subframes=S))
    t, j = 5, 2
    centre = round((t + (j + 0.5) / S) / fps * 16000)  # 3520, an exact integer sample
    x = np.zeros(16000, np.float32)
    x[centre] = 0.9
    feats = fe.encode(x, 16000).reshape(-1, S, 80)
    energy = feats.mean(dim=2)  # [T, S]
    assert energy[t, j] == energy.max()
    torch.testing.assert_close(energy[t, j - 1], energy[t, j + 1], atol=1e-4, rtol=0)
    assert energy[t, j] - energy[t, j - 1] > 0.1


def test_logmel_lookahead_value():
    fe = AudioFrontend(AudioConfig())
    expected = 199.5 / 16000 - 0.5 / (4 * 25) + RESAMPLER_LOOKAHEAD_S
    assert fe.lookahead_s == pytest.approx(expected)
    assert 0 < fe.lookahead_s < 0.015
    assert AudioFrontend(AudioConfig(subframes=1)).lookahead_s == pytest.approx(
        RESAMPLER_LOOKAHEAD_S
    )


@pytest.mark.parametrize("fps,rate", [(25.0, 16000), (30.0, 44100), (25.0, 8000)])
def test_logmel_bounded_lookahead(fps, rate):
    """Frames <= t are unaffected by audio after t's horizon; audio just before it matters."""
    rng = np.random.default_rng(7)
    fe = AudioFrontend(AudioConfig(fps=fps))
    x = _noise(rng, 1.5, rate)
    ref = fe.encode(x, rate)
    for t in (0, 3, 17):
        horizon = _n_samples_for((t + 1) / fps + fe.lookahead_s, rate)
        y = x.copy()
        y[horizon:] = _noise(rng, 1.5, rate, 0.5)[: len(x) - horizon]
        got = fe.encode(y, rate)
        torch.testing.assert_close(got[: t + 1], ref[: t + 1], atol=ATOL, rtol=0)
        assert not torch.allclose(got[t + 1], ref[t + 1], atol=1e-3)
        # perturbing from 20 ms before the end of frame t changes frame t
        z = x.copy()
        start = _n_samples_for((t + 1) / fps - 0.02, rate)
        z[start:] = 0.0
        assert not torch.allclose(fe.encode(z, rate)[t], ref[t], atol=1e-3)


@pytest.mark.parametrize("fps,rate", [(25.0, 16000), (30.0, 44100), (29.97, 8000)])
def test_logmel_emits_as_soon_as_allowed(fps, rate):
    rng = np.random.default_rng(3)
    fe = AudioFrontend(AudioConfig(fps=fps))
    x = _noise(rng, 1.2, rate)
    for k in (1, 2, 5, 24):
        n = _n_samples_for(k / fps + fe.lookahead_s, rate)
        st = fe.new_state()
        emitted = 0
        for a, b in split_points(n, rng, 900):
            st, f = fe.push(st, x[a:b], rate)
            emitted += f.shape[0]
        assert emitted >= k, (k, emitted)
        assert st.frames_emitted == emitted
        # and never more than the audio received covers
        assert emitted <= math.ceil(n / rate * fps)


@pytest.mark.parametrize("rate", [16000, 44100])
def test_logmel_lookahead_is_nearly_tight(rate):
    """The bound is within 2.5 ms of what is really needed: 2.5 ms less audio is not enough."""
    fe = AudioFrontend(AudioConfig())
    x = _noise(np.random.default_rng(2), 1.0, rate)
    for k in (1, 4, 13):
        n = _n_samples_for(k / 25 + fe.lookahead_s - 0.0025, rate)
        _, f = fe.push(fe.new_state(), x[:n], rate)
        assert f.shape[0] == k - 1


def test_push_does_not_mutate_state():
    rng = np.random.default_rng(5)
    fe = AudioFrontend(AudioConfig())
    x = _noise(rng, 0.5, 44100)
    st0, a0 = fe.push(fe.new_state(), x[:10000], 44100)
    snapshot = (st0.buf16.copy(), st0.n16, st0.frames_emitted)
    st1, a1 = fe.push(st0, x[10000:], 44100)
    st2, a2 = fe.push(st0, x[10000:], 44100)  # replay from the same state
    torch.testing.assert_close(a1, a2, atol=0, rtol=0)
    np.testing.assert_array_equal(st0.buf16, snapshot[0])
    assert (st0.n16, st0.frames_emitted) == snapshot[1:]
    assert isinstance(st1, AudioStreamState) and st1 is not st0


def test_logmel_is_fast():
    import time

    fe = AudioFrontend(AudioConfig())
    x = _noise(np.random.default_rng(0), 10.0, 44100)
    fe.encode(x[:44100], 44100)  # warm-up (filter tables)
    t0 = time.perf_counter()
    out = fe.encode(x, 44100)
    elapsed = time.perf_counter() - t0
    assert out.shape == (250, 320)
    assert elapsed < 2.0, elapsed  # typically ~0.2 s; generous for loaded CI machines


# ----------------------------------------------------------------------------------
# input validation
# ----------------------------------------------------------------------------------


def test_config_validation():
    with pytest.raises(ValueError, match="backend") as e:
        AudioConfig(backend="mfcc")
    assert "logmel" in str(e.value) and "'mfcc'" in str(e.value)
    with pytest.raises(ValueError, match="model_path"):
        AudioConfig(backend="wav2vec2")
    with pytest.raises(ValueError, match="model_path"):
        AudioConfig(backend="whisper", model_path="")
    with pytest.raises(ValueError, match="fps"):
        AudioConfig(fps=0)
    with pytest.raises(ValueError, match="fps"):
        AudioConfig(fps=float("nan"))
    with pytest.raises(ValueError, match="sample_rate_hz") as e:
        AudioConfig(sample_rate_hz=44100)
    assert "16000" in str(e.value)
    with pytest.raises(ValueError, match="n_mels"):
        AudioConfig(n_mels=0)
    with pytest.raises(ValueError, match="subframes"):
        AudioConfig(subframes=2.5)
    with pytest.raises(ValueError, match="context_s"):
        AudioConfig(context_s=-1)
    assert SUPPORTED_BACKENDS == ("logmel", "wav2vec2", "whisper", "whisper-ct2")


def test_backend_is_chosen_by_the_registry_and_unknown_names_are_config_errors():
    """An unknown name is a ConfigError naming the field, the value and the allowed names (it used to fall through
    to Whisper); a backend that needs weights names model_path; the frontend builds the registered class."""
    for bad in ("mfcc", "Whisper", "", None):
        with pytest.raises(ConfigError, match="backend") as e:
            AudioConfig(backend=bad)
        assert repr(bad) in str(e.value) and all(name in str(e.value) for name in SUPPORTED_BACKENDS)
    for name, backend in AUDIO_BACKENDS.items():
        if backend.needs_model_path:
            with pytest.raises(ConfigError, match="model_path=None") as e:
                AudioConfig(backend=name)
            assert repr(name) in str(e.value)
        else:
            assert AudioConfig(backend=name).model_path is None
    assert [name for name, backend in AUDIO_BACKENDS.items() if not backend.needs_model_path] == \
        ["logmel", "whisper-ct2"]
    fe = AudioFrontend(AudioConfig())
    assert type(fe.backend) is AUDIO_BACKENDS["logmel"]
    assert (fe.feature_dim, fe.block_frames, fe.lookahead_s) == (
        fe.backend.feature_dim, fe.backend.block_frames, fe.backend.lookahead_s)


def test_push_input_validation():
    fe = AudioFrontend(AudioConfig())
    st = fe.new_state()
    for bad_rate in (7999, 96001, 16000.0, True):
        with pytest.raises(ValueError, match="sample_rate_hz") as e:
            fe.push(st, np.zeros(10, np.float32), bad_rate)
        assert "8000" in str(e.value) and "96000" in str(e.value)
    with pytest.raises(ValueError, match="pcm") as e:
        fe.push(st, np.zeros((2, 10), np.float32), 16000)
    assert "1-D" in str(e.value)
    with pytest.raises(ValueError, match="pcm"):
        fe.push(st, torch.zeros(2, 10), 16000)
    with pytest.raises(ValueError, match="dtype"):
        fe.push(st, np.zeros(10, np.int32), 16000)
    with pytest.raises(ValueError, match="dtype"):
        fe.encode(np.zeros(10, np.uint8), 16000)
    # empty input is fine
    st, f = fe.push(st, np.zeros(0, np.int16), 16000)
    assert f.shape == (0, fe.feature_dim)
    st, f = fe.push(st, np.zeros(100, np.float32), 16000)
    with pytest.raises(ValueError, match="sample_rate_hz"):
        fe.push(st, np.zeros(10, np.float32), 44100)  # rate change mid-stream
    st, f = fe.flush(st)
    assert f.shape[0] == 1  # 100 samples -> ceil(0.00625 * 25) = 1 frame
    with pytest.raises(ValueError, match="flush"):
        fe.push(st, np.zeros(10, np.float32), 16000)
    st, f = fe.flush(st)
    assert f.shape == (0, fe.feature_dim)
    # flushing a stream that never got audio gives nothing
    _, f = fe.flush(fe.new_state())
    assert f.shape == (0, fe.feature_dim)


def test_output_dtype():
    fe = AudioFrontend(AudioConfig(), dtype=torch.float64)
    out = fe.encode(np.zeros(3200, np.float32), 16000)
    assert out.dtype == torch.float64 and out.shape == (5, 320)


# ----------------------------------------------------------------------------------
# encoder backends (tiny randomly initialised models)
# ----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def wav2vec2_dir(tmp_path_factory):
    from transformers import Wav2Vec2Config, Wav2Vec2Model

    cfg = Wav2Vec2Config(
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=64,
        conv_dim=(32, 32, 32),
        conv_stride=(5, 8, 8),  # 320-sample hop = 50 Hz, like the real model
        conv_kernel=(10, 8, 8),
        num_conv_pos_embeddings=16,
        num_conv_pos_embedding_groups=2,
        vocab_size=32,
    )
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("w2v")
    Wav2Vec2Model(cfg).save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def whisper_dir(tmp_path_factory):
    from transformers import WhisperConfig, WhisperModel

    cfg = WhisperConfig(
        vocab_size=64,
        d_model=32,
        encoder_layers=1,
        encoder_attention_heads=2,
        decoder_layers=1,
        decoder_attention_heads=2,
        encoder_ffn_dim=64,
        decoder_ffn_dim=64,
        num_mel_bins=80,
        max_source_positions=100,  # 200 mel frames = 2 s window
        max_target_positions=16,
        pad_token_id=1,
        bos_token_id=2,
        eos_token_id=3,
        decoder_start_token_id=2,
        suppress_tokens=None,
        begin_suppress_tokens=None,
    )
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("whisper")
    WhisperModel(cfg).save_pretrained(path)
    return path


def _model_dir(request, backend):
    return request.getfixturevalue("wav2vec2_dir" if backend == "wav2vec2" else "whisper_dir")


@pytest.mark.parametrize("backend,fps,rate", [("wav2vec2", 25.0, 22050), ("whisper", 30.0, 16000)])
def test_encoder_push_flush_equals_encode(request, backend, fps, rate):
    path = _model_dir(request, backend)
    fe = AudioFrontend(AudioConfig(backend=backend, model_path=str(path), fps=fps, context_s=0.6))
    assert type(fe.backend) is AUDIO_BACKENDS[backend]
    assert fe.feature_dim == 32
    assert fe.block_frames == round(0.2 * fps)
    x = _noise(np.random.default_rng(11), 1.63, rate)
    ref = fe.encode(x, rate)
    assert ref.shape == (_expected_frames(len(x), rate, fps), 32)
    assert torch.isfinite(ref).all() and ref.std() > 0.1
    rng = np.random.default_rng(12)
    for max_piece in (700, 9000):
        got, _ = _stream(fe, x, rate, rng, max_piece)
        assert got.shape == ref.shape
        torch.testing.assert_close(got, ref, atol=ATOL, rtol=0)


@pytest.mark.parametrize("backend", ["wav2vec2", "whisper"])
def test_encoder_lookahead_and_early_emission(request, backend):
    path = _model_dir(request, backend)
    fps, rate = 25.0, 44100
    fe = AudioFrontend(AudioConfig(backend=backend, model_path=path, fps=fps, context_s=0.5))
    expected_la = (fe.block_frames - 1) / fps + 0.1 + RESAMPLER_LOOKAHEAD_S
    assert fe.lookahead_s == pytest.approx(expected_la)
    rng = np.random.default_rng(21)
    x = _noise(rng, 1.4, rate)
    ref = fe.encode(x, rate)
    # emission as soon as allowed
    for k in (1, 5, 6, 12):
        n = _n_samples_for(k / fps + fe.lookahead_s, rate)
        st, emitted = fe.new_state(), 0
        for a, b in split_points(n, rng, 5000):
            st, f = fe.push(st, x[a:b], rate)
            emitted += f.shape[0]
        assert emitted >= k, (k, emitted)
    # bounded lookahead: audio after frame t's horizon does not change frames <= t
    for t in (0, 9):
        horizon = _n_samples_for((t + 1) / fps + fe.lookahead_s, rate)
        y = x.copy()
        y[horizon:] = _noise(rng, 1.4, rate, 0.5)[: len(x) - horizon]
        got = fe.encode(y, rate)
        torch.testing.assert_close(got[: t + 1], ref[: t + 1], atol=ATOL, rtol=0)
        assert not torch.allclose(got, ref, atol=1e-3)


def test_wav2vec2_window_and_interpolation(wav2vec2_dir):
    """Frame 0 == the encoder run over block 0's window, interpolated at the frame centre."""
    fps = 25.0
    fe = AudioFrontend(AudioConfig(backend="wav2vec2", model_path=wav2vec2_dir, fps=fps))
    x = _noise(np.random.default_rng(4), 1.0, 16000)
    feats = fe.encode(x, 16000)
    model = load_wav2vec2(wav2vec2_dir)
    end = math.ceil((fe.block_frames / fps + 0.1) * 16000)  # block 0 = [0, end)
    w = x[:end]
    w = (w - w.mean()) / np.sqrt(w.var() + 1e-7)
    with torch.no_grad():
        h = model(torch.from_numpy(w)[None]).last_hidden_state[0]
    rf, hop = 1 + 9 + 7 * 5 + 7 * 40, 320  # receptive field / hop of the tiny conv stack
    for t in (0, 3):
        u = ((t + 0.5) * 16000 / fps - (rf - 1) / 2) / hop
        i0 = int(math.floor(u))
        expected = h[i0] * (1 - (u - i0)) + h[i0 + 1] * (u - i0)
        torch.testing.assert_close(feats[t], expected, atol=1e-4, rtol=0)


def test_whisper_log_mel_matches_feature_extractor(whisper_dir):
    from transformers import WhisperFeatureExtractor

    fe = AudioFrontend(AudioConfig(backend="whisper", model_path=whisper_dir))
    rng = np.random.default_rng(8)
    audio = _noise(rng, 2.0, 16000, 0.01)
    t_s = np.arange(len(audio)) / 16000
    burst = (t_s > 0.8) & (t_s < 1.2)
    audio[burst] += 0.5 * np.sin(2 * np.pi * 1000 * t_s[burst]).astype(np.float32)
    audio[(t_s > 0.2) & (t_s < 0.5)] = 0.0  # digital silence: exercises the max - 8 floor
    ext = WhisperFeatureExtractor(
        feature_size=80, sampling_rate=16000, hop_length=160, chunk_length=2, n_fft=400
    )
    ref = ext(audio, sampling_rate=16000, return_tensors="np").input_features[0]  # [80, 200]
    st = AudioStreamState(buf16=audio, buf16_start=0, n16=len(audio))
    ours = fe.backend.log_mel(st, w0=0, lo=0).numpy()  # frame i centred at sample 160 i
    assert ours.shape == ref.shape == (80, 200)
    # edge frames differ only by padding (reflect there, real neighbours/silence here)
    np.testing.assert_allclose(ours[:, 2:199], ref[:, 2:199], atol=1e-4)


def test_loader_errors(tmp_path, wav2vec2_dir, whisper_dir):
    missing = tmp_path / "does_not_exist"
    for loader in (load_wav2vec2, load_whisper_encoder):
        with pytest.raises(FileNotFoundError, match="does_not_exist"):
            loader(missing)
    with pytest.raises(FileNotFoundError, match="does_not_exist"):
        AudioFrontend(AudioConfig(backend="wav2vec2", model_path=str(missing)))
    with pytest.raises(FileNotFoundError, match="does_not_exist"):
        AudioFrontend(AudioConfig(backend="whisper", model_path=str(missing)))
    empty = tmp_path / "empty_dir"
    empty.mkdir()
    with pytest.raises(FileNotFoundError, match="config.json"):
        load_whisper_encoder(empty)
    with pytest.raises(ValueError, match="model_type") as e:
        load_wav2vec2(whisper_dir)
    assert str(whisper_dir) in str(e.value)
    with pytest.raises(ValueError, match="model_type"):
        load_whisper_encoder(wav2vec2_dir)
    no_weights = tmp_path / "no_weights"
    no_weights.mkdir()
    (no_weights / "config.json").write_text((wav2vec2_dir / "config.json").read_text())
    with pytest.raises(FileNotFoundError, match="no_weights"):
        load_wav2vec2(no_weights)
    enc = load_whisper_encoder(whisper_dir)
    assert not enc.training and enc.config.d_model == 32


@pytest.fixture(scope="module")
def whisper_base():
    """Whisper base through CTranslate2 (the cascade extra's wheels), one thread."""
    pytest.importorskip("ctranslate2")
    return AudioFrontend(AudioConfig(backend="whisper-ct2", fps=25.0))


def test_whisper_ct2_streams_what_it_encodes(whisper_base):
    fe = whisper_base
    assert (fe.feature_dim, fe.block_frames) == (512, 5)
    assert fe.lookahead_s == pytest.approx(4 / 25 + 0.1 + RESAMPLER_LOOKAHEAD_S)
    x = _noise(np.random.default_rng(31), 1.9, 22050)
    ref = fe.encode(x, 22050)
    assert ref.shape == (_expected_frames(len(x), 22050, 25.0), 512) and torch.isfinite(ref).all()
    got, _ = _stream(fe, x, 22050, np.random.default_rng(32), 5000)
    torch.testing.assert_close(got, ref, atol=ATOL, rtol=0)


def test_whisper_ct2_features_sit_on_the_sound_they_hear(whisper_base):
    """A vowel-like tone burst in silence: every frame whose encoder window (its block plus the 0.1 s right context)
    ends before the burst is exactly silence's features, and from the first block whose window reaches it on, every
    frame over the burst differs from silence."""
    t = np.arange(int(3.0 * 16000)) / 16000
    x = np.zeros_like(t, dtype=np.float32)
    burst = (t >= 1.6) & (t < 2.2)
    x[burst] = (0.3 * np.sin(2 * np.pi * 220 * t[burst]) * (1 + 0.5 * np.sin(2 * np.pi * 660 * t[burst]))).astype(
        np.float32)
    feats, silent = whisper_base.encode(x, 16000), whisper_base.encode(np.zeros_like(x), 16000)
    change = (feats - silent).norm(dim=1) / silent.norm(dim=1).mean()
    B = whisper_base.block_frames
    first = B * next(b for b in range(100) if (b + 1) * B / 25.0 + 0.1 > 1.6)      # 35: block 7 hears 1.6-1.7 s
    assert first == 35
    assert change[:first].max() < 1e-6
    assert change[first:55].min() > 0.3


def test_whisper_ct2_model_path_must_hold_a_model(tmp_path):
    pytest.importorskip("ctranslate2")
    with pytest.raises(ConfigError, match=r"AudioConfig.model_path=.*no CTranslate2 model"):
        AudioFrontend(AudioConfig(backend="whisper-ct2", model_path=str(tmp_path)))
