"""The synthetic dataset: an MVTec-layout tree of PNG images and exact masks, from a seed.

Categories:

- textures ``brick``, ``grass``, ``gravel``: random crops of the real photographs scikit-image
  ships offline, flipped, tinted and lightly jittered; defects ``scratch``, ``hole``, ``stain``,
  ``color`` (a region recoloured) and ``contamination`` (a patch of another texture);
- objects ``nut`` (a hex nut on a dark plate) and ``screw`` (a threaded screw on a light plate),
  drawn procedurally with anti-aliased edges and small pose/lighting changes; defects
  ``scratch``, ``hole``/``thread`` (damaged thread), ``missing`` (part cut away), ``extra`` (a
  blob of material stuck on) and ``color``.

Every defect changes exactly the pixels of its mask and nothing else, with strong contrast, over
about 1.5-15 % of the image. Each image has its own random stream derived from
(seed, category, split, index), so changing one count never changes the other images, and the
same seed gives byte-identical PNGs (fixed PIL settings, no timestamps). The tree is written in a
temporary sibling folder and renamed into place, so an interrupted run leaves nothing half-written.
"""

from __future__ import annotations

import functools
import hashlib
import importlib.resources
import io
import json
import math
import os
import shutil
import tempfile
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from datasets.errors import DataError

GENERATOR = "fuad-bench-synthetic-v1"
PARAMS_FILE = "synthetic.json"
TEXTURE_TINTS = {  # RGB gains applied to the grayscale photographs
    "brick": (1.0, 0.62, 0.50),
    "grass": (0.62, 0.95, 0.45),
    "gravel": (0.92, 0.88, 0.80),
}
TEXTURES = tuple(TEXTURE_TINTS)
OBJECTS = ("nut", "screw")
SYNTHETIC_CATEGORIES = TEXTURES + OBJECTS
DEFECTS: dict[str, tuple[str, ...]] = {
    **{t: ("scratch", "hole", "stain", "color", "contamination") for t in TEXTURES},
    "nut": ("scratch", "hole", "missing", "extra", "color"),
    "screw": ("scratch", "thread", "missing", "extra", "color"),
}
# Defect area as a fraction of the image: textures have room for larger ones than objects.
AREA_BOUNDS = {"texture": (0.025, 0.15), "object": (0.015, 0.15)}
# Recolouring tints; the one farthest from the original region is used.
_TINTS = np.array([(1.25, 0.55, 0.15), (0.30, 0.55, 1.30), (0.55, 1.20, 0.30), (1.20, 0.30, 0.85)])
_STAINS = np.array([(70, 45, 20), (25, 25, 30), (215, 195, 70), (60, 80, 170)], dtype=np.float64)


@dataclass
class Base:
    """A defect-free image and what defects need to know about it."""

    image: np.ndarray  # float64 (H, W, 3), 0..255
    alpha: np.ndarray  # float64 (H, W): object coverage (all ones for textures)
    background: np.ndarray | None  # float64 (H, W, 3): the plate under an object
    kind: str  # "texture" or "object"
    center: tuple[float, float]
    scale: float  # object radius / half-length in pixels
    angle: float = 0.0


def _category_id(name: str) -> int:
    return int(hashlib.sha256(name.encode()).hexdigest()[:8], 16)


def _rng(seed: int, category: str, split: int, index: int) -> np.random.Generator:
    return np.random.default_rng([int(seed), _category_id(category), split, index])


def _grid(size: int) -> tuple[np.ndarray, np.ndarray]:
    """Pixel-centre coordinates (x, y) in pixels."""
    c = np.arange(size, dtype=np.float64) + 0.5
    return np.meshgrid(c, c)


def _coverage(signed_distance: np.ndarray) -> np.ndarray:
    """Anti-aliased coverage of a shape from its signed distance in pixels (negative inside)."""
    return np.clip(0.5 - signed_distance, 0.0, 1.0)


# --------------------------------------------------------------------------------------------
# Normal images


def _texture_file(name: str) -> np.ndarray:
    """The grayscale photograph bundled with scikit-image (read directly: its loader is slow)."""
    try:
        with Image.open(importlib.resources.files("skimage.data") / f"{name}.png") as img:
            return np.asarray(img.convert("L"))
    except (FileNotFoundError, ModuleNotFoundError, OSError):
        from skimage import data as skdata

        return np.asarray(getattr(skdata, name)())


@functools.cache
def _texture_source(name: str) -> np.ndarray:
    """The scikit-image photograph, contrast-normalised to 0.12..0.95."""
    src = _texture_file(name).astype(np.float64)
    lo, hi = np.percentile(src, [1, 99])
    return np.clip((src - lo) / (hi - lo), 0, 1) * 0.83 + 0.12


def _texture_gray(name: str, rng: np.random.Generator, size: int) -> np.ndarray:
    src = _texture_source(name)
    win = src.shape[0] // 2
    y, x = (int(v) for v in rng.integers(0, src.shape[0] - win + 1, size=2))
    patch = src[y : y + win, x : x + win]
    if rng.random() < 0.5:
        patch = patch[:, ::-1]
    if name != "brick":  # bricks keep their horizontal courses
        if rng.random() < 0.5:
            patch = patch[::-1]
        if rng.random() < 0.5:
            patch = patch.T
    img = Image.fromarray(np.ascontiguousarray(patch * 255).round().astype(np.uint8))
    return np.asarray(img.resize((size, size), Image.BILINEAR), dtype=np.float64) / 255.0


def _tinted(gray: np.ndarray, name: str, gain: float = 1.0) -> np.ndarray:
    return gray[..., None] * np.asarray(TEXTURE_TINTS[name]) * 255.0 * gain


def render_texture(name: str, rng: np.random.Generator, size: int) -> Base:
    gray = _texture_gray(name, rng, size)
    image = _tinted(gray, name, 1.0 + rng.normal(0, 0.03)) + rng.normal(0, 2.0, (size, size, 3))
    ones = np.ones((size, size))
    return Base(image, ones, None, "texture", (size / 2, size / 2), size / 2)


def _plate(rng: np.random.Generator, size: int, level: float, tint) -> np.ndarray:
    """A plain background with a gentle lighting gradient and sensor noise."""
    x, y = _grid(size)
    direction = rng.uniform(0, 2 * math.pi)
    ramp = ((x - size / 2) * math.cos(direction) + (y - size / 2) * math.sin(direction)) / size
    value = level * (1.0 + 0.06 * ramp + rng.normal(0, 0.02))
    return value[..., None] * np.asarray(tint) + rng.normal(0, 1.5, (size, size, 3))


def render_nut(rng: np.random.Generator, size: int) -> Base:
    """A hex nut with a threaded bore, chamfer ring and directional lighting on a dark plate."""
    cx, cy = size / 2 + rng.uniform(-0.04, 0.04, 2) * size
    radius = 0.34 * size * (1 + rng.normal(0, 0.015))
    theta = rng.uniform(0, math.pi / 3)
    bore = 0.38 * radius

    x, y = _grid(size)
    dx, dy = x - cx, y - cy
    dist = np.hypot(dx, dy)
    apothem = radius * math.cos(math.pi / 6)
    proj = np.max(
        [
            np.abs(dx * math.cos(theta + k * math.pi / 3) + dy * math.sin(theta + k * math.pi / 3))
            for k in range(3)
        ],
        axis=0,
    )
    alpha = _coverage(np.maximum(proj - apothem, bore - dist))

    light = rng.uniform(0, 2 * math.pi)
    shade = 165 + 38 * (dx * math.cos(light) + dy * math.sin(light)) / radius
    shade = shade - 28 * (dist > 0.86 * apothem)  # chamfer
    shade = shade + 14 * np.sin(dist * 2 * math.pi / (0.045 * size)) * (
        dist < 1.35 * bore
    )  # thread
    metal = shade[..., None] * np.array([1.0, 0.97, 0.90]) + rng.normal(0, 2.0, (size, size, 3))
    plate = _plate(rng, size, 52.0, (0.95, 1.0, 1.1))
    image = plate * (1 - alpha[..., None]) + metal * alpha[..., None]
    return Base(image, alpha, plate, "object", (cx, cy), radius, theta)


def _screw_local(size: int, cx: float, cy: float, angle: float):
    """Coordinates along (u, head at negative u) and across (v) the screw's axis."""
    x, y = _grid(size)
    dx, dy = x - cx, y - cy
    return dx * math.cos(angle) + dy * math.sin(angle), -dx * math.sin(angle) + dy * math.cos(angle)


_SCREW = {"half_length": 0.40, "head": 0.14, "shaft": 0.075, "tip": 0.10}  # fractions of size


def _screw_distance(u: np.ndarray, v: np.ndarray, size: int) -> np.ndarray:
    """Signed distance (pixels) to the screw outline: head disc, shaft, tapered tip."""
    half, head, hw, tip = (_SCREW[k] * size for k in ("half_length", "head", "shaft", "tip"))
    head_c = -half + head
    d_head = np.hypot(u - head_c, v) - head
    d_shaft = np.maximum(np.abs(v) - hw, np.maximum(head_c - u, u - (half - tip)))
    slant = tip / math.hypot(tip, hw)
    d_tip = np.maximum(
        (np.abs(v) - hw * (half - u) / tip) * slant, np.maximum(half - tip - u, u - half)
    )
    return np.minimum(d_head, np.minimum(d_shaft, d_tip))


def render_screw(rng: np.random.Generator, size: int) -> Base:
    """A slotted, threaded screw with a specular stripe on a light plate."""
    cx, cy = size / 2 + rng.uniform(-0.04, 0.04, 2) * size
    angle = math.radians(rng.uniform(-12, 12))
    u, v = _screw_local(size, cx, cy, angle)
    alpha = _coverage(_screw_distance(u, v, size))
    half, head, hw = (_SCREW[k] * size for k in ("half_length", "head", "shaft"))
    head_c = -half + head
    on_head = np.hypot(u - head_c, v) <= head
    shade = 95 + 70 * np.exp(-((v / (0.55 * hw)) ** 2))
    pitch = 0.05 * size
    thread = 0.5 + 0.5 * np.sin(2 * math.pi * (u + 0.35 * v) / pitch)
    shade = np.where(
        on_head, 120 + 50 * np.exp(-((np.hypot(u - head_c, v) / head) ** 2)), shade - 40 * thread
    )
    shade = np.where(on_head & (np.abs(v) < 0.018 * size), 45, shade)  # the slot
    metal = shade[..., None] * np.array([0.95, 0.97, 1.0]) + rng.normal(0, 2.0, (size, size, 3))
    plate = _plate(rng, size, 205.0, (1.0, 1.0, 0.96))
    image = plate * (1 - alpha[..., None]) + metal * alpha[..., None]
    return Base(image, alpha, plate, "object", (cx, cy), half, angle)


def render_normal(category: str, rng: np.random.Generator, size: int) -> Base:
    if category in TEXTURES:
        return render_texture(category, rng, size)
    if category == "nut":
        return render_nut(rng, size)
    if category == "screw":
        return render_screw(rng, size)
    raise DataError(
        f"unknown synthetic category {category!r}; known: {', '.join(SYNTHETIC_CATEGORIES)}"
    )


# --------------------------------------------------------------------------------------------
# Defects: each returns the region it changes; _paint_* functions say how.


def _blob(size: int, cx: float, cy: float, r0: float, rng: np.random.Generator) -> np.ndarray:
    """An irregular star-convex blob (radius modulated by a few low harmonics)."""
    x, y = _grid(size)
    dx, dy = x - cx, y - cy
    theta = np.arctan2(dy, dx)
    radius = np.full_like(theta, r0)
    for k in (2, 3, 5):
        radius += r0 * rng.uniform(0, 0.18) * np.cos(k * theta + rng.uniform(0, 2 * math.pi))
    return np.hypot(dx, dy) <= radius


def _stroke(size: int, start, length: float, width: float, rng, angle=None) -> np.ndarray:
    """A curved line (a random walk with smooth turns) of the given width."""
    angle = rng.uniform(0, 2 * math.pi) if angle is None else angle
    points = [tuple(start)]
    steps = 8
    for _ in range(steps):
        angle += rng.normal(0, 0.22)
        x, y = points[-1]
        points.append((x + length / steps * math.cos(angle), y + length / steps * math.sin(angle)))
    canvas = Image.new("L", (size, size), 0)
    ImageDraw.Draw(canvas).line(points, fill=255, width=max(2, int(round(width))), joint="curve")
    return np.asarray(canvas) > 0


def _object_point(base: Base, rng: np.random.Generator, min_alpha: float = 0.99):
    """A random pixel centre fully inside the object."""
    ys, xs = np.nonzero(base.alpha >= min_alpha)
    i = int(rng.integers(0, len(xs)))
    return xs[i] + 0.5, ys[i] + 0.5


def _contrast_color(region: np.ndarray) -> np.ndarray:
    """Near-white on dark regions, near-black on light ones."""
    return np.array([238.0, 236, 228]) if region.mean() < 128 else np.array([22.0, 22, 26])


def _farthest(candidates: np.ndarray, region: np.ndarray) -> np.ndarray:
    """The candidate whose (broadcast) result differs most from ``region`` on average."""
    distances = [np.abs(np.broadcast_to(c, region.shape) - region).mean() for c in candidates]
    return candidates[int(np.argmax(distances))]


def _scratch_region(base: Base, rng: np.random.Generator, size: int, category: str,
                    noise: np.ndarray):
    """The scratch defect: (mask, paint)."""
    s = float(size)
    on_object = base.alpha >= 0.5
    width = rng.uniform(0.04, 0.065) * s
    if base.kind == "texture":
        start = rng.uniform(0.15, 0.85, 2) * s
        mask = _stroke(size, start, rng.uniform(0.45, 0.8) * s, width, rng)
    else:
        length = rng.uniform(1.0, 1.6) * base.scale
        start = _object_point(base, rng)
        mask = _stroke(size, start, length, width, rng) & on_object

    def paint(img, m):
        return 0.85 * _contrast_color(img[m]) + 0.15 * img[m] + noise[m]

    return mask, paint


def _hole_region(base: Base, rng: np.random.Generator, size: int, category: str,
                 noise: np.ndarray):
    """The hole defect: (mask, paint)."""
    s = float(size)
    on_object = base.alpha >= 0.5
    if base.kind == "texture":
        cx, cy = rng.uniform(0.18, 0.82, 2) * s
        rx, ry = rng.uniform(0.08, 0.14, 2) * s
        region = None
    else:  # on the nut's face, between bore and rim
        phi = rng.uniform(0, 2 * math.pi)
        d = rng.uniform(0.58, 0.68) * base.scale
        cx, cy = base.center[0] + d * math.cos(phi), base.center[1] + d * math.sin(phi)
        rx = ry = rng.uniform(0.08, 0.11) * s
        region = on_object
    x, y = _grid(size)
    rr = ((x - cx) / rx) ** 2 + ((y - cy) / ry) ** 2
    mask = rr <= 1.0 if region is None else (rr <= 1.0) & region

    def paint(img, m):
        return (8 + 35 * rr[m] ** 2)[:, None] * np.array([1.0, 0.95, 0.9]) + noise[m]

    return mask, paint


def _stain_region(base: Base, rng: np.random.Generator, size: int, category: str,
                  noise: np.ndarray):
    """The stain defect: (mask, paint)."""
    s = float(size)
    cx, cy = rng.uniform(0.2, 0.8, 2) * s
    mask = _blob(size, cx, cy, rng.uniform(0.10, 0.17) * s, rng)

    def paint(img, m):
        return 0.25 * img[m] + 0.75 * _farthest(_STAINS, img[m]) + noise[m]

    return mask, paint


def _color_region(base: Base, rng: np.random.Generator, size: int, category: str,
                  noise: np.ndarray):
    """The color defect: (mask, paint)."""
    s = float(size)
    on_object = base.alpha >= 0.5
    if base.kind == "texture":
        cx, cy = rng.uniform(0.2, 0.8, 2) * s
        mask = _blob(size, cx, cy, rng.uniform(0.11, 0.18) * s, rng)
    else:
        cx, cy = _object_point(base, rng)
        mask = _blob(size, cx, cy, rng.uniform(0.12, 0.2) * s, rng) & on_object

    def paint(img, m):
        gray = img[m].mean(axis=1, keepdims=True)
        candidates = np.stack([gray * t for t in _TINTS])
        return (
            candidates[int(np.argmax([np.abs(c - img[m]).mean() for c in candidates]))]
            + noise[m]
        )

    return mask, paint


def _contamination_region(base: Base, rng: np.random.Generator, size: int, category: str,
                          noise: np.ndarray):
    """The contamination defect: (mask, paint)."""
    s = float(size)
    others = [t for t in TEXTURES if t != category]
    own = np.asarray(TEXTURE_TINTS[category])
    other = max(others, key=lambda t: float(np.abs(np.asarray(TEXTURE_TINTS[t]) - own).sum()))
    patch = _tinted(_texture_gray(other, rng, size), other)
    cx, cy = rng.uniform(0.2, 0.8, 2) * s
    mask = _blob(size, cx, cy, rng.uniform(0.10, 0.16) * s, rng)

    def paint(img, m):
        return patch[m] + noise[m]

    return mask, paint


def _missing_region(base: Base, rng: np.random.Generator, size: int, category: str,
                    noise: np.ndarray):
    """The missing defect: (mask, paint)."""
    s = float(size)
    if category == "nut":
        phi = rng.uniform(0, 2 * math.pi)
        x, y = _grid(size)
        proj = (x - base.center[0]) * math.cos(phi) + (y - base.center[1]) * math.sin(phi)
        cut = proj > rng.uniform(0.5, 0.68) * base.scale
    else:  # the screw loses its tip
        u, _ = _screw_local(size, base.center[0], base.center[1], base.angle)
        cut = u > _SCREW["half_length"] * s - rng.uniform(0.2, 0.3) * s
    mask = cut & (base.alpha > 0)

    def paint(img, m):
        return base.background[m]

    return mask, paint


def _extra_region(base: Base, rng: np.random.Generator, size: int, category: str,
                  noise: np.ndarray):
    """The extra defect: (mask, paint)."""
    s = float(size)
    if category == "nut":
        phi = rng.uniform(0, 2 * math.pi)
        d = base.scale * rng.uniform(0.85, 0.95)
    else:  # on the shaft's side
        along = rng.uniform(-0.15, 0.25) * s
        side = _SCREW["shaft"] * s * (1 if rng.random() < 0.5 else -1)
        phi = base.angle + math.atan2(side, along)
        d = math.hypot(along, side)
    cx, cy = base.center[0] + d * math.cos(phi), base.center[1] + d * math.sin(phi)
    blob = _blob(size, cx, cy, rng.uniform(0.08, 0.13) * s, rng)
    mask = blob & (base.alpha < 0.5)
    level = 185.0 if category == "nut" else 70.0

    def paint(img, m):
        return level * np.array([1.0, 0.96, 0.88]) + 2.5 * noise[m]

    return mask, paint


def _thread_region(base: Base, rng: np.random.Generator, size: int, category: str,
                   noise: np.ndarray):
    """The thread defect: (mask, paint)."""
    s = float(size)
    on_object = base.alpha >= 0.5
    u, v = _screw_local(size, base.center[0], base.center[1], base.angle)
    u0 = rng.uniform(-0.1, 0.12) * s
    band = (u >= u0) & (u <= u0 + rng.uniform(0.12, 0.2) * s)
    mask = band & (np.abs(v) <= _SCREW["shaft"] * s) & on_object

    def paint(img, m):
        return (205 + 25 * np.sin(v[m] / (0.02 * s)))[:, None] * np.array(
            [1.0, 0.98, 0.95]
        ) + noise[m]

    return mask, paint


_DEFECT_REGIONS = {
    "scratch": _scratch_region,
    "hole": _hole_region,
    "stain": _stain_region,
    "color": _color_region,
    "contamination": _contamination_region,
    "missing": _missing_region,
    "extra": _extra_region,
    "thread": _thread_region,
}


def _defect_region(
    base: Base, defect: str, rng: np.random.Generator, size: int, category: str
) -> tuple[np.ndarray, Callable[[np.ndarray, np.ndarray], np.ndarray]]:
    """(mask, paint) for one attempt: ``paint(image, mask)`` returns new values for mask pixels."""
    noise = rng.normal(0, 3.0, (size, size, 3))  # drawn first, whatever the defect
    region = _DEFECT_REGIONS.get(defect)
    if region is None:
        raise DataError(f"unknown synthetic defect {defect!r} for category {category!r}")
    return region(base, rng, size, category, noise)


def apply_defect(
    base: Base, defect: str, rng: np.random.Generator, category: str, max_tries: int = 60
) -> tuple[np.ndarray, np.ndarray]:
    """(defective float image, bool mask): only mask pixels change, area within AREA_BOUNDS."""
    size = base.image.shape[0]
    lo, hi = AREA_BOUNDS[base.kind]
    chosen = fallback = None
    for _ in range(max_tries):
        mask, paint = _defect_region(base, defect, rng, size, category)
        frac = float(mask.mean())
        if lo <= frac <= hi:
            chosen = (mask, paint)
            break
        # Out of bounds: remember the attempt nearest a typical size, in case none fits.
        if frac > 0 and (fallback is None or abs(frac - 0.06) < fallback[0]):
            fallback = (abs(frac - 0.06), mask, paint)
    if chosen is None:
        if fallback is None:
            raise RuntimeError(f"synthetic {category}/{defect}: no defect region at size {size}")
        chosen = fallback[1:]
    mask, paint = chosen
    image = base.image.copy()
    image[mask] = paint(base.image, mask)
    return image, mask


def _quantize(image: np.ndarray) -> np.ndarray:
    return np.clip(np.round(image), 0, 255).astype(np.uint8)


def render_sample(
    category: str, rng: np.random.Generator, size: int, defect: str | None = None
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(clean uint8 RGB, final uint8 RGB, bool mask); final == clean and mask empty for normals."""
    base = render_normal(category, rng, size)
    clean = _quantize(base.image)
    if defect is None:
        return clean, clean, np.zeros((size, size), dtype=bool)
    image, mask = apply_defect(base, defect, rng, category)
    final = clean.copy()
    final[mask] = _quantize(image)[mask]  # pixels outside the mask are bit-identical
    return clean, final, mask


# --------------------------------------------------------------------------------------------
# Writing the tree


def _png(array: np.ndarray) -> bytes:
    buf = io.BytesIO()
    # Fixed encoder settings and no metadata: the same pixels always give the same bytes.
    Image.fromarray(array).save(buf, format="PNG", compress_level=1, optimize=False)
    return buf.getvalue()


def _params(
    seed: int,
    size: int,
    n_train: int,
    n_test_good: int,
    n_test_anomalous: int,
    categories: Sequence[str],
) -> dict:
    return {
        "generator": GENERATOR,
        "seed": seed,
        "size": size,
        "n_train": n_train,
        "n_test_good": n_test_good,
        "n_test_anomalous": n_test_anomalous,
        "categories": list(categories),
        "defects": {c: list(DEFECTS[c]) for c in categories},
    }


def _write_category(
    tmp: Path,
    category: str,
    seed: int,
    size: int,
    n_train: int,
    n_test_good: int,
    n_test_anomalous: int,
) -> None:
    cat = tmp / category

    def put(rel: str, array: np.ndarray) -> None:
        path = cat / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(_png(array))

    for i in range(n_train):
        _, image, _ = render_sample(category, _rng(seed, category, 0, i), size)
        put(f"train/good/{i:03d}.png", image)
    for i in range(n_test_good):
        _, image, _ = render_sample(category, _rng(seed, category, 1, i), size)
        put(f"test/good/{i:03d}.png", image)
    defects = DEFECTS[category]
    per_defect = dict.fromkeys(defects, 0)
    for i in range(n_test_anomalous):
        defect = defects[i % len(defects)]  # balanced over defect types
        _, image, mask = render_sample(category, _rng(seed, category, 2, i), size, defect)
        j = per_defect[defect]
        per_defect[defect] += 1
        put(f"test/{defect}/{j:03d}.png", image)
        put(f"ground_truth/{defect}/{j:03d}_mask.png", mask.astype(np.uint8) * 255)


def _check_counts(size: int, n_train: int, n_test_good: int, n_test_anomalous: int) -> None:
    if not isinstance(size, int) or isinstance(size, bool) or not 16 <= size <= 1024:
        raise DataError(f"synthetic image size {size!r} must be an integer in 16..1024 (e.g. 128)")
    for name, value in (
        ("n_train", n_train),
        ("n_test_good", n_test_good),
        ("n_test_anomalous", n_test_anomalous),
    ):
        if not isinstance(value, int) or isinstance(value, bool) or value < 1 or value > 10000:
            raise DataError(f"synthetic {name} {value!r} must be an integer in 1..10000")


def generate_synthetic(
    out_dir: str | os.PathLike,
    seed: int = 0,
    size: int = 128,
    n_train: int = 40,
    n_test_good: int = 10,
    n_test_anomalous: int = 25,
    categories: Sequence[str] | None = None,
    overwrite: bool = False,
) -> Path:
    """Write the synthetic MVTec-layout tree to ``out_dir`` and return its path.

    If ``out_dir`` already holds a complete tree made with the same parameters it is kept as is
    (the files would be identical); one with files missing is written again. A different
    non-empty folder is replaced only with ``overwrite``.
    """
    out = Path(out_dir).expanduser()
    categories = list(categories or SYNTHETIC_CATEGORIES)
    unknown = [c for c in categories if c not in SYNTHETIC_CATEGORIES]
    if unknown:
        raise DataError(
            f"unknown synthetic category {unknown[0]!r}; known: {', '.join(SYNTHETIC_CATEGORIES)}"
        )
    if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
        raise DataError(f"synthetic seed {seed!r} must be a non-negative integer")
    _check_counts(size, n_train, n_test_good, n_test_anomalous)
    params = _params(seed, size, n_train, n_test_good, n_test_anomalous, categories)

    if out.exists():
        if not out.is_dir():
            raise DataError(f"{out} exists and is not a folder; choose another --out")
        existing = _read_params(out / PARAMS_FILE)
        if existing == params and _complete(out, params):
            return out
        if existing != params and any(out.iterdir()) and not overwrite:
            raise DataError(
                f"{out} is not empty and was not written with these parameters; choose an "
                f"empty --out or pass --force to replace it"
            )
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".tmp", dir=out.parent))
    try:
        for category in categories:
            _write_category(tmp, category, seed, size, n_train, n_test_good, n_test_anomalous)
        text = json.dumps(params, indent=2, sort_keys=True) + "\n"
        (tmp / PARAMS_FILE).write_text(text, encoding="utf-8")
        os.chmod(tmp, 0o755)  # mkdtemp makes it private; the tree is ordinary data
        _swap_into_place(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


def _complete(out: Path, params: dict) -> bool:
    """Whether every category holds as many PNGs as its parameters make; a tree with files
    missing (or extra) is written again: same parameters, same bytes."""
    expected = (params["n_train"] + params["n_test_good"] + 2 * params["n_test_anomalous"])
    return all(sum(1 for _ in (out / c).rglob("*.png")) == expected
               for c in params["categories"])


def _read_params(path: Path) -> dict | None:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (FileNotFoundError, NotADirectoryError, json.JSONDecodeError, UnicodeDecodeError):
        return None


def _swap_into_place(tmp: Path, out: Path) -> None:
    """Rename the finished tree to ``out``; an old ``out`` is moved aside first, then deleted."""
    old = None
    if out.exists():
        old = Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".old", dir=out.parent))
        os.rmdir(old)
        os.rename(out, old)
    os.rename(tmp, out)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)
