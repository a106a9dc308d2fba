"""`facecast converse`: one conversational turn offline — a spoken question in, the avatar's spoken, lip-synced
answer out.

    facecast converse --image REF --audio QUESTION.wav --out REPLY.mp4 [--instructions TEXT] [--preset --decoder ...]

    QUESTION.wav ─► Whisper base ─► SmolLM2-135M (streamed, piece by piece) ─► Piper ─► the reply's speech
                                                                                        ─► AvatarEngine ─► REPLY.mp4
The same cascade as `conversation.mode=OFFLINE` (`services.llm.offline`), in this process, with the engine of
`facecast generate`: no Ray, no server.  Prints what was heard, what the avatar says, and where the time went.
"""

from __future__ import annotations

import argparse
import threading
import time

import numpy as np

from model_core.config import PRESETS, get_preset
from model_core.engine import AvatarEngine
from model_core.shipped import TRAINED_PRESET
from services.cli.common import UserError, output_mp4
from services.cli.generate import default_checkpoint, render
from services.media import image_to_tensor, load_audio, load_image


def cmd_converse(args: argparse.Namespace) -> int:
    from services.llm.conversation import ConversationError, PcmResampler
    from services.llm.offline import REPLY_RATE_HZ, VAD_RATE_HZ, CascadeModels, OfflineConfig, missing_packages

    missing = missing_packages()
    if missing:
        raise UserError(f"the offline cascade needs {', '.join(missing)}: run `make cascade`")
    image = load_image(args.image)
    audio, rate = load_audio(args.audio)
    out = output_mp4(args.out)
    if len(args.instructions) > 4000:
        raise UserError(f"--instructions is {len(args.instructions)} characters long; at most 4000 are allowed")

    print("facecast converse: loading the offline cascade (the first run ever converts SmolLM2 once, ~30 s)")
    started = time.perf_counter()
    try:
        models = CascadeModels.shared(OfflineConfig.from_settings(args.cache_dir))
    except ConversationError as error:
        raise UserError(str(error)) from None
    load_s = time.perf_counter() - started

    pcm = (np.clip(audio, -1, 1) * 32767).round().astype(np.int16)
    question = PcmResampler(VAD_RATE_HZ).convert(pcm, rate).astype(np.float32) / 32768.0
    span = models.speech_span(question)
    if span is None:
        raise UserError(f"--audio {args.audio!r}: no speech was heard in it")
    started = time.perf_counter()
    heard = models.transcribe(question[max(0, span[0] - VAD_RATE_HZ // 10): span[1] + VAD_RATE_HZ // 10])
    asr_s = time.perf_counter() - started
    if not heard:
        raise UserError(f"--audio {args.audio!r}: no speech was heard in it")
    print(f"  heard: {heard!r}")

    messages = [{"role": "system", "content": args.instructions}, {"role": "user", "content": heard}]
    started = time.perf_counter()
    first_audio_s, pieces, speech = None, [], []
    resampler = PcmResampler(REPLY_RATE_HZ)
    for piece in models.reply_pieces(messages, threading.Event()):
        speech.append(models.speak(piece, resampler))
        pieces.append(piece)
        first_audio_s = first_audio_s or time.perf_counter() - started
    reply_s = time.perf_counter() - started
    reply = " ".join(pieces)
    if not reply or not sum(len(s) for s in speech):
        raise UserError(f"the LLM gave no answer to {heard!r}; try again with other --instructions")
    print(f"  says:  {reply!r}")
    voice = np.concatenate(speech).astype(np.float32) / 32768.0

    preset = get_preset(args.preset)
    engine = AvatarEngine.from_preset(preset, checkpoint=args.checkpoint or default_checkpoint(preset.name),
                                      seed=args.seed, decoder=args.decoder)
    stream = engine.stream_config(seed=args.seed)
    reference = image_to_tensor(image, stream.width, stream.height)
    frames, first_frame_s, _, video_s = render(engine, stream, reference, "", None, voice, REPLY_RATE_HZ, out,
                                               quiet=args.quiet)
    print(f"wrote {out}: {frames} frames ({frames / stream.fps:.2f} s), the reply's voice muxed in "
          f"(preset {preset.name}, {args.decoder} decoder; {engine.weights_note})")
    print(f"  cascade load {load_s:.1f} s; speech recognition {asr_s:.2f} s; reply {reply_s:.2f} s (first speech "
          f"after {first_audio_s:.2f} s); video {video_s:.2f} s (first frame after {first_frame_s * 1000:.0f} ms)")
    return 0


def add_parser(commands) -> None:
    from services.llm.offline import DEFAULT_INSTRUCTIONS

    con = commands.add_parser("converse", help="one conversational turn offline: a spoken question in, the avatar's "
                                               "spoken, lip-synced answer out (MP4)")
    con.add_argument("--image", required=True, help="reference image (PNG/JPEG/WebP)")
    con.add_argument("--audio", required=True, help="the question, spoken (WAV/MP3/FLAC/OGG/M4A, any sample rate)")
    con.add_argument("--out", required=True, help="output .mp4: the avatar answering, with its voice")
    con.add_argument("--instructions", default=DEFAULT_INSTRUCTIONS,
                     help="the LLM's system prompt (default: SmolLM2's own, asked to answer briefly)")
    con.add_argument("--preset", default=TRAINED_PRESET, help=f"model preset: {', '.join(PRESETS)} (default "
                     f"{TRAINED_PRESET}, the trained one)")
    con.add_argument("--checkpoint", help="facecast .safetensors checkpoint (default: as `facecast generate`)")
    con.add_argument("--decoder", choices=("full", "fast"), default="full", help="the VAE's decoder (default full)")
    con.add_argument("--seed", type=int, default=0, help="noise seed (default 0)")
    con.add_argument("--cache-dir", help="where the cascade keeps the models it prepares once (default "
                     "$FACECAST_CACHE_DIR, else ~/.cache/facecast)")
    con.add_argument("--quiet", action="store_true", help="no progress bar")
    con.set_defaults(handler=cmd_converse)
