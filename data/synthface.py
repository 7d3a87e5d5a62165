"""SynthFace: a built-in, procedurally generated, identity-labelled face dataset.

It lets the project's main job run on a fresh machine without downloading anything.
Each identity is a stable set of facial parameters (head shape, skin and hair colour,
hair style, eyes, brows, nose, mouth, optional beard/moustache/mole).  Every image of an
identity is rendered under random nuisance variation, like a real face photo: pose
(rotation, shift, scale, a yaw-like squeeze), illumination (gradient shading, strength,
colour cast), expression (open mouth, smile, half-closed eyes), occasional glasses or an
occluder (hand, bar, hat), background clutter, clothing, blur and noise.

The nuisance variation is deliberately strong, so that raw-pixel distance (and therefore
unsupervised product quantization of pixels) is a poor identity cue, while the identity
signal (distinct geometry and colours) stays easy to learn for a CNN trained with labels.
See ``bench/bench_synthface_pq.py`` for the pixel baselines.

Layout written by :func:`ensure_synthface` (FaceScrub protocol: a fixed number of test
images per identity, the rest train)::

    <data_dir>/synthface/synthface.json
    <data_dir>/synthface/train/id0000/id0000_000.png ...
    <data_dir>/synthface/test/id0000/id0000_030.png ...
    <data_dir>/synthface/cross_train/xid0000/xid0000_000.png ...
    <data_dir>/synthface/cross_test/xid0000/xid0000_030.png ...

The ``cross_*`` identities are drawn from a different random stream, so no identity is
shared with ``train``/``test``.  Everything is deterministic for a seed: identity
parameters derive from (seed, set, identity index) and image variation from
(seed, set, identity index, image index), so regeneration gives byte-identical PNGs
(for the same Pillow/zlib build).
"""

from __future__ import annotations

import json
import math
import multiprocessing
import os
import shutil
import tempfile
import uuid
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Sequence

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

__all__ = [
    "IdentityParams",
    "Variation",
    "sample_identity",
    "sample_variation",
    "render_face",
    "ensure_synthface",
    "synthface_meta",
    "use_synthface",
    "SynthfaceMismatch",
    "describe_synthface",
    "GENERATOR_VERSION",
    "DEFAULT_NUM_IDENTITIES",
    "DEFAULT_TRAIN_PER_IDENTITY",
    "DEFAULT_TEST_PER_IDENTITY",
    "DEFAULT_CROSS_IDENTITIES",
]

# Bump whenever the renderer or the sampling changes, so cached datasets get regenerated.
GENERATOR_VERSION = 1

DEFAULT_NUM_IDENTITIES = 100
DEFAULT_TRAIN_PER_IDENTITY = 30
DEFAULT_TEST_PER_IDENTITY = 5
DEFAULT_CROSS_IDENTITIES = 60

# Random-stream tags (first words of the SeedSequence entropy after the seed).  The main
# and cross identity sets use different tags, which is what keeps them disjoint.
_STREAM_MAIN = 1
_STREAM_CROSS = 2
_STREAM_VARIATION = 3

# ---------------------------------------------------------------------------------------
# Nuisance-variation knobs.  Each range is the value at difficulty 1.0; ``difficulty``
# scales the half-width of the ranges and the probabilities of accessories/occluders
# (0 = frontal, evenly lit, sharp, no clutter or accessories; expression and gaze still
# vary).  Tune here.
# ---------------------------------------------------------------------------------------
ROTATION_DEG = 14.0          # in-plane rotation, +/- degrees
SHIFT_FRAC = 0.08            # translation, +/- fraction of the image side
SCALE_LOG = 0.13             # log-uniform scale, exp(+/- SCALE_LOG)
YAW = 1.0                    # yaw-like turn in [-YAW, YAW] (squeeze + inner-feature shift)
LIGHT_STRENGTH = 0.75        # max gradient shading amplitude (fraction of intensity)
BRIGHTNESS_LOG = 0.3         # global gain, exp(+/- BRIGHTNESS_LOG)
COLOUR_CAST = 0.12           # per-channel gain, 1 +/- COLOUR_CAST
CONTRAST = 0.2               # contrast 1 +/- CONTRAST around the image mean
BLUR_MAX = 0.9               # Gaussian blur radius at the stored size, in pixels
NOISE_MAX = 8.0              # Gaussian noise sigma, in 0..255 units
CLUTTER_SHAPES = (3, 12)     # number of background clutter shapes (min, max) at difficulty 1
P_GLASSES = 0.18             # probability of glasses in an image
P_SUNGLASSES = 0.25          # ... of which sunglasses (dark lenses)
P_HAT = 0.07                 # probability of a hat
P_HAND = 0.07                # probability of a hand in front of the face
P_BAR = 0.07                 # probability of a bar/banner across the image
P_EYES_HALF_CLOSED = 0.2     # probability of half-closed eyes
P_MOUTH_OPEN = 0.3           # probability of an open mouth

# Identity palettes (RGB).  Continuous jitter is added on top, so identities are distinct.
_SKIN_TONES = np.array(
    [(255, 226, 200), (243, 199, 170), (226, 174, 140), (204, 140, 100),
     (168, 112, 78), (128, 84, 58), (92, 60, 42)], dtype=np.float64)
_HAIR_COLOURS = np.array(
    [(22, 18, 18), (55, 38, 28), (96, 64, 40), (132, 62, 32), (186, 104, 52),
     (214, 182, 118), (236, 222, 186), (140, 138, 136), (222, 222, 218)], dtype=np.float64)
_DYED_HAIR = np.array([(40, 70, 170), (170, 50, 120), (60, 140, 90), (150, 40, 40)],
                      dtype=np.float64)
_EYE_COLOURS = np.array(
    [(52, 30, 18), (96, 58, 30), (128, 98, 48), (72, 118, 66), (62, 106, 170),
     (118, 128, 140)], dtype=np.float64)

HAIR_STYLES = ("bald", "short", "long", "fringe", "side_part", "curly", "buzz", "bun")
BEARD_STYLES = ("none", "full", "goatee", "moustache", "stubble")
_BEARD_PROBS = (0.62, 0.1, 0.09, 0.1, 0.09)

RGB = tuple[int, int, int]


@dataclass(frozen=True)
class IdentityParams:
    """Stable facial parameters of one identity (lengths relative to the face size)."""

    face_width: float      # face half-width, fraction of the canvas side
    face_aspect: float     # face half-height / half-width
    jaw: float             # chin width factor: 1 = round, smaller = pointed
    skin: RGB
    hair: RGB
    hair_style: str
    hair_volume: float     # how far hair extends beyond the skull, fraction of width
    hairline: float        # hairline height above the face centre, fraction of height
    ear_size: float
    eye_spacing: float     # eye centre offset from the midline, fraction of width
    eye_size: float        # eye half-width, fraction of face width
    eye_height: float      # eye level relative to the face centre, fraction of height
    eye_tilt: float        # radians, outer corner up when positive
    eye_colour: RGB
    brow_thickness: float  # fraction of face width
    brow_angle: float      # radians, inner end down when positive
    brow_gap: float        # brow height above the eye, fraction of height
    nose_length: float     # fraction of face height (from eye level)
    nose_width: float      # fraction of face width
    mouth_width: float     # mouth half-width, fraction of face width
    mouth_y: float         # mouth level below the face centre, fraction of height
    lip_colour: RGB
    lip_thickness: float   # fraction of face height
    beard: str
    mole: tuple[float, float, float] | None  # (x, y, radius) in face units, or None


@dataclass(frozen=True)
class Variation:
    """Per-image nuisance variation (see the module-level knobs for their ranges)."""

    angle: float           # in-plane rotation, degrees
    shift: tuple[float, float]  # fraction of the image side
    scale: float
    yaw: float             # -1..1
    light_angle: float     # radians, direction the light comes from
    light_strength: float
    brightness: float
    cast: tuple[float, float, float]
    contrast: float
    mouth_open: float      # 0..1
    smile: float           # -0.4..1
    eye_open: float        # 0.25..1
    brow_raise: float      # fraction of face height
    gaze: float            # iris shift, -1..1
    glasses: str           # "none", "round", "rect", "sun"
    glasses_colour: RGB
    hat: bool
    hand: bool
    bar: bool
    clothing: RGB
    clutter: int           # number of background clutter shapes
    blur: float            # Gaussian radius at the stored size
    noise: float           # sigma in 0..255 units
    detail_seed: int       # seeds clutter, occluder placement and noise


def _jitter_colour(rng: np.random.Generator, base: np.ndarray, amount: float) -> RGB:
    c = base + rng.normal(0.0, amount, size=3)
    return tuple(int(v) for v in np.clip(np.round(c), 0, 255))  # type: ignore[return-value]


def _pick(rng: np.random.Generator, palette: np.ndarray) -> np.ndarray:
    return palette[int(rng.integers(len(palette)))]


def sample_identity(rng: np.random.Generator) -> IdentityParams:
    """Draw the stable parameters of one identity from ``rng``."""
    # Skin: a continuous position along the tone ramp, then a hue jitter.
    t = rng.uniform(0, len(_SKIN_TONES) - 1)
    i = min(int(t), len(_SKIN_TONES) - 2)
    skin_base = _SKIN_TONES[i] * (1 - (t - i)) + _SKIN_TONES[i + 1] * (t - i)
    skin = _jitter_colour(rng, skin_base + np.array([6.0, 0.0, -6.0]) * rng.normal(), 7.0)
    hair_base = _pick(rng, _DYED_HAIR) if rng.random() < 0.06 else _pick(rng, _HAIR_COLOURS)
    hair = _jitter_colour(rng, hair_base, 10.0)
    lip_base = np.array(skin, dtype=np.float64) * np.array([0.86, 0.52, 0.55]) + np.array([30, 0, 5])
    lip = _jitter_colour(rng, lip_base, 12.0)
    beard = str(rng.choice(BEARD_STYLES, p=_BEARD_PROBS))
    mole = None
    if rng.random() < 0.3:
        side = rng.choice([-1.0, 1.0])
        mole = (float(side * rng.uniform(0.25, 0.6)), float(rng.uniform(-0.1, 0.55)),
                float(rng.uniform(0.035, 0.06)))
    return IdentityParams(
        face_width=float(rng.uniform(0.24, 0.3)),
        face_aspect=float(rng.uniform(1.15, 1.45)),
        jaw=float(rng.uniform(0.45, 0.95)),
        skin=skin,
        hair=hair,
        hair_style=str(rng.choice(HAIR_STYLES)),
        hair_volume=float(rng.uniform(0.04, 0.3)),
        hairline=float(rng.uniform(0.42, 0.72)),
        ear_size=float(rng.uniform(0.16, 0.26)),
        eye_spacing=float(rng.uniform(0.3, 0.46)),
        eye_size=float(rng.uniform(0.14, 0.22)),
        eye_height=float(rng.uniform(-0.2, 0.0)),
        eye_tilt=float(rng.uniform(-0.18, 0.18)),
        eye_colour=_jitter_colour(rng, _pick(rng, _EYE_COLOURS), 8.0),
        brow_thickness=float(rng.uniform(0.035, 0.1)),
        brow_angle=float(rng.uniform(-0.3, 0.3)),
        brow_gap=float(rng.uniform(0.09, 0.16)),
        nose_length=float(rng.uniform(0.2, 0.36)),
        nose_width=float(rng.uniform(0.12, 0.24)),
        mouth_width=float(rng.uniform(0.26, 0.46)),
        mouth_y=float(rng.uniform(0.4, 0.62)),
        lip_colour=lip,
        lip_thickness=float(rng.uniform(0.03, 0.07)),
        beard=beard,
        mole=mole,
    )


def sample_variation(rng: np.random.Generator, difficulty: float = 1.0) -> Variation:
    """Draw the nuisance variation of one image; ``difficulty`` scales every range."""
    d = float(difficulty)

    def sym(r: float) -> float:  # uniform in [-r*d, r*d]
        return float(rng.uniform(-r * d, r * d))

    def chance(p: float) -> bool:
        return bool(rng.random() < min(1.0, p * d))

    glasses = "none"
    if chance(P_GLASSES):
        glasses = "sun" if rng.random() < P_SUNGLASSES else str(rng.choice(["round", "rect"]))
    eye_open = float(rng.uniform(0.25, 0.55)) if chance(P_EYES_HALF_CLOSED) else float(rng.uniform(0.75, 1.0))
    mouth_open = float(rng.uniform(0.3, 1.0)) if chance(P_MOUTH_OPEN) else 0.0
    return Variation(
        angle=sym(ROTATION_DEG),
        shift=(sym(SHIFT_FRAC), sym(SHIFT_FRAC)),
        scale=float(math.exp(sym(SCALE_LOG))),
        yaw=sym(YAW),
        light_angle=float(rng.uniform(0, 2 * math.pi)),
        light_strength=float(rng.uniform(0, LIGHT_STRENGTH * d)),
        brightness=float(math.exp(sym(BRIGHTNESS_LOG))),
        cast=(1 + sym(COLOUR_CAST), 1 + sym(COLOUR_CAST), 1 + sym(COLOUR_CAST)),
        contrast=1 + sym(CONTRAST),
        mouth_open=mouth_open,
        smile=float(rng.uniform(-0.4, 1.0)),
        eye_open=eye_open,
        brow_raise=sym(0.03),
        gaze=float(rng.uniform(-1, 1)),
        glasses=glasses,
        glasses_colour=tuple(int(v) for v in rng.integers(0, 200, size=3)),  # type: ignore[arg-type]
        hat=chance(P_HAT),
        hand=chance(P_HAND),
        bar=chance(P_BAR),
        clothing=tuple(int(v) for v in rng.integers(0, 256, size=3)),  # type: ignore[arg-type]
        clutter=int(round(rng.integers(CLUTTER_SHAPES[0], CLUTTER_SHAPES[1] + 1) * min(d, 1.0))),
        blur=float(rng.uniform(0, BLUR_MAX * d)),
        noise=float(rng.uniform(0, NOISE_MAX * d)),
        detail_seed=int(rng.integers(2**31)),
    )


# ---------------------------------------------------------------------------------------
# Rendering
# ---------------------------------------------------------------------------------------

def _ellipse_pts(cx: float, cy: float, rx: float, ry: float, t0: float, t1: float,
                 n: int = 24, tilt: float = 0.0) -> list[tuple[float, float]]:
    """Points on an (optionally rotated) ellipse arc from angle t0 to t1 (y points down)."""
    ts = np.linspace(t0, t1, n)
    x = rx * np.cos(ts)
    y = ry * np.sin(ts)
    c, s = math.cos(tilt), math.sin(tilt)
    return [(cx + c * a - s * b, cy + s * a + c * b) for a, b in zip(x, y)]


def _shade(c: Sequence[int], f: float) -> RGB:
    return tuple(int(max(0, min(255, round(v * f)))) for v in c)  # type: ignore[return-value]


def _mix(a: Sequence[int], b: Sequence[int], t: float) -> RGB:
    return tuple(int(round(x * (1 - t) + y * t)) for x, y in zip(a, b))  # type: ignore[return-value]


@lru_cache(maxsize=8)
def _unit_grid(n: int) -> tuple[np.ndarray, np.ndarray]:
    """Broadcastable (n, 1) y and (1, n) x pixel coordinates divided by ``n`` (cheaper
    than full grids; every image needs them)."""
    t = np.arange(n, dtype=np.float32) / n
    t.flags.writeable = False
    return t[:, None], t[None, :]


def _draw_background(rng: np.random.Generator, S: int, n_shapes: int) -> Image.Image:
    """Random two-colour gradient, optional texture, and random clutter shapes."""
    c0 = rng.integers(0, 256, size=3).astype(np.float32)
    c1 = rng.integers(0, 256, size=3).astype(np.float32)
    th = rng.uniform(0, 2 * math.pi)
    # The smooth base layer is computed at half resolution and upsampled: it costs a
    # quarter of the time and nothing visible is lost.
    n = S // 2
    yy, xx = _unit_grid(n)
    g = (xx - 0.5) * math.cos(th) + (yy - 0.5) * math.sin(th) + 0.5
    arr = c0 + np.clip(g, 0, 1)[..., None] * (c1 - c0)
    kind = rng.integers(3)
    if kind == 1:  # stripes
        f = rng.uniform(4, 16)
        ph = rng.uniform(0, 2 * math.pi)
        a2 = rng.uniform(0, math.pi)
        stripes = np.sin(2 * math.pi * f * (xx * math.cos(a2) + yy * math.sin(a2)) + ph)
        arr = arr + (rng.uniform(15, 50) * stripes)[..., None]
    elif kind == 2:  # blotchy low-frequency texture
        small = rng.normal(0, 1, size=(6, 6, 3)).astype(np.float32)
        tex = np.asarray(Image.fromarray(((small * 30 + 128).clip(0, 255)).astype(np.uint8))
                         .resize((n, n), Image.BICUBIC), dtype=np.float32) - 128
        arr = arr + tex
    img = Image.fromarray(np.clip(arr, 0, 255).astype(np.uint8), "RGB").resize((S, S), Image.BILINEAR)
    draw = ImageDraw.Draw(img, "RGBA")
    for _ in range(n_shapes):
        col = tuple(int(v) for v in rng.integers(0, 256, size=3)) + (int(rng.integers(120, 256)),)
        x0, y0 = rng.uniform(-0.2, 1.0, size=2) * S
        w, h = rng.uniform(0.08, 0.5, size=2) * S
        shape = rng.integers(4)
        if shape == 0:
            draw.ellipse([x0, y0, x0 + w, y0 + h], fill=col)
        elif shape == 1:
            draw.rectangle([x0, y0, x0 + w, y0 + h], fill=col)
        elif shape == 2:
            pts = [tuple(p) for p in (rng.uniform(-0.1, 1.1, size=(3, 2)) * S)]
            draw.polygon(pts, fill=col)
        else:
            draw.line([x0, y0, x0 + w * rng.choice([-1, 1]), y0 + h], fill=col,
                      width=int(rng.integers(1, max(2, S // 20))))
    return img


def _draw_face_layer(p: IdentityParams, v: Variation, S: int,
                     rng: np.random.Generator) -> Image.Image:
    """Draw the person (shoulders, head, hair, features, accessories) in a canonical
    frontal frame on a transparent layer; pose is applied afterwards by an affine warp."""
    layer = Image.new("RGBA", (S, S), (0, 0, 0, 0))
    dr = ImageDraw.Draw(layer, "RGBA")
    cx, cy = 0.5 * S, 0.5 * S
    squeeze = 1.0 - 0.12 * abs(v.yaw)       # a turned head looks narrower
    a = p.face_width * S * squeeze          # face half-width (px)
    b = p.face_width * S * p.face_aspect    # face half-height (px)
    dx = 0.16 * a * v.yaw                   # inner features slide towards the turn
    skin, hair = p.skin, p.hair
    skin_dark = _shade(skin, 0.88)

    # Shoulders (clothing changes from photo to photo) and neck.
    sh_y = cy + b * 0.95
    dr.ellipse([cx - a * 2.3, sh_y, cx + a * 2.3, sh_y + b * 1.6], fill=v.clothing + (255,))
    dr.rectangle([cx - a * 0.5, cy + b * 0.4, cx + a * 0.5, sh_y + b * 0.25], fill=skin_dark + (255,))

    # Hair that hangs behind the head.
    hv = 1.0 + p.hair_volume
    if p.hair_style == "long":
        dr.rounded_rectangle([cx - a * hv * 1.05, cy - b * hv, cx + a * hv * 1.05, cy + b * 1.15],
                             radius=a * 0.8, fill=hair + (255,))
    elif p.hair_style == "bun":
        r = a * 0.42
        dr.ellipse([cx - r, cy - b * hv - r * 1.3, cx + r, cy - b * hv + r * 0.7], fill=hair + (255,))

    # Ears: the one on the far side of the turn shrinks.
    ey = cy + p.eye_height * b
    for side in (-1, 1):
        er = p.ear_size * a * (1.0 - 0.5 * max(0.0, side * -v.yaw))
        ex = cx + side * a * 0.98
        dr.ellipse([ex - er * 0.6, ey - er * 0.3, ex + er * 0.6, ey + er * 1.5], fill=skin_dark + (255,))

    # Face outline: an ellipse whose lower half narrows towards the chin (jaw width).
    ts = np.linspace(0, 2 * math.pi, 64, endpoint=False)
    sn = np.sin(ts)
    w = np.where(sn > 0, 1 - (1 - p.jaw) * sn ** 2, 1.0)
    face = [(cx + a * math.cos(t) * wi, cy + b * s) for t, s, wi in zip(ts, sn, w)]
    dr.polygon(face, fill=skin + (255,))

    # Beard (drawn before the mouth so the lips stay visible).
    my = cy + p.mouth_y * b
    mw = p.mouth_width * a
    if p.beard in ("full", "stubble"):
        alpha = 255 if p.beard == "full" else 110
        dr.polygon(_beard_poly(face, sn, cx + dx, my, mw, b), fill=hair + (alpha,))
    if p.beard == "goatee":
        gy0 = my + p.lip_thickness * b + b * 0.05
        gy1 = min(cy + b * 0.97, gy0 + b * 0.28)
        dr.ellipse([cx + dx - mw * 0.45, gy0, cx + dx + mw * 0.45, gy1], fill=hair + (255,))
    if p.beard in ("moustache", "goatee", "full"):
        dr.polygon([(cx + dx - mw * 1.1, my + b * 0.02), (cx + dx - mw * 0.7, my - b * 0.1),
                    (cx + dx + mw * 0.7, my - b * 0.1), (cx + dx + mw * 1.1, my + b * 0.02),
                    (cx + dx, my - b * 0.04)], fill=hair + (255,))

    # Hair on top of the head.
    _draw_hair(dr, p, cx, cy, a, b, hv, v.yaw)

    # Eyes and brows.
    for side in (-1, 1):
        far = max(0.0, side * -v.yaw)        # 0 near side, up to 1 far side
        ex = cx + dx + side * p.eye_spacing * a * (1 - 0.25 * far)
        ew = p.eye_size * a * (1 - 0.3 * far)
        eh = ew * 0.55 * v.eye_open
        tilt = -side * p.eye_tilt
        eye = _ellipse_pts(ex, ey, ew, max(eh, 0.6), 0, 2 * math.pi, 20, tilt)
        dr.polygon(eye, fill=(240, 238, 232, 255))
        ir = ew * 0.48
        ix = ex + v.gaze * ew * 0.3
        ih = min(ir, eh * 1.05)
        dr.ellipse([ix - ir, ey - ih, ix + ir, ey + ih], fill=p.eye_colour + (255,))
        pr = ir * 0.45
        dr.ellipse([ix - pr, ey - min(pr, ih), ix + pr, ey + min(pr, ih)], fill=(10, 10, 10, 255))
        # Upper lid line, and the skin fold for half-closed eyes.
        lid = _ellipse_pts(ex, ey, ew * 1.05, max(eh, 0.6), math.pi, 2 * math.pi, 12, tilt)
        dr.line(lid, fill=_shade(skin, 0.45) + (255,), width=max(1, int(S / 90)))
        # Brow: a thick quad; positive angle pulls the inner end down (stern look).
        by = ey - p.brow_gap * b - eh * 0.5 + v.brow_raise * b
        bw = ew * 1.35
        inner = (ex - side * bw, by + p.brow_angle * bw * 0.5)
        outer = (ex + side * bw, by - p.brow_angle * bw * 0.5 + math.sin(-side * tilt) * bw * 0.3)
        t = p.brow_thickness * a
        brow_col = _mix(hair, (20, 15, 10), 0.35) if p.hair_style != "bald" or p.hair[0] < 200 else _shade(skin, 0.5)
        dr.polygon([(inner[0], inner[1] - t * 0.5), (ex, by - t * 0.75), (outer[0], outer[1] - t * 0.3),
                    (outer[0], outer[1] + t * 0.3), (ex, by + t * 0.4), (inner[0], inner[1] + t * 0.5)],
                   fill=brow_col + (255,))

    # Nose: bridge shadow, tip and nostrils (the tip protrudes, so it slides further on yaw).
    ny = ey + p.nose_length * b
    nx = cx + dx * 1.5
    nw = p.nose_width * a
    dr.polygon([(cx + dx - nw * 0.15, ey + b * 0.05), (nx - nw * 0.35, ny - b * 0.04),
                (nx + nw * 0.35, ny - b * 0.04), (cx + dx + nw * 0.15, ey + b * 0.05)],
               fill=_shade(skin, 0.9) + (255,))
    dr.ellipse([nx - nw * 0.45, ny - b * 0.07, nx + nw * 0.45, ny + b * 0.02], fill=_shade(skin, 0.93) + (255,))
    for side in (-1, 1):
        ox = nx + side * nw * 0.55
        dr.ellipse([ox - nw * 0.28, ny - b * 0.03, ox + nw * 0.28, ny + b * 0.03], fill=_shade(skin, 0.55) + (255,))

    # Mouth: lips with a smile curve; an open mouth shows a dark cavity and teeth.
    mx = cx + dx
    lt = p.lip_thickness * b
    smile = v.smile * b * 0.05
    op = v.mouth_open * b * 0.09
    upper = [(mx - mw, my - smile), (mx - mw * 0.45, my - lt), (mx, my - lt * 0.7),
             (mx + mw * 0.45, my - lt), (mx + mw, my - smile), (mx, my + lt * 0.15)]
    lower = [(mx - mw, my - smile), (mx, my + op + lt * 0.2), (mx + mw, my - smile),
             (mx + mw * 0.5, my + op + lt * 1.0), (mx, my + op + lt * 1.2), (mx - mw * 0.5, my + op + lt * 1.0)]
    if op > 0:
        dr.polygon([(mx - mw * 0.9, my - smile * 0.9), (mx, my + lt * 0.1), (mx + mw * 0.9, my - smile * 0.9),
                    (mx, my + op + lt * 0.3)], fill=(50, 15, 20, 255))
        dr.rectangle([mx - mw * 0.5, my, mx + mw * 0.5, my + min(op, lt) * 0.6], fill=(235, 232, 220, 255))
    dr.polygon(lower, fill=p.lip_colour + (255,))
    dr.polygon(upper, fill=_shade(p.lip_colour, 0.88) + (255,))

    if p.mole is not None:
        mxp, myp, mr = p.mole
        ox, oy, r = cx + dx + mxp * a, cy + myp * b, mr * a
        dr.ellipse([ox - r, oy - r, ox + r, oy + r], fill=(60, 35, 25, 255))

    # Accessories that move with the head.
    if v.glasses != "none":
        gc = v.glasses_colour + (255,)
        gw = max(1, int(S / 64))
        lens_fill = (20, 20, 25, 225) if v.glasses == "sun" else None
        centres = []
        for side in (-1, 1):
            far = max(0.0, side * -v.yaw)
            ex = cx + dx + side * p.eye_spacing * a * (1 - 0.25 * far)
            r = p.eye_size * a * 1.6 * (1 - 0.3 * far)
            box = [ex - r, ey - r * 0.8, ex + r, ey + r * 0.8]
            if v.glasses == "rect":
                dr.rectangle(box, outline=gc, width=gw, fill=lens_fill)
            else:
                dr.ellipse(box, outline=gc, width=gw, fill=lens_fill)
            centres.append((ex, r))
        (lx, lr), (rx, rr) = centres
        dr.line([(lx + lr, ey), (rx - rr, ey)], fill=gc, width=gw)
        dr.line([(lx - lr, ey - lr * 0.3), (cx - a * 0.98, ey - lr * 0.4)], fill=gc, width=gw)
        dr.line([(rx + rr, ey - rr * 0.3), (cx + a * 0.98, ey - rr * 0.4)], fill=gc, width=gw)
    if v.hat:
        hc = tuple(int(c) for c in rng.integers(0, 256, size=3)) + (255,)
        top = cy - b * hv * 1.05
        brim = cy - b * rng.uniform(0.35, 0.6)
        dr.chord([cx - a * 1.15, top, cx + a * 1.15, brim + (brim - top)], 180, 360, fill=hc)
        dr.rectangle([cx - a * 1.45 + dx, brim - b * 0.06, cx + a * 1.45 + dx, brim + b * 0.03], fill=_shade(hc[:3], 0.8) + (255,))
    return layer


def _beard_poly(face: list[tuple[float, float]], sn: np.ndarray, mx: float, my: float,
                mw: float, b: float) -> list[tuple[float, float]]:
    """Full beard: the lower face outline below the mouth corners' level, closed along a
    line across the cheeks just above the mouth."""
    lower = [pt for pt, s in zip(face, sn) if pt[1] > my - b * 0.12 and s > 0]
    # ``face`` runs clockwise from the right (t=0), so ``lower`` goes right -> chin -> left.
    return lower + [(mx - mw * 1.25, my - b * 0.12), (mx, my - b * 0.2), (mx + mw * 1.25, my - b * 0.12)]


def _draw_hair(dr: ImageDraw.ImageDraw, p: IdentityParams, cx: float, cy: float,
               a: float, b: float, hv: float, yaw: float) -> None:
    """Hair on the skull: a cap above the hairline whose edge depends on the style."""
    col = p.hair + (255,)
    style = p.hair_style
    hy = cy - p.hairline * b               # hairline height
    if style == "bald":
        # A horseshoe of hair over the ears, nothing on top.
        for side in (-1, 1):
            x0 = cx + side * a * 0.94
            dr.ellipse([x0 - a * 0.09, cy - b * 0.4, x0 + a * 0.09, cy - b * 0.05], fill=p.hair + (200,))
        return
    if style == "curly":
        # Curls: overlapping discs along the top of the head.
        for t in np.linspace(math.pi * 0.92, math.pi * 2.08, 13):
            r = a * (0.28 + 0.5 * p.hair_volume)
            x = cx + a * 1.0 * math.cos(t)
            y = cy + b * 0.92 * math.sin(t)
            dr.ellipse([x - r, y - r, x + r, y + r], fill=col)
        dr.chord([cx - a * hv, cy - b * hv, cx + a * hv, hy + (hy - (cy - b * hv)) * 0.3], 180, 360, fill=col)
        return
    alpha = 150 if style == "buzz" else 255
    vol = 1.0 if style == "buzz" else hv
    # Outer contour: upper half of an enlarged head ellipse, down to the temples.
    outer = _ellipse_pts(cx, cy, a * vol * 1.02, b * vol, math.pi * 0.98, math.pi * 2.02, 26)
    if style == "fringe":
        edge_y = cy - b * 0.2               # bangs down to the brows
        inner = [(cx + a * 1.0, cy - b * 0.15), (cx + a * 0.6, edge_y), (cx - a * 0.6, edge_y),
                 (cx - a * 1.0, cy - b * 0.15)]
    elif style == "side_part":
        part = 1 if p.eye_tilt >= 0 else -1  # a stable, identity-dependent side
        inner = [(cx + a * 1.0, cy - b * 0.2), (cx + part * a * 0.55, hy - b * 0.12),
                 (cx - part * a * 0.1, hy + b * 0.05), (cx - part * a * 0.75, hy + b * 0.22),
                 (cx - a * 1.0, cy - b * 0.2)]
    elif style == "long":
        # Centre parting with strands framing the face down to the jaw.
        inner = [(cx + a * 1.02, cy + b * 0.55), (cx + a * 0.82, cy - b * 0.1), (cx + a * 0.45, hy),
                 (cx, hy - b * 0.08), (cx - a * 0.45, hy), (cx - a * 0.82, cy - b * 0.1),
                 (cx - a * 1.02, cy + b * 0.55)]
    else:  # short, buzz, bun: an arched hairline with sideburns
        inner = [(cx + a * 0.98, cy - b * 0.05), (cx + a * 0.85, hy + b * 0.05), (cx + a * 0.4, hy - b * 0.03),
                 (cx, hy - b * 0.05), (cx - a * 0.4, hy - b * 0.03), (cx - a * 0.85, hy + b * 0.05),
                 (cx - a * 0.98, cy - b * 0.05)]
    dr.polygon(outer + inner, fill=p.hair + (alpha,))


def _draw_hand(dr: ImageDraw.ImageDraw, rng: np.random.Generator, skin: RGB, S: int) -> None:
    """A hand (palm + fingers) raised in front of the lower or side part of the face."""
    cx = S * rng.uniform(0.3, 0.7)
    cy = S * rng.uniform(0.6, 0.85)
    r = S * rng.uniform(0.1, 0.15)
    ang = rng.uniform(-0.6, 0.6)
    col = _shade(skin, rng.uniform(0.85, 1.05)) + (255,)
    dr.ellipse([cx - r, cy - r * 0.9, cx + r, cy + r * 1.1], fill=col)
    for k in range(4):
        fx = cx + (k - 1.5) * r * 0.5
        L = r * rng.uniform(0.9, 1.4)
        tipx, tipy = fx + math.sin(ang) * L, cy - r * 0.6 - math.cos(ang) * L
        dr.line([(fx, cy - r * 0.5), (tipx, tipy)], fill=col, width=max(2, int(r * 0.42)))
        dr.ellipse([tipx - r * 0.2, tipy - r * 0.2, tipx + r * 0.2, tipy + r * 0.2], fill=col)


def render_face(params: IdentityParams, variation: Variation, size: int = 64) -> Image.Image:
    """Render one face photo of ``params`` under ``variation`` as a ``size`` x ``size``
    RGB image.  Drawing happens at a higher resolution (2x, at least 128) and is
    downsampled with antialiasing."""
    v = variation
    S = max(128, 2 * size)
    rng = np.random.default_rng(v.detail_seed)
    img = _draw_background(rng, S, v.clutter)
    layer = _draw_face_layer(params, v, S, rng)

    # Pose: rotation + scale about the face centre, then shift.  PIL's AFFINE maps output
    # pixels back to input pixels, so pass the inverse transform.
    th = math.radians(v.angle)
    c, s = math.cos(th) / v.scale, math.sin(th) / v.scale
    cx = cy = 0.5 * S
    tx, ty = v.shift[0] * S, v.shift[1] * S
    ox, oy = cx + tx, cy + ty
    coeffs = (c, s, cx - c * ox - s * oy, -s, c, cy + s * ox - c * oy)
    # Bilinear is enough: the result is downsampled 2x with a Lanczos filter anyway.
    layer = layer.transform((S, S), Image.AFFINE, coeffs, resample=Image.BILINEAR)
    img = img.convert("RGBA")
    img.alpha_composite(layer)
    img = img.convert("RGB")

    if v.hand or v.bar:
        dr = ImageDraw.Draw(img, "RGBA")
        if v.hand:
            _draw_hand(dr, rng, params.skin, S)
        if v.bar:
            col = tuple(int(x) for x in rng.integers(0, 256, size=3)) + (255,)
            y = S * rng.uniform(0.2, 0.85)
            h = S * rng.uniform(0.05, 0.14)
            ang = rng.uniform(-0.5, 0.5)
            dx = S * math.cos(ang)
            dy = S * math.sin(ang)
            x0 = S * rng.uniform(-0.3, 0.5)
            dr.polygon([(x0, y), (x0 + dx, y + dy), (x0 + dx, y + dy + h), (x0, y + h)], fill=col)

    img = img.resize((size, size), Image.LANCZOS)
    if v.blur > 0.05:
        img = img.filter(ImageFilter.GaussianBlur(v.blur * size / 64))

    # Illumination: a linear gradient along the light direction, centred on the face, global
    # gain, per-channel colour cast and contrast; then sensor noise.
    arr = np.asarray(img, dtype=np.float32)
    yy, xx = _unit_grid(size)
    u = ((xx - 0.5 - v.shift[0]) * math.cos(v.light_angle)
         + (yy - 0.5 - v.shift[1]) * math.sin(v.light_angle)) * 2.0
    shading = np.clip(1.0 + v.light_strength * u, 0.15, 2.0)[..., None]
    arr = arr * shading * v.brightness * np.asarray(v.cast, dtype=np.float32)
    mean = arr.mean()
    arr = (arr - mean) * v.contrast + mean
    if v.noise > 0:
        arr = arr + rng.normal(0.0, v.noise, size=arr.shape).astype(np.float32)
    return Image.fromarray(np.clip(np.round(arr), 0, 255).astype(np.uint8), "RGB")


# ---------------------------------------------------------------------------------------
# Dataset generation
# ---------------------------------------------------------------------------------------

def _identity_rng(seed: int, stream: int, index: int) -> np.random.Generator:
    return np.random.default_rng(np.random.SeedSequence([seed, stream, index]))


def _variation_rng(seed: int, stream: int, identity: int, image: int) -> np.random.Generator:
    return np.random.default_rng(np.random.SeedSequence([seed, _STREAM_VARIATION, stream, identity, image]))


@dataclass(frozen=True)
class _Job:
    """One identity to render (picklable, for the process pool)."""

    root: str
    seed: int
    stream: int
    index: int
    n_train: int
    n_test: int
    size: int
    difficulty: float


def _render_identity(job: _Job) -> int:
    """Worker: render all images of one identity and write them as PNGs; returns a count."""
    params = sample_identity(_identity_rng(job.seed, job.stream, job.index))
    main = job.stream == _STREAM_MAIN
    name = f"{'id' if main else 'xid'}{job.index:04d}"
    train_dir, test_dir = ("train", "test") if main else ("cross_train", "cross_test")
    n_total = job.n_train + job.n_test
    for split, lo, hi in ((train_dir, 0, job.n_train), (test_dir, job.n_train, n_total)):
        out = Path(job.root) / split / name
        out.mkdir(parents=True, exist_ok=True)
        for k in range(lo, hi):
            var = sample_variation(_variation_rng(job.seed, job.stream, job.index, k), job.difficulty)
            # Level 1: the sensor noise makes PNGs nearly incompressible, so spend no time trying.
            render_face(params, var, job.size).save(out / f"{name}_{k:03d}.png", compress_level=1)
    return n_total


def _read_meta(root: Path) -> dict | None:
    try:
        return json.loads((root / "synthface.json").read_text())
    except (OSError, ValueError):
        return None


def synthface_meta(data_dir: str | Path) -> dict | None:
    """The generation parameters of ``<data_dir>/synthface`` (its ``synthface.json``:
    ``num_identities``, ``train_per_identity``, ``test_per_identity``, ``cross_identities``,
    ``seed``, ...), or None when there is no readable SynthFace there."""
    meta = _read_meta(Path(data_dir) / "synthface")
    return meta if isinstance(meta, dict) and meta.get("generator") == "synthface" else None


def describe_synthface(meta: dict) -> str:
    """``"20 identities x 10 training images"``: the size a user chose with the CLI flags."""
    return (f"{meta['num_identities']} identities x {meta['train_per_identity']} training "
            f"images")


def ensure_synthface(
    data_dir: str | Path,
    seed: int = 0,
    num_identities: int = DEFAULT_NUM_IDENTITIES,
    train_per_identity: int = DEFAULT_TRAIN_PER_IDENTITY,
    test_per_identity: int = DEFAULT_TEST_PER_IDENTITY,
    cross_identities: int = DEFAULT_CROSS_IDENTITIES,
    image_size: int = 64,
    progress: bool = True,
    difficulty: float = 1.0,
    workers: int | None = None,
) -> Path:
    """Generate SynthFace into ``<data_dir>/synthface`` unless it is already there.

    Writes ``train``/``test`` (identities ``id0000``...) and the disjoint
    ``cross_train``/``cross_test`` (identities ``xid0000``...) folders and a
    ``synthface.json`` with the generation parameters.  If the folder exists with the
    same parameters nothing happens; if the parameters differ it is regenerated (the
    command line goes through :func:`use_synthface`, which never does that unasked).  The
    data is written to a temporary folder beside it and renamed into place, so a crash
    never leaves a half-written dataset.  ``workers`` (default: up to 2) only affects
    speed, never the output.  Returns the dataset root.
    """
    data_dir = Path(data_dir)
    root = data_dir / "synthface"
    meta = {
        "generator": "synthface",
        "version": GENERATOR_VERSION,
        "seed": int(seed),
        "num_identities": int(num_identities),
        "train_per_identity": int(train_per_identity),
        "test_per_identity": int(test_per_identity),
        "cross_identities": int(cross_identities),
        "image_size": int(image_size),
        "difficulty": float(difficulty),
    }
    if _read_meta(root) == meta:
        return root
    if root.exists() and _read_meta(root) is None:
        # Not ours (or not a SynthFace folder): refuse rather than delete someone's data.
        raise FileExistsError(f"{root} exists but has no readable synthface.json; "
                              "remove it or choose another data_dir")
    if min(seed, num_identities, train_per_identity, test_per_identity, cross_identities) < 0 or image_size < 8:
        raise ValueError("seed and counts must be >= 0 and image_size >= 8")

    data_dir.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".synthface.tmp-", dir=data_dir))
    try:
        jobs = [_Job(str(tmp), seed, stream, i, train_per_identity, test_per_identity, image_size, difficulty)
                for stream, n in ((_STREAM_MAIN, num_identities), (_STREAM_CROSS, cross_identities))
                for i in range(n)]
        for split in ("train", "test", "cross_train", "cross_test"):
            (tmp / split).mkdir()
        total = len(jobs) * (train_per_identity + test_per_identity)
        n_workers = workers if workers is not None else min(2, os.cpu_count() or 1)
        bar = _progress_bar(total, progress)
        try:
            # A pool only pays off for bigger jobs, unless asked for explicitly.
            if n_workers <= 1 or (workers is None and total < 200):
                for job in jobs:
                    bar.update(_render_identity(job))
            else:
                # fork keeps start-up cheap and works for callers without a __main__ guard;
                # workers touch only numpy and PIL.
                methods = multiprocessing.get_all_start_methods()
                ctx = multiprocessing.get_context("fork" if "fork" in methods else None)
                with ProcessPoolExecutor(max_workers=n_workers, mp_context=ctx) as pool:
                    futures = [pool.submit(_render_identity, job) for job in jobs]
                    for fut in as_completed(futures):
                        bar.update(fut.result())
        finally:
            bar.close()
        (tmp / "synthface.json").write_text(json.dumps(meta, indent=2, sort_keys=True) + "\n")
        _swap_into_place(tmp, root, meta)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return root


class SynthfaceMismatch(ValueError):
    """The SynthFace on disk is not the one asked for; the message names both sizes."""


def cross_identities_for(num_identities: int | None) -> int:
    """Size of the disjoint ``cross_*`` set: 60 by default, else half the main set (>= 2)."""
    if num_identities is None:
        return DEFAULT_CROSS_IDENTITIES
    return max(2, num_identities // 2)


def use_synthface(data_dir: str | Path, num_identities: int | None = None,
                  train_per_identity: int | None = None, regenerate: bool = False,
                  progress: bool = True) -> tuple[Path, str]:
    """The command line's policy: generate SynthFace only when it is absent (or when asked).

    * No dataset yet: generate it at the size asked for (defaults for what is not given).
    * A dataset exists: use it as it is. A size given explicitly that differs from it raises
      :class:`SynthfaceMismatch` naming both sizes, unless ``regenerate`` is set, in which
      case it is rebuilt at the size asked for. Nothing is ever regenerated silently, so
      evaluating a model never changes the data it was trained on.

    Returns ``(root, what happened)`` for the log.
    """
    root = Path(data_dir) / "synthface"
    meta = synthface_meta(data_dir)
    asked = {"num_identities": num_identities, "train_per_identity": train_per_identity}
    if root.exists() and meta is None:
        raise SynthfaceMismatch(f"{root} exists but holds no readable synthface.json; move it "
                                f"away or choose another --data-dir")
    if meta is not None and not regenerate:
        differs = [key for key, value in asked.items()
                   if value is not None and value != meta.get(key)]
        if differs:
            wanted = {**meta, **{k: v for k, v in asked.items() if v is not None}}
            raise SynthfaceMismatch(
                f"the --synthface-* flags ask for {describe_synthface(wanted)}, but {root} "
                f"holds {describe_synthface(meta)}; leave the flags out to use it, or add "
                f"--regenerate-synthface to replace it")
        return root, f"synthface: using {root} ({describe_synthface(meta)})"
    size = {"num_identities": num_identities or DEFAULT_NUM_IDENTITIES,
            "train_per_identity": train_per_identity or DEFAULT_TRAIN_PER_IDENTITY}
    same = meta is not None and all(meta.get(k) == v for k, v in size.items()) and \
        meta.get("cross_identities") == cross_identities_for(num_identities)
    verb = "kept (already that size)" if same else "regenerated" if meta else "generated"
    ensure_synthface(data_dir, cross_identities=cross_identities_for(num_identities),
                     progress=progress, **size)
    return root, f"synthface: {verb} {root} ({describe_synthface(size)})"


def _swap_into_place(tmp: Path, root: Path, meta: dict) -> None:
    """Rename the finished temp folder to ``root``, moving an outdated one aside first."""
    old = None
    if root.exists():
        if _read_meta(root) == meta:  # another process finished the same job first
            return
        old = root.with_name(f".synthface.old-{uuid.uuid4().hex[:8]}")
        os.replace(root, old)
    try:
        os.replace(tmp, root)
    except OSError:
        # Lost a race with a concurrent generator; keep theirs if it matches.
        if _read_meta(root) != meta:
            raise
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


class _NullBar:
    def update(self, n: int = 1) -> None:
        pass

    def close(self) -> None:
        pass


def _progress_bar(total: int, enabled: bool):
    if not enabled:
        return _NullBar()
    try:
        from tqdm import tqdm
    except ImportError:  # progress is cosmetic; never fail because tqdm is missing
        return _NullBar()
    return tqdm(total=total, desc="synthface", unit="img")
