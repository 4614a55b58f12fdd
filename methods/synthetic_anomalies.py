"""DRAEM-style synthetic anomalies, as URD trains with them.

Reference semantics: hito2448/URD ``utils/perlin.py`` (``rand_perlin_2d_np``, ``perlin_noise``,
``get_forehead_mask``) and ``dataset/dataset_noise.py`` (texture source, foreground masks).
Every line here is written for this harness; ``docs/urd.md`` lists where it differs.

For each training image and each time it is drawn:

1. a texture image is picked at random from a :class:`TextureSource`;
2. Perlin noise is drawn with lattice resolutions ``2**t_rows`` and ``2**t_cols``
   (t uniform in {0, ..., 5}), rotated by an angle uniform in [-90, 90] degrees (bilinear,
   zero fill) and thresholded at > 0.5: the anomaly mask m;
3. m is multiplied by the image's foreground mask (GrabCut, inverse Otsu or none), computed
   once per image (:func:`foreground_masks`);
4. ``aug = img (1 - m) + (1 - beta) tex m + beta img m`` with beta uniform in [0, 0.8), all in
   [0, 1].

Why Perlin noise is written here: DRAEM's variant (one random gradient angle per lattice point
of a ``res`` x ``res`` lattice laid exactly over the image, quintic fade, scaled by sqrt 2) is
what URD thresholds at 0.5; the Perlin packages on PyPI implement other lattices, octave rules
and amplitude scalings (and none runs batched on a GPU), so a threshold of 0.5 would not mean
the same. GrabCut and Otsu come from OpenCV (headless); the rotation runs as
``torch.nn.functional.grid_sample`` so the whole synthesis of a batch runs on the training device.

Randomness: every draw (texture index, scales, lattice angles, rotation, beta) comes from one
``numpy.random.Generator`` owned by :class:`AnomalySynthesizer`, on the CPU, so a seed gives the
same anomalies on any device. GrabCut's k-means initialisation draws from OpenCV's RNG, which is
re-seeded (to 0) before each image so that a mask depends on its image only.
"""

from __future__ import annotations

import abc
import hashlib
import math
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Literal

import cv2
import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, UnidentifiedImageError

from bench.errors import UserError
from datasets.mvtec import IMAGE_EXTENSIONS, is_image_file

# perlin.py: t_x, t_y = torch.randint(0, 6) -> lattice resolutions 2**0 .. 2**5.
PERLIN_SCALE_EXPONENTS = 6
MAX_PERLIN_RES = 2 ** (PERLIN_SCALE_EXPONENTS - 1)
# perlin.py: iaa.Affine(rotate=(-90, 90)) (imgaug: bilinear, constant 0 fill).
ROTATION_DEGREES = 90.0
# perlin.py: perlin_noise > 0.5.
PERLIN_THRESHOLD = 0.5
# perlin.py: beta = torch.rand(1) * 0.8.
BETA_MAX = 0.8
# perlin.py get_forehead_mask: cv2.grabCut(..., 11, mode=cv2.GC_INIT_WITH_RECT).
GRABCUT_ITERATIONS = 11
FOREGROUNDS = ("grabcut", "otsu", "none")
# The built-in texture source: a fixed pool, like a fixed dataset (independent of the run seed).
BUILTIN_TEXTURE_COUNT = 128
BUILTIN_TEXTURE_SEED = 0
BUILTIN_TEXTURE_ID = "builtin:procedural-v1"


# --------------------------------------------------------------------------------------------
# Perlin noise


def _fade(t: torch.Tensor) -> torch.Tensor:
    """Perlin's quintic fade 6t^5 - 15t^4 + 10t^3."""
    return t * t * t * (t * (t * 6.0 - 15.0) + 10.0)


def perlin_noise(
    res_rows: Sequence[int], res_cols: Sequence[int], angles: torch.Tensor, height: int,
    width: int,
) -> torch.Tensor:
    """DRAEM's 2-D Perlin noise for a batch, each image with its own lattice.

    Args:
        res_rows, res_cols: B lattice resolutions; ``height % res_rows[b] == 0`` and
            ``width % res_cols[b] == 0``.
        angles: float (B, R + 1, C + 1) gradient angles in radians, R and C at least the
            largest resolution; image b reads ``angles[b, :res_rows[b] + 1, :res_cols[b] + 1]``.
        height, width: output size.

    Returns:
        float32 (B, height, width) on ``angles.device``, values in about [-1, 1].
    """
    res_rows, res_cols = [int(r) for r in res_rows], [int(c) for c in res_cols]
    if any(height % r for r in res_rows) or any(width % c for c in res_cols):
        raise ValueError(f"perlin_noise: {height}x{width} is not divisible by every lattice "
                         f"resolution {res_rows} x {res_cols}")
    device = angles.device
    rr = torch.as_tensor(res_rows, dtype=torch.long, device=device)
    rc = torch.as_tensor(res_cols, dtype=torch.long, device=device)
    b = angles.shape[0]
    # Pixel i lies in lattice cell i // d at fraction (i % d) / d, with d = size // res.
    d_rows = (height // rr).view(b, 1)
    d_cols = (width // rc).view(b, 1)
    i = torch.arange(height, device=device).view(1, -1)
    j = torch.arange(width, device=device).view(1, -1)
    cell_r, frac_r = i // d_rows, (i % d_rows).float() / d_rows.float()  # (B, H)
    cell_c, frac_c = j // d_cols, (j % d_cols).float() / d_cols.float()  # (B, W)
    batch = torch.arange(b, device=device).view(b, 1, 1)
    r0, c0 = cell_r.view(b, -1, 1), cell_c.view(b, 1, -1)
    fr, fc = frac_r.view(b, -1, 1), frac_c.view(b, 1, -1)
    # Unit gradients at the lattice points, gathered per pixel below (no per-pixel trig).
    grad_r, grad_c = torch.cos(angles.float()), torch.sin(angles.float())

    def ramp(dr: int, dc: int) -> torch.Tensor:
        # Dot product of the corner's gradient with the offset from that corner.
        r, c = r0 + dr, c0 + dc
        return grad_r[batch, r, c] * (fr - dr) + grad_c[batch, r, c] * (fc - dc)

    tr, tc = _fade(fr), _fade(fc)
    n0 = torch.lerp(ramp(0, 0), ramp(1, 0), tr)
    n1 = torch.lerp(ramp(0, 1), ramp(1, 1), tr)
    return math.sqrt(2.0) * torch.lerp(n0, n1, tc)


def rotate_maps(maps: torch.Tensor, degrees: Sequence[float]) -> torch.Tensor:
    """Rotate each (H, W) map about its centre; bilinear, zero outside (imgaug's Affine).

    Args:
        maps: float (B, H, W).
        degrees: B angles; positive turns the content counter-clockwise as displayed (the
            convention of ``cv2.getRotationMatrix2D``).

    Returns:
        float32 (B, H, W).
    """
    b, h, w = maps.shape
    # With y pointing down, counter-clockwise on screen is a negative angle in (x, y).
    theta = torch.as_tensor(list(degrees), dtype=torch.float32, device=maps.device) * (
        -math.pi / 180.0)
    cos, sin = torch.cos(theta), torch.sin(theta)
    # Output pixel p samples the input at R^-1 (p - c) + c, written in grid_sample's
    # normalised coordinates (align_corners=True: -1 and 1 are the outer pixel centres).
    sx, sy = (w - 1) / 2.0 if w > 1 else 1.0, (h - 1) / 2.0 if h > 1 else 1.0
    affine = torch.zeros((b, 2, 3), dtype=torch.float32, device=maps.device)
    affine[:, 0, 0] = cos
    affine[:, 0, 1] = sin * sy / sx
    affine[:, 1, 0] = -sin * sx / sy
    affine[:, 1, 1] = cos
    grid = F.affine_grid(affine, [b, 1, h, w], align_corners=True)
    out = F.grid_sample(maps.float().unsqueeze(1), grid, mode="bilinear", padding_mode="zeros",
                        align_corners=True)
    return out[:, 0]


# --------------------------------------------------------------------------------------------
# Foreground masks


def foreground_mask(image_rgb: np.ndarray, kind: Literal["grabcut", "otsu", "none"]) -> np.ndarray:
    """Where anomalies may go on one image (URD ``get_forehead_mask``).

    Args:
        image_rgb: uint8 (H, W, 3), RGB.
        kind: ``"grabcut"`` (OpenCV GrabCut, 11 iterations, rectangle (1, 1, w - 1, h - 1),
            definite or probable foreground), ``"otsu"`` (grayscale, inverse binary Otsu
            threshold: the darker side) or ``"none"`` (everywhere).

    Returns:
        bool (H, W).
    """
    h, w = image_rgb.shape[:2]
    if kind == "none":
        return np.ones((h, w), dtype=bool)
    if kind == "otsu":
        gray = cv2.cvtColor(np.ascontiguousarray(image_rgb), cv2.COLOR_RGB2GRAY)
        _, thresh = cv2.threshold(gray, 0, 255, cv2.THRESH_BINARY_INV + cv2.THRESH_OTSU)
        return thresh > 0
    if kind == "grabcut":
        # URD reads images with cv2.imread (BGR): give GrabCut the same channel order.
        bgr = np.ascontiguousarray(image_rgb[:, :, ::-1])
        labels = np.zeros((h, w), dtype=np.uint8)
        background = np.zeros((1, 65), dtype=np.float64)
        foreground = np.zeros((1, 65), dtype=np.float64)
        cv2.setRNGSeed(0)  # GrabCut's k-means initialisation draws from OpenCV's RNG
        cv2.grabCut(bgr, labels, (1, 1, w - 1, h - 1), background, foreground,
                    GRABCUT_ITERATIONS, mode=cv2.GC_INIT_WITH_RECT)
        return (labels == cv2.GC_FGD) | (labels == cv2.GC_PR_FGD)
    raise UserError(f"foreground {kind!r} must be one of {', '.join(FOREGROUNDS)}")


def foreground_masks(images: torch.Tensor, kind: Literal["grabcut", "otsu", "none"]
                     ) -> torch.Tensor:
    """:func:`foreground_mask` of every image of a uint8 batch (N, 3, H, W) -> bool (N, 1, H, W)
    on the CPU."""
    n, _, h, w = images.shape
    if kind == "none":
        return torch.ones((n, 1, h, w), dtype=torch.bool)
    hwc = images.permute(0, 2, 3, 1).cpu().numpy()
    masks = np.stack([foreground_mask(hwc[i], kind) for i in range(n)]) if n else \
        np.zeros((0, h, w), dtype=bool)
    return torch.from_numpy(masks).unsqueeze(1)


# --------------------------------------------------------------------------------------------
# Texture sources


class TextureSource(abc.ABC):
    """Images to paste into anomalies, all delivered at one size as uint8 (k, 3, H, W)."""

    description: str

    @abc.abstractmethod
    def __len__(self) -> int:
        """How many textures there are."""

    @abc.abstractmethod
    def get(self, indices: Sequence[int]) -> torch.Tensor:
        """Textures ``indices``, uint8 (k, 3, H, W)."""


class FolderTextures(TextureSource):
    """Every image file under ``root`` (recursively), resized to (height, width) with PIL
    bilinear as URD does with DTD; each file is decoded once and then kept in memory.

    Raises:
        UserError: the folder is missing, holds no image file, or a file does not open.
    """

    def __init__(self, root: str | os.PathLike, height: int, width: int):
        path = Path(os.path.expanduser(str(root)))
        if not path.is_dir():
            raise UserError(
                f"urd texture_root {str(root)!r} is not a folder; give a folder of texture images "
                f"(e.g. DTD's images/) with --set urd.texture_root=PATH, or leave it unset for "
                f"the built-in textures"
            )
        # The dataset loaders' rule for image files (extension, no hidden files), recursively.
        files = sorted((p for p in path.rglob("*") if is_image_file(p)),
                       key=lambda p: p.relative_to(path).as_posix())
        if not files:
            raise UserError(
                f"urd texture_root {path} holds no image file ({', '.join(IMAGE_EXTENSIONS)}, "
                f"searched recursively); point it at a folder of texture images"
            )
        listing = hashlib.sha256()
        for p in files:
            try:
                with Image.open(p) as img:  # header only: cheap, catches a broken file early
                    img.size  # noqa: B018
            except (OSError, UnidentifiedImageError) as err:
                raise UserError(
                    f"urd texture_root: {p} is not a readable image ({type(err).__name__}); "
                    f"remove or replace it"
                ) from None
            listing.update(f"{p.relative_to(path).as_posix()}\0{p.stat().st_size}\n".encode())
        self.root = path.resolve()
        self.files = files
        self.size = (height, width)
        self._cache: dict[int, np.ndarray] = {}
        self.description = (f"folder:{self.root} ({len(files)} images, listing "
                            f"sha256:{listing.hexdigest()[:12]})")

    def __len__(self) -> int:
        return len(self.files)

    def _load(self, index: int) -> np.ndarray:
        cached = self._cache.get(index)
        if cached is None:
            h, w = self.size
            try:
                with Image.open(self.files[index]) as img:
                    rgb = img.convert("RGB").resize((w, h), Image.BILINEAR)
            except (OSError, UnidentifiedImageError) as err:
                raise UserError(f"urd texture {self.files[index]} cannot be decoded "
                                f"({type(err).__name__}); remove or replace it") from None
            cached = self._cache[index] = np.asarray(rgb, dtype=np.uint8).transpose(2, 0, 1)
        return cached

    def get(self, indices: Sequence[int]) -> torch.Tensor:
        return torch.from_numpy(np.stack([self._load(int(i)) for i in indices]))


def _fractal_perlin(rng: np.random.Generator, height: int, width: int, base: int,
                    octaves: int) -> torch.Tensor:
    """Sum of Perlin octaves (resolution doubling, amplitude halving), normalised to [0, 1]."""
    total = torch.zeros((height, width))
    amplitude, res = 1.0, base
    for _ in range(octaves):
        if res > MAX_PERLIN_RES or height % res or width % res:
            break
        angles = torch.from_numpy(2 * math.pi * rng.random((1, res + 1, res + 1)))
        total += amplitude * perlin_noise([res], [res], angles, height, width)[0]
        amplitude, res = amplitude / 2.0, res * 2
    lo, hi = total.min(), total.max()
    return (total - lo) / (hi - lo).clamp_min(1e-6)


def _builtin_texture(rng: np.random.Generator, height: int, width: int) -> torch.Tensor:
    """One procedural texture, float (3, H, W) in [0, 1]: clouds, stripes, checks or speckles
    in two random colours, each with some Perlin grain."""
    kind = int(rng.integers(4))
    colours = torch.from_numpy(rng.random((2, 3, 1, 1))).float()
    grain = _fractal_perlin(rng, height, width, base=int(2 ** rng.integers(3, 6)), octaves=2)
    y, x = torch.meshgrid(torch.arange(height, dtype=torch.float32),
                          torch.arange(width, dtype=torch.float32), indexing="ij")
    phi = float(rng.uniform(0, math.pi))
    u = x * math.cos(phi) + y * math.sin(phi)
    v = -x * math.sin(phi) + y * math.cos(phi)
    period = float(rng.uniform(4, max(5.0, min(height, width) / 3)))
    if kind == 0:  # clouds
        t = _fractal_perlin(rng, height, width, base=int(2 ** rng.integers(1, 4)), octaves=4)
    elif kind == 1:  # wavy stripes
        wobble = _fractal_perlin(rng, height, width, base=2, octaves=2)
        t = 0.5 + 0.5 * torch.sin(2 * math.pi * u / period + 6.0 * wobble)
    elif kind == 2:  # rotated checks
        t = ((torch.sin(2 * math.pi * u / period) * torch.sin(2 * math.pi * v / period)) > 0)
        t = t.float()
    else:  # speckles
        spots = _fractal_perlin(rng, height, width, base=int(2 ** rng.integers(3, 6)), octaves=1)
        t = (spots > float(rng.uniform(0.55, 0.8))).float()
    t = (0.8 * t + 0.2 * grain).clamp(0, 1)
    return colours[0, :, :, :] * (1 - t) + colours[1, :, :, :] * t


class BuiltinTextures(TextureSource):
    """A fixed pool of :data:`BUILTIN_TEXTURE_COUNT` procedural textures made by this harness
    (the same pool for every run, as a dataset would be). Not the paper's DTD: provenance says
    so. Texture i is drawn from seed (:data:`BUILTIN_TEXTURE_SEED`, i) when first asked for and
    then kept, so a run pays only for the textures it uses, in any order."""

    def __init__(self, height: int, width: int, count: int = BUILTIN_TEXTURE_COUNT):
        self.size = (height, width)
        self.count = int(count)
        self._made: dict[int, torch.Tensor] = {}
        self.description = (f"{BUILTIN_TEXTURE_ID} ({count} procedural textures, seed "
                            f"{BUILTIN_TEXTURE_SEED}; not the paper's DTD)")

    def __len__(self) -> int:
        return self.count

    def texture(self, index: int) -> torch.Tensor:
        """Texture ``index`` as uint8 (3, H, W)."""
        index = int(index)
        if not 0 <= index < self.count:
            raise IndexError(f"built-in texture {index} of {self.count}")
        made = self._made.get(index)
        if made is None:
            rng = np.random.default_rng([BUILTIN_TEXTURE_SEED, index])
            made = _builtin_texture(rng, *self.size)
            made = self._made[index] = (made * 255.0).round().clamp(0, 255).to(torch.uint8)
        return made

    def get(self, indices: Sequence[int]) -> torch.Tensor:
        return torch.stack([self.texture(i) for i in indices])


def texture_source(root: str | None, height: int, width: int) -> TextureSource:
    """:class:`FolderTextures` of ``root``, or :class:`BuiltinTextures` when ``root`` is None."""
    if root is None:
        return BuiltinTextures(height, width)
    return FolderTextures(root, height, width)


def describe_texture_root(root: str | None) -> str:
    """What a config's ``texture_root`` names, without reading the folder."""
    if root is None:
        return (f"{BUILTIN_TEXTURE_ID} ({BUILTIN_TEXTURE_COUNT} procedural textures, seed "
                f"{BUILTIN_TEXTURE_SEED}; not the paper's DTD)")
    return f"folder:{Path(os.path.expanduser(root)).resolve()}"


# --------------------------------------------------------------------------------------------
# The synthesiser


class AnomalySynthesizer:
    """Draws one synthetic anomaly per image, batch by batch (see the module docstring).

    Args:
        textures: where the pasted textures come from (their size is the images' size).
        seed: seeds the numpy Generator behind every draw.
    """

    def __init__(self, textures: TextureSource, seed: int):
        self.textures = textures
        self.rng = np.random.default_rng(seed)

    def __call__(
        self, images: torch.Tensor, foreground: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Anomalous copies of ``images``.

        Args:
            images: float (B, 3, H, W) in [0, 1], on the device the work runs on.
            foreground: bool/float (B, 1, H, W) where anomalies may go (None: everywhere).

        Returns:
            (augmented float32 (B, 3, H, W) in [0, 1], mask float32 (B, 1, H, W) in {0, 1}).
        """
        b, _, h, w = images.shape
        device = images.device
        rng = self.rng
        tex_index, res_rows, res_cols, degrees, betas = [], [], [], [], []
        angles = np.zeros((b, MAX_PERLIN_RES + 1, MAX_PERLIN_RES + 1))
        for k in range(b):  # draws in a fixed order per image: reproducible per seed
            tex_index.append(int(rng.integers(len(self.textures))))
            rr = 2 ** int(rng.integers(PERLIN_SCALE_EXPONENTS))
            rc = 2 ** int(rng.integers(PERLIN_SCALE_EXPONENTS))
            res_rows.append(rr)
            res_cols.append(rc)
            angles[k, : rr + 1, : rc + 1] = 2 * math.pi * rng.random((rr + 1, rc + 1))
            degrees.append(float(rng.uniform(-ROTATION_DEGREES, ROTATION_DEGREES)))
            betas.append(float(rng.random()) * BETA_MAX)
        noise = perlin_noise(res_rows, res_cols, torch.from_numpy(angles).to(device), h, w)
        noise = rotate_maps(noise, degrees)
        mask = (noise > PERLIN_THRESHOLD).float().unsqueeze(1)
        if foreground is not None:
            mask = mask * foreground.to(device=device, dtype=mask.dtype)
        texture = self.textures.get(tex_index).to(device, non_blocking=True).float() / 255.0
        beta = torch.tensor(betas, dtype=torch.float32, device=device).view(b, 1, 1, 1)
        x = images.float()
        augmented = x * (1 - mask) + (1 - beta) * texture * mask + beta * x * mask
        return augmented, mask
