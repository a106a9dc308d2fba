"""Who a character is: the seeded parameters of one identity of the talking-face world.

    identity(world_seed, identity_id) -> Identity        deterministic; the same pair is the same face everywhere
    STYLES                                               flat, shaded, lineart (index stored as ground truth)

An identity fixes everything that does not move: face shape, skin, hair, eyes, brows, nose, lips, accessories,
background, framing and render style. What moves (mouth, blinks, head pose) is per frame (`render.FrameState`).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

STYLES: tuple[str, ...] = ("flat", "shaded", "lineart")
HAIR_STYLES = ("bald", "short", "long", "bun", "spiky", "bob", "curly")
BACKGROUNDS = ("solid", "gradient", "stripes", "dots", "window")

_SKINS = ((255, 224, 196), (241, 194, 155), (224, 172, 125), (198, 134, 90), (160, 102, 62), (111, 70, 42),
          (84, 52, 34), (250, 210, 180))
_FANTASY_SKINS = ((140, 200, 120), (120, 170, 230), (200, 160, 230), (240, 170, 170), (170, 210, 210))
_HAIRS = ((20, 16, 14), (60, 40, 25), (110, 70, 35), (170, 120, 60), (225, 195, 120), (200, 90, 40),
          (140, 140, 140), (240, 240, 235), (60, 90, 200), (210, 60, 140), (40, 150, 90), (120, 40, 160))
_IRISES = ((70, 45, 25), (40, 90, 160), (60, 130, 70), (110, 110, 120), (20, 20, 20), (150, 90, 40))


@dataclass(frozen=True)
class Identity:
    id: int
    style: int
    skin: tuple[int, int, int]
    face_w: float            # head width as a fraction of the frame (before framing scale)
    face_h: float            # height / width
    jaw: float               # 0 round .. 1 pointed chin
    hair_style: int
    hair: tuple[int, int, int]
    eye_size: float
    eye_spacing: float
    eye_y: float
    iris: tuple[int, int, int]
    almond_eyes: bool
    brow_thickness: float
    brow_tilt: float
    brow: tuple[int, int, int]
    nose: int                # 0 dot, 1 line, 2 triangle
    mouth_w: float
    lips: tuple[int, int, int]
    glasses: int             # 0 none, 1 round, 2 square
    earrings: bool
    hat: int                 # 0 none, 1 beanie, 2 cap
    beard: int               # 0 none, 1 mustache, 2 beard
    freckles: bool
    blush: bool
    background: int
    bg_colors: tuple[tuple[int, int, int], tuple[int, int, int]]
    scale: float             # framing: 1 = FaceTime close-up
    offset: tuple[float, float]
    motion: float            # how much the head moves while speaking (0.5 .. 1.5)

    @property
    def style_name(self) -> str:
        return STYLES[self.style]


def _color(rng: np.random.Generator, palette, jitter: int = 12) -> tuple[int, int, int]:
    base = np.array(palette[rng.integers(len(palette))], dtype=np.int32)
    return tuple(int(c) for c in np.clip(base + rng.integers(-jitter, jitter + 1, 3), 0, 255))


def identity(world_seed: int, identity_id: int) -> Identity:
    """The identity with this id in the world of this seed."""
    if identity_id < 0:
        raise ValueError(f"identity id {identity_id} is invalid: must be >= 0")
    rng = np.random.default_rng([int(world_seed), 7919, int(identity_id)])
    style = int(identity_id % len(STYLES))  # styles balanced over ids
    fantasy = style != 1 and rng.random() < 0.15
    skin = _color(rng, _FANTASY_SKINS if fantasy else _SKINS)
    bg = (_color(rng, ((230, 230, 240), (200, 220, 240), (240, 220, 200), (60, 70, 90), (220, 240, 220),
                       (250, 250, 250), (40, 40, 45), (180, 200, 170)), 25),
          _color(rng, ((120, 140, 180), (240, 200, 150), (90, 60, 80), (200, 200, 200), (150, 190, 220)), 25))
    return Identity(
        id=int(identity_id), style=style, skin=skin,
        face_w=float(rng.uniform(0.48, 0.58)), face_h=float(rng.uniform(1.12, 1.38)), jaw=float(rng.uniform(0, 1)),
        hair_style=int(rng.integers(len(HAIR_STYLES))), hair=_color(rng, _HAIRS),
        eye_size=float(rng.uniform(0.75, 1.3) * (1.35 if style == 2 else 1.0)),
        eye_spacing=float(rng.uniform(0.36, 0.46)), eye_y=float(rng.uniform(-0.12, -0.02)),
        iris=_color(rng, _IRISES), almond_eyes=bool(rng.random() < 0.5),
        brow_thickness=float(rng.uniform(0.6, 1.6)), brow_tilt=float(rng.uniform(-0.35, 0.35)),
        brow=_color(rng, _HAIRS[:8]), nose=int(rng.integers(3)), mouth_w=float(rng.uniform(0.30, 0.42)),
        lips=tuple(int(c) for c in np.clip(np.array(skin) * rng.uniform(0.6, 0.85) + [40, 0, 0], 0, 255)),
        glasses=int(rng.choice(3, p=[0.7, 0.15, 0.15])), earrings=bool(rng.random() < 0.25),
        hat=int(rng.choice(3, p=[0.86, 0.07, 0.07])), beard=int(rng.choice(3, p=[0.75, 0.13, 0.12])),
        freckles=bool(rng.random() < 0.2), blush=bool(rng.random() < 0.3),
        background=int(rng.integers(len(BACKGROUNDS))), bg_colors=bg,
        scale=float(rng.uniform(0.92, 1.1)), offset=(float(rng.uniform(-0.04, 0.04)), float(rng.uniform(-0.03, 0.05))),
        motion=float(rng.uniform(0.5, 1.5)))
