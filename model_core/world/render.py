"""Drawing the world: identities and per-frame state to RGB frames, in three styles, with the face box of each head.

    Renderer(size).frame([(identity, FrameState), ...]) -> (uint8 [H, W, 3], face boxes [C, 4] as x0, y0, x1, y1)

Heads are drawn with PIL at 2x and reduced (anti-aliasing). Everything that does not move is drawn once per identity
and layout slot and cached: the background, the layer under the moving parts (back hair, ears, face, nose, beard,
freckles; shaded for the "shaded" style) and the layer over them (fringe, hat, glasses). Per frame only the eyes,
brows and mouth are drawn, then the head layer is rotated (roll) and moved (nod, sway) onto the background.

The mouth drawn is exactly `FrameState.opening` (0 closed .. 1 widest) times the identity's largest opening, so the
recorded ground truth and the pixels agree by construction; a test measures the dark mouth interior to hold it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import lru_cache

import numpy as np
from PIL import Image, ImageDraw

from .identity import Identity

SUPERSAMPLE = 2
MOUTH_INSIDE = (70, 18, 30)
_LAYOUTS = {1: ((0.5, 0.55, 1.0),), 2: ((0.26, 0.56, 0.5), (0.74, 0.56, 0.5))}


@dataclass(frozen=True)
class FrameState:
    opening: float = 0.0   # mouth, 0 closed .. 1 widest
    width: float = 1.0     # mouth width, 1 neutral (< 1 rounded, > 1 wide)
    blink: float = 0.0     # 0 open .. 1 closed
    dx: float = 0.0        # head offset as a fraction of the frame
    dy: float = 0.0
    roll: float = 0.0      # degrees
    brow: float = 0.0      # brow raise 0..1


@dataclass(frozen=True)
class _Geometry:
    hx: float
    hy: float
    a: float   # face half-width (px at supersampled scale)
    b: float   # face half-height


def _mix(color, other, t: float) -> tuple[int, int, int]:
    return tuple(int(round(c * (1 - t) + o * t)) for c, o in zip(color, other))


def _scaled(color, factor: float) -> tuple[int, int, int]:
    return tuple(int(max(0, min(255, round(c * factor)))) for c in color)


class Renderer:
    """Frames of `size` x `size` pixels. Caches per (identity, slot); one renderer per process is enough."""

    def __init__(self, size: int = 128):
        if size < 32 or size % 16:
            raise ValueError(f"render size={size} is invalid: a multiple of 16, at least 32")
        self.size = size
        self.canvas = size * SUPERSAMPLE
        self._static = lru_cache(maxsize=64)(self._static_layers)
        self._backgrounds = lru_cache(maxsize=64)(self._background)

    # ------------------------------------------------------------------ geometry

    def geometry(self, ident: Identity, slot: int, count: int) -> _Geometry:
        cx, cy, layout_scale = _LAYOUTS[count][slot]
        s = self.canvas
        a = s * ident.face_w * ident.scale * layout_scale / 2
        return _Geometry(hx=s * (cx + ident.offset[0] * layout_scale), hy=s * (cy + ident.offset[1] * layout_scale),
                         a=a, b=a * ident.face_h)

    def face_box(self, ident: Identity, state: FrameState, slot: int, count: int) -> np.ndarray:
        """The head's face (forehead to chin, ear to ear) in output pixels, after roll and offset."""
        g = self.geometry(ident, slot, count)
        half_w, half_h = g.a * 1.08, g.b * (1.0 + 0.12 * ident.jaw)
        angle = math.radians(state.roll)
        w = abs(half_w * math.cos(angle)) + abs(half_h * math.sin(angle))
        h = abs(half_w * math.sin(angle)) + abs(half_h * math.cos(angle))
        cx, cy = g.hx + state.dx * self.canvas, g.hy + state.dy * self.canvas
        return np.array([cx - w, cy - h, cx + w, cy + h], np.float32) / SUPERSAMPLE

    # ------------------------------------------------------------------ frames

    def frame(self, people: list[tuple[Identity, FrameState]]) -> tuple[np.ndarray, np.ndarray]:
        count = len(people)
        if count not in _LAYOUTS:
            raise ValueError(f"a frame holds 1 or 2 characters, not {count}")
        image = self._backgrounds(people[0][0]).copy()
        boxes = []
        for slot, (ident, state) in enumerate(people):
            under, over = self._static(ident, slot, count)
            head = under.copy()
            self._moving_parts(ImageDraw.Draw(head), ident, state, self.geometry(ident, slot, count))
            head.alpha_composite(over)
            g = self.geometry(ident, slot, count)
            head = head.rotate(state.roll, resample=Image.BILINEAR, center=(g.hx, g.hy),
                               translate=(state.dx * self.canvas, state.dy * self.canvas))
            image.alpha_composite(head)
            boxes.append(self.face_box(ident, state, slot, count))
        out = image.convert("RGB").reduce(SUPERSAMPLE)
        return np.asarray(out), np.stack(boxes)

    # ------------------------------------------------------------------ static layers

    def _background(self, ident: Identity) -> Image.Image:
        s = self.canvas
        c0, c1 = (np.array(c, np.float32) for c in ident.bg_colors)
        y, x = np.mgrid[0:s, 0:s].astype(np.float32) / s
        kind = ident.background
        if kind == 0:
            t = np.zeros_like(x)
        elif kind == 1:
            t = y
        elif kind == 2:
            t = ((x * 6 + y * 2 + ident.id % 3 * 0.3) % 1.0 < 0.5).astype(np.float32) * 0.35
        elif kind == 3:
            t = (((x * 8) % 1 - 0.5) ** 2 + ((y * 8) % 1 - 0.5) ** 2 < 0.04).astype(np.float32) * 0.5
        else:
            t = ((np.abs(x - 0.78) < 0.16) & (np.abs(y - 0.3) < 0.2)).astype(np.float32) * 0.8
        rgb = c0[None, None] * (1 - t[..., None]) + c1[None, None] * t[..., None]
        return Image.fromarray(np.clip(rgb, 0, 255).astype(np.uint8), "RGB").convert("RGBA")

    def _static_layers(self, ident: Identity, slot: int, count: int) -> tuple[Image.Image, Image.Image]:
        s, g = self.canvas, self.geometry(ident, slot, count)
        lineart = ident.style == 2
        outline = (25, 20, 30) if lineart else None
        ow = max(2, round(g.a * 0.035)) if lineart else 0
        skin = _mix(ident.skin, (255, 255, 255), 0.35) if lineart else ident.skin
        hair = ident.hair
        under = Image.new("RGBA", (s, s), (0, 0, 0, 0))
        d = ImageDraw.Draw(under)
        hx, hy, a, b = g.hx, g.hy, g.a, g.b
        style = ident.hair_style
        if style in (2, 5, 6):  # long / bob / curly: hair behind the head
            drop = {2: 1.25, 5: 0.55, 6: 0.6}[style]
            d.rounded_rectangle((hx - a * 1.22, hy - b * 1.05, hx + a * 1.22, hy + b * drop), radius=a * 0.6,
                                fill=hair, outline=outline, width=ow)
        if style == 3:
            d.ellipse((hx - a * 0.45, hy - b * 1.45, hx + a * 0.45, hy - b * 0.75), fill=hair, outline=outline,
                      width=ow)
        for side in (-1, 1):  # ears
            d.ellipse((hx + side * a - a * 0.16, hy - b * 0.12, hx + side * a + a * 0.16, hy + b * 0.22),
                      fill=_scaled(skin, 0.93), outline=outline, width=ow)
            if ident.earrings:
                d.ellipse((hx + side * a - a * 0.06, hy + b * 0.22, hx + side * a + a * 0.06, hy + b * 0.34),
                          fill=(235, 200, 60))
        chin = b * (1.0 + 0.12 * ident.jaw)
        d.ellipse((hx - a, hy - b, hx + a, hy + b), fill=skin, outline=outline, width=ow)
        d.polygon([(hx - a * 0.86, hy + b * 0.35), (hx, hy + chin), (hx + a * 0.86, hy + b * 0.35)], fill=skin)
        if lineart:
            d.line([(hx - a * 0.86, hy + b * 0.5), (hx, hy + chin), (hx + a * 0.86, hy + b * 0.5)], fill=outline,
                   width=ow)
        nose_color = _scaled(skin, 0.78)
        ny = hy + b * 0.22
        if ident.nose == 0:
            d.ellipse((hx - a * 0.05, ny - a * 0.03, hx + a * 0.05, ny + a * 0.05), fill=nose_color)
        elif ident.nose == 1:
            d.line([(hx, ny - b * 0.15), (hx - a * 0.06, ny + a * 0.05), (hx + a * 0.03, ny + a * 0.05)],
                   fill=outline or nose_color, width=max(2, round(a * 0.03)))
        else:
            d.polygon([(hx, ny - b * 0.12), (hx - a * 0.09, ny + a * 0.06), (hx + a * 0.09, ny + a * 0.06)],
                      fill=nose_color)
        if ident.blush:
            for side in (-1, 1):
                d.ellipse((hx + side * a * 0.55 - a * 0.14, ny - a * 0.02, hx + side * a * 0.55 + a * 0.14,
                           ny + a * 0.12), fill=_mix(skin, (240, 120, 130), 0.45))
        if ident.freckles:
            rng = np.random.default_rng(ident.id)
            for fx, fy in rng.uniform(-1, 1, (12, 2)):
                x, y = hx + (0.55 + 0.2 * abs(fx)) * a * np.sign(fx), ny + fy * a * 0.1
                d.ellipse((x - a * 0.02, y - a * 0.02, x + a * 0.02, y + a * 0.02), fill=_scaled(skin, 0.7))
        if ident.beard == 2:
            my = hy + b * 0.55
            d.chord((hx - a * 0.92, hy + b * 0.05, hx + a * 0.92, hy + chin + b * 0.04), 10, 170,
                    fill=_scaled(hair, 0.9), outline=outline, width=ow)
            d.ellipse((hx - a * 0.42, my - b * 0.2, hx + a * 0.42, my + b * 0.25), fill=skin)
        if ident.style == 1:
            under = self._shade(under, g)
        over = Image.new("RGBA", (s, s), (0, 0, 0, 0))
        d = ImageDraw.Draw(over)
        if style in (1, 2, 5, 6):  # fringe over the forehead
            depth = {1: 0.25, 2: 0.3, 5: 0.4, 6: 0.28}[style]
            d.chord((hx - a * 1.04, hy - b * 1.06, hx + a * 1.04, hy + b * (2 * depth - 0.94)), 180, 360, fill=hair,
                    outline=outline, width=ow)
            if style == 6:
                for k in range(7):
                    x = hx - a + k * a / 3
                    d.ellipse((x - a * 0.2, hy - b * 1.05, x + a * 0.2, hy - b * 0.7), fill=hair)
        elif style == 4:  # spiky
            points = [(hx - a * 1.0, hy - b * 0.45)]
            for k in range(7):
                x = hx - a + (k + 0.5) * 2 * a / 7
                points += [(x, hy - b * (1.25 + 0.1 * (k % 2))), (x + a / 7, hy - b * 0.8)]
            points.append((hx + a * 1.0, hy - b * 0.45))
            d.polygon(points, fill=hair, outline=outline)
        elif style == 3:
            d.chord((hx - a * 1.02, hy - b * 1.04, hx + a * 1.02, hy - b * 0.3), 180, 360, fill=hair,
                    outline=outline, width=ow)
        if ident.hat:
            hat_color = _mix(ident.bg_colors[1], (200, 40, 40), 0.5)
            d.chord((hx - a * 1.08, hy - b * 1.3, hx + a * 1.08, hy - b * 0.2), 180, 360, fill=hat_color,
                    outline=outline, width=ow)
            if ident.hat == 2:
                d.ellipse((hx - a * 0.2, hy - b * 0.85, hx + a * 1.45, hy - b * 0.62), fill=_scaled(hat_color, 0.8))
        if ident.beard == 1:
            my = hy + b * 0.5
            d.polygon([(hx - a * 0.32, my), (hx, my - b * 0.1), (hx + a * 0.32, my), (hx, my - b * 0.03)],
                      fill=hair, outline=outline)
        if ident.glasses:
            ey, ex, r = self._eye_frame(ident, g)
            frame_color = (30, 30, 40) if ident.glasses == 1 else (120, 40, 40)
            w = max(2, round(a * 0.04))
            for side in (-1, 1):
                box = (hx + side * ex - r * 1.9, ey - r * 1.6, hx + side * ex + r * 1.9, ey + r * 1.6)
                if ident.glasses == 1:
                    d.ellipse(box, outline=frame_color, width=w)
                else:
                    d.rectangle(box, outline=frame_color, width=w)
            d.line([(hx - ex + r * 1.9, ey), (hx + ex - r * 1.9, ey)], fill=frame_color, width=w)
        return under, over

    @staticmethod
    def _shade(layer: Image.Image, g: _Geometry) -> Image.Image:
        """The "shaded" style: Lambert + specular lighting of an ellipsoid head, lit from the upper left."""
        rgba = np.asarray(layer).astype(np.float32)
        s = rgba.shape[0]
        y, x = np.mgrid[0:s, 0:s].astype(np.float32)
        nx, ny = (x - g.hx) / (g.a * 1.25), (y - g.hy) / (g.b * 1.2)
        nz = np.sqrt(np.clip(1 - nx ** 2 - ny ** 2, 0, 1))
        light = np.array([-0.45, -0.5, 0.74])
        lambert = np.clip(nx * light[0] + ny * light[1] + nz * light[2], 0, 1)
        specular = np.clip(lambert, 0, 1) ** 24 * 0.35
        shade = np.where(nz > 0, 0.45 + 0.7 * lambert, 0.6)
        rgba[..., :3] = np.clip(rgba[..., :3] * shade[..., None] + 255 * specular[..., None], 0, 255)
        return Image.fromarray(rgba.astype(np.uint8), "RGBA")

    # ------------------------------------------------------------------ moving parts

    @staticmethod
    def _eye_frame(ident: Identity, g: _Geometry) -> tuple[float, float, float]:
        return g.hy - g.b * 0.12 + ident.eye_y * g.b, ident.eye_spacing * g.a, 0.12 * g.a * ident.eye_size

    def _moving_parts(self, d: ImageDraw.ImageDraw, ident: Identity, state: FrameState, g: _Geometry) -> None:
        lineart = ident.style == 2
        outline = (25, 20, 30)
        hx, a = g.hx, g.a
        ey, ex, r = self._eye_frame(ident, g)
        open_eye = max(0.0, 1.0 - state.blink)
        for side in (-1, 1):
            cx = hx + side * ex
            rx, ry = r * (1.35 if ident.almond_eyes else 1.05), r * (0.75 if ident.almond_eyes else 1.0)
            if open_eye > 0.15:
                d.ellipse((cx - rx, ey - ry * open_eye, cx + rx, ey + ry * open_eye), fill=(250, 250, 250),
                          outline=outline if lineart else None, width=max(2, round(a * 0.03)) if lineart else 0)
                ir = min(r * 0.62, ry * open_eye)
                d.ellipse((cx - ir, ey - ir, cx + ir, ey + ir), fill=ident.iris)
                pr = ir * 0.5
                d.ellipse((cx - pr, ey - pr, cx + pr, ey + pr), fill=(15, 12, 15))
                if lineart or ident.style == 1:
                    d.ellipse((cx - ir * 0.1, ey - ir * 0.75, cx + ir * 0.35, ey - ir * 0.35), fill=(255, 255, 255))
            else:
                d.line([(cx - rx, ey), (cx + rx, ey)], fill=outline, width=max(2, round(a * 0.03)))
            lift = r * (1.55 + 0.5 * state.brow)
            tilt = ident.brow_tilt * r * side
            d.line([(cx - rx, ey - lift + tilt), (cx + rx, ey - lift - tilt)], fill=ident.brow,
                   width=max(2, round(a * 0.05 * ident.brow_thickness)))
        self._mouth(d, ident, state, g)

    def _mouth(self, d: ImageDraw.ImageDraw, ident: Identity, state: FrameState, g: _Geometry) -> None:
        hx, my = g.hx, g.hy + g.b * 0.55
        half_w = ident.mouth_w * g.a * max(0.4, state.width)
        height = max(0.0, min(1.0, state.opening)) * ident.mouth_w * g.a * 0.9
        lip = max(2.0, g.a * 0.045)
        lips = (25, 20, 30) if ident.style == 2 else ident.lips
        if height < lip * 0.6:
            d.line([(hx - half_w, my), (hx + half_w, my)], fill=lips, width=round(lip))
            return
        top, bottom = my - height * 0.3, my + height * 0.7
        d.ellipse((hx - half_w - lip, top - lip, hx + half_w + lip, bottom + lip), fill=lips)
        d.ellipse((hx - half_w, top, hx + half_w, bottom), fill=MOUTH_INSIDE)
        if height > lip * 2.5:
            d.chord((hx - half_w * 0.8, top, hx + half_w * 0.8, top + height * 0.5), 180, 360, fill=(245, 245, 240))
            d.chord((hx - half_w * 0.6, bottom - height * 0.45, hx + half_w * 0.6, bottom + height * 0.2), 180, 360,
                    fill=(200, 80, 90))
