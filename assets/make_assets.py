"""Regenerate facecast's bundled demo assets.

    .venv/bin/python assets/make_assets.py

* ``reference.png`` - the demo's face: a held-out identity of the talking-face world (never in a training clip),
  rendered at 128x128 as the world renders a reference (mouth closed, eyes open, head still).
* ``speech.wav`` - two held-out sentences (never in a training clip) in the held-out voice, 16 kHz mono 16-bit PCM,
  synthesised through libespeak-ng as the world's speech is (needs `make espeak-ng`; otherwise the shipped file is
  kept).
* ``demo.json`` - what the two above are: the world seed, the identity id and style, the sentence indices and text,
  the voice (a test holds them held out and the image equal to the world's render).
* ``drawn.png`` - a 256x256 stylised portrait drawn here with Pillow: a face the world never produced.
* ``photo.png`` - a 256x256 crop of a photograph (NASA's portrait of astronaut Eileen Collins, public domain, as
  shipped in scikit-image's sample data); regenerated only when ``scikit-image`` is installed.

All are deterministic and public domain (CC0; the photograph: public domain).
"""

from __future__ import annotations

import json
import sys
import wave
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

ASSETS_DIR = Path(__file__).resolve().parent
IMAGE_PATH = ASSETS_DIR / "reference.png"
SPEECH_PATH = ASSETS_DIR / "speech.wav"
MANIFEST_PATH = ASSETS_DIR / "demo.json"
DRAWN_PATH = ASSETS_DIR / "drawn.png"
PHOTO_PATH = ASSETS_DIR / "photo.png"

WORLD_SEED = 0
"""The world (and split) the demo's identity and sentences are held out of: the shipped checkpoints' world."""
REFERENCE_SIZE = 128
"""The trained preset's (talk128's) resolution."""
DEMO_STYLE = "flat"
DEMO_SENTENCES = 2
SPEECH_RATE_HZ = 16000

IMAGE_SIZE = 256
SUPERSAMPLE = 4  # draw at 4x and downsample for smooth edges

# Palette (RGB).
SKIN = (238, 196, 164)
SKIN_SHADE = (214, 164, 132)
HAIR = (74, 46, 30)
HAIR_LIGHT = (110, 72, 46)
SHIRT = (52, 92, 150)
SHIRT_SHADE = (38, 70, 118)
IRIS = (70, 110, 70)
LIP = (192, 92, 92)
LIP_DARK = (120, 46, 52)
BROW = (66, 40, 26)


# --------------------------------------------------------------------------- #
# Image
# --------------------------------------------------------------------------- #


def _background(size: int) -> Image.Image:
    """Vertical gradient (soft teal at the top to pale warm grey at the bottom)."""
    t = np.linspace(0.0, 1.0, size, dtype=np.float32)[:, None, None]
    top = np.array([118, 168, 182], dtype=np.float32)
    bottom = np.array([226, 222, 210], dtype=np.float32)
    column = top * (1.0 - t) + bottom * t  # [size, 1, 3]
    # A gentle radial brightening behind the head.
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32) / size
    glow = np.exp(-(((xx - 0.5) ** 2) + ((yy - 0.42) ** 2)) / 0.08)[..., None]
    pixels = np.broadcast_to(column, (size, size, 3)) + 28.0 * glow
    return Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8), "RGB").convert("RGBA")


def _layer(size: int) -> tuple[Image.Image, ImageDraw.ImageDraw]:
    layer = Image.new("RGBA", (size, size), (0, 0, 0, 0))
    return layer, ImageDraw.Draw(layer)


def draw_reference(size: int = IMAGE_SIZE) -> Image.Image:
    """Draw the stylised portrait; returns an RGB image of ``size x size``."""
    S = size * SUPERSAMPLE

    def px(v: float) -> int:  # coordinates are authored on a 0..1000 grid
        return round(v * S / 1000)

    def box(x0: float, y0: float, x1: float, y1: float) -> list[int]:
        return [px(x0), px(y0), px(x1), px(y1)]

    canvas = _background(S)

    # Shoulders and shirt.
    layer, d = _layer(S)
    d.ellipse(box(150, 800, 850, 1250), fill=SHIRT)
    d.polygon([(px(420), px(800)), (px(500), px(900)), (px(580), px(800))], fill=SHIRT_SHADE)
    canvas.alpha_composite(layer)

    # Neck with a soft shadow under the jaw.
    layer, d = _layer(S)
    d.rounded_rectangle(box(420, 650, 580, 860), radius=px(40), fill=SKIN)
    canvas.alpha_composite(layer)
    layer, d = _layer(S)
    d.ellipse(box(410, 690, 590, 780), fill=SKIN_SHADE + (200,))
    canvas.alpha_composite(layer.filter(ImageFilter.GaussianBlur(px(12))))

    # Hair, back part (frames the face, falls to the shoulders).
    layer, d = _layer(S)
    d.ellipse(box(255, 120, 745, 640), fill=HAIR)
    d.rounded_rectangle(box(262, 360, 738, 760), radius=px(90), fill=HAIR)
    canvas.alpha_composite(layer)

    # Ears.
    layer, d = _layer(S)
    for x0 in (285, 665):
        d.ellipse(box(x0, 400, x0 + 50, 510), fill=SKIN_SHADE)
    canvas.alpha_composite(layer)

    # Head.
    layer, d = _layer(S)
    d.ellipse(box(305, 190, 695, 740), fill=SKIN)
    canvas.alpha_composite(layer)

    # Cheek blush and subtle side shading.
    layer, d = _layer(S)
    for x0 in (350, 560):
        d.ellipse(box(x0, 530, x0 + 90, 590), fill=(236, 140, 130, 110))
    canvas.alpha_composite(layer.filter(ImageFilter.GaussianBlur(px(14))))

    # Fringe / bangs over the forehead, with a parting.
    layer, d = _layer(S)
    d.chord(box(290, 150, 710, 470), start=180, end=360, fill=HAIR)
    d.pieslice(box(300, 190, 520, 420), start=180, end=270, fill=HAIR)
    d.pieslice(box(480, 190, 700, 420), start=270, end=360, fill=HAIR)
    d.arc(box(380, 175, 640, 330), start=200, end=300, fill=HAIR_LIGHT, width=px(10))
    canvas.alpha_composite(layer)

    # Eyebrows.
    layer, d = _layer(S)
    d.arc(box(365, 380, 475, 440), start=200, end=340, fill=BROW, width=px(14))
    d.arc(box(525, 380, 635, 440), start=200, end=340, fill=BROW, width=px(14))
    canvas.alpha_composite(layer)

    # Eyes: white, iris, pupil, highlight, upper lid line.
    layer, d = _layer(S)
    for cx in (420, 580):
        d.ellipse(box(cx - 52, 430, cx + 52, 486), fill=(250, 250, 248))
        d.ellipse(box(cx - 25, 432, cx + 25, 484), fill=IRIS)
        d.ellipse(box(cx - 12, 446, cx + 12, 470), fill=(16, 16, 20))
        d.ellipse(box(cx + 2, 440, cx + 14, 452), fill=(255, 255, 255))
        d.arc(box(cx - 54, 426, cx + 54, 490), start=190, end=350, fill=(40, 26, 20), width=px(7))
    canvas.alpha_composite(layer)

    # Nose: soft shading down the side plus nostrils.
    layer, d = _layer(S)
    d.line([(px(510), px(470)), (px(522), px(560)), (px(500), px(580))],
           fill=SKIN_SHADE + (255,), width=px(9), joint="curve")
    canvas.alpha_composite(layer.filter(ImageFilter.GaussianBlur(px(3))))
    layer, d = _layer(S)
    d.ellipse(box(472, 570, 492, 584), fill=(150, 100, 84))
    d.ellipse(box(508, 570, 528, 584), fill=(150, 100, 84))
    canvas.alpha_composite(layer.filter(ImageFilter.GaussianBlur(px(2))))

    # Mouth: lips in a gentle smile, slightly parted.
    layer, d = _layer(S)
    d.chord(box(430, 600, 570, 690), start=0, end=180, fill=LIP)  # lower lip
    d.chord(box(430, 615, 570, 655), start=180, end=360, fill=LIP)  # upper lip
    d.arc(box(430, 590, 570, 660), start=15, end=165, fill=LIP_DARK, width=px(8))  # lip line
    canvas.alpha_composite(layer)

    image = canvas.convert("RGB")
    return image.resize((size, size), Image.Resampling.LANCZOS)


def write_drawn(path: Path = DRAWN_PATH) -> None:
    draw_reference().save(path, format="PNG", optimize=True)
    print(f"wrote {path} ({path.stat().st_size} bytes)")


def write_photo(path: Path = PHOTO_PATH) -> bool:
    """The photograph's head and shoulders, 256x256; False (the shipped file kept) without scikit-image."""
    try:
        from skimage import data
    except ImportError:
        print(f"scikit-image not installed; keeping shipped {path}")
        return False
    photo = Image.fromarray(data.astronaut())            # 512x512, NASA, public domain
    photo.crop((106, 0, 346, 240)).resize((IMAGE_SIZE, IMAGE_SIZE), Image.Resampling.LANCZOS).save(path, "PNG")
    print(f"wrote {path} ({path.stat().st_size} bytes)")
    return True


# --------------------------------------------------------------------------- #
# The held-out demo: identity, sentences, voice
# --------------------------------------------------------------------------- #


def demo_choice(seed: int = WORLD_SEED) -> dict:
    """The first held-out identity of `DEMO_STYLE` and the first `DEMO_SENTENCES` held-out sentences of the world."""
    sys.path.insert(0, str(ASSETS_DIR.parent))
    from model_core.world.identity import STYLES, identity
    from model_core.world.sentences import sentence
    from model_core.world.split import WorldSplit

    split = WorldSplit(seed)
    person = next(i for i in split.identities("eval") if identity(seed, i).style == STYLES.index(DEMO_STYLE))
    indices, index = [], 0
    while len(indices) < DEMO_SENTENCES:
        if split.held_out_sentence(index):
            indices.append(index)
        index += 1
    return {"world_seed": seed, "identity": person, "style": DEMO_STYLE, "sentences": indices,
            "text": " ".join(sentence(i) for i in indices), "voice": split.held_out_voice,
            "reference_size": REFERENCE_SIZE}


def write_reference(choice: dict, path: Path = IMAGE_PATH) -> None:
    from model_core.evaluate import reference_render

    frame, _ = reference_render(choice["identity"], choice["world_seed"], choice["reference_size"])
    Image.fromarray(frame).save(path, format="PNG", optimize=True)
    print(f"wrote {path} (held-out identity {choice['identity']}, {choice['style']})")


def write_speech(choice: dict, path: Path = SPEECH_PATH) -> bool:
    """The held-out sentences in the held-out voice; False (the shipped file kept) without libespeak-ng."""
    from model_core.world.speech import EspeakMissing, Voice, speak

    try:
        utterance = speak(choice["text"], Voice(choice["voice"]))
    except EspeakMissing as error:
        print(f"{error}; keeping shipped {path}")
        return False
    pcm = utterance.pcm / max(1e-6, float(np.abs(utterance.pcm).max())) * 10 ** (-1 / 20)  # peak at -1 dBFS
    samples = np.clip(np.round(pcm * 32767), -32768, 32767).astype("<i2")
    with wave.open(str(path), "wb") as dst:
        dst.setnchannels(1)
        dst.setsampwidth(2)
        dst.setframerate(SPEECH_RATE_HZ)
        dst.writeframes(samples.tobytes())
    print(f"wrote {path} ({len(samples) / SPEECH_RATE_HZ:.2f} s: {choice['text']!r}, voice {choice['voice']})")
    return True


def main() -> int:
    choice = demo_choice()
    write_reference(choice)
    write_speech(choice)
    MANIFEST_PATH.write_text(json.dumps(choice, indent=2) + "\n")
    print(f"wrote {MANIFEST_PATH}")
    write_drawn()
    write_photo()
    return 0


if __name__ == "__main__":
    sys.exit(main())
