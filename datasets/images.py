"""Image pipeline: decode, resize, center-crop; masks with the same geometry; a decode cache.

Geometry (docs/protocol.md §3): resize to ``resize × resize`` (bilinear, PIL's antialiased filter, as
torchvision's ``Resize`` does on PIL images), then center crop ``crop × crop``. Masks are
binarised first (any non-zero pixel is anomalous, which also covers VisA's multi-valued masks),
then resized with nearest neighbour and cropped the same way, so they stay exactly {0, 1}.

Pixel depth: 8-bit images (grey, palette, RGB, RGBA, CMYK) become RGB as PIL converts them;
16-bit greyscale images (PNG, TIFF) are scaled to 8 bits (``round(v * 255 / 65535)``); 16-bit
RGB PNGs are decoded by PIL to 8 bits per channel (the high byte). Images with 32-bit integer or
float pixels have no agreed 8-bit reading: they are refused with one line naming the file.

Decoding full-size PNGs every epoch is waste: :class:`ImageCache` keeps decoded, resized arrays in
memory and, optionally, on disk as ``.npy`` files keyed by the SHA-256 of the file's bytes plus
the geometry, so a cache survives moves and renames and is never stale.
"""

from __future__ import annotations

import contextlib
import io
import numbers
import os
import threading
from collections import OrderedDict
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
from PIL import Image, UnidentifiedImageError

from bench.errors import UserError
from bench.records import file_sha256 as _records_file_sha256
from bench.records import write_bytes_atomic
from datasets.errors import DataError
from datasets.samples import Sample

if TYPE_CHECKING:  # torch is imported when images are loaded, not when data is listed
    import torch

# Reference geometry of the paper: resize 256, crop 224.
REFERENCE_RESIZE = 256
REFERENCE_CROP = 224


@dataclass(frozen=True)
class Preprocess:
    """Square resize then square center crop, in pixels."""

    resize: int = REFERENCE_RESIZE
    crop: int = REFERENCE_CROP

    def __post_init__(self):
        for name in ("resize", "crop"):
            value = getattr(self, name)
            if not isinstance(value, numbers.Integral) or isinstance(value, bool) or value < 1:
                raise UserError(f"image {name} must be a positive integer, got {value!r}")
            object.__setattr__(self, name, int(value))  # numpy integers become plain ints
        if self.crop > self.resize:
            raise UserError(
                f"crop {self.crop} is larger than resize {self.resize}; use a crop <= resize"
            )

    @classmethod
    def for_size(cls, crop: int) -> Preprocess:
        """The paper's geometry scaled to a crop of ``crop`` pixels (resize = crop × 256/224)."""
        return cls(resize=int(round(crop * REFERENCE_RESIZE / REFERENCE_CROP)), crop=int(crop))

    @property
    def offset(self) -> int:
        # torchvision's CenterCrop rounds the margin the same way.
        return int(round((self.resize - self.crop) / 2.0))

    def _box(self) -> tuple[int, int, int, int]:
        o = self.offset
        return (o, o, o + self.crop, o + self.crop)

    def image(self, img: Image.Image) -> np.ndarray:
        """RGB uint8 array (3, crop, crop) from a PIL image of any supported depth (module
        docstring); :class:`PixelFormatError` for one that has no 8-bit reading."""
        rgb = to_rgb8(img).resize((self.resize, self.resize), Image.BILINEAR)
        return np.ascontiguousarray(
            np.asarray(rgb.crop(self._box()), dtype=np.uint8).transpose(2, 0, 1)
        )

    def mask(self, img: Image.Image) -> np.ndarray:
        """{0, 1} uint8 array (crop, crop): non-zero is anomalous, nearest-neighbour resize.
        An alpha channel is not part of the mask (an opaque RGBA mask would be all anomalous)."""
        if img.mode in ("LA", "La", "PA"):
            img = img.getchannel(0)
        elif img.mode in ("RGBA", "RGBa"):
            img = img.convert("RGB")
        arr = np.asarray(img)
        if arr.ndim == 3:  # a colour-saved mask: any channel non-zero
            arr = arr.max(axis=2)
        binary = Image.fromarray(((arr > 0) * 255).astype(np.uint8), mode="L")
        resized = binary.resize((self.resize, self.resize), Image.NEAREST).crop(self._box())
        return (np.asarray(resized) > 127).astype(np.uint8)

    def tag(self) -> str:
        return f"r{self.resize}c{self.crop}"


class PixelFormatError(ValueError):
    """An image whose pixels have no agreed 8-bit reading (32-bit integer or float)."""


_SIXTEEN_BIT = ("I;16", "I;16L", "I;16B", "I;16N")


def to_rgb8(img: Image.Image) -> Image.Image:
    """``img`` as an 8-bit RGB image: 16-bit greyscale scaled to 8 bits, 8-bit modes as PIL
    converts them; 32-bit integer and float pixels raise :class:`PixelFormatError`.

    PIL's own ``convert("RGB")`` clips 16-bit values at 255, which saturates nearly every pixel.
    A PNG holds no 32-bit integer pixels, so mode ``I`` from a PNG (how older PIL versions open
    16-bit greyscale PNGs) is read as 16-bit too.
    """
    if img.mode in _SIXTEEN_BIT or (img.mode == "I" and img.format == "PNG"):
        values = np.asarray(img).astype(np.int64)
        if values.size and (values.min() < 0 or values.max() > 65535):
            raise PixelFormatError(f"has pixel values outside 0..65535 (mode {img.mode})")
        eight = ((values * 255 + 32767) // 65535).astype(np.uint8)
        return Image.fromarray(eight, mode="L").convert("RGB")
    if img.mode in ("I", "F") or img.mode.startswith(("I;", "F;")):
        kind = "floating-point" if img.mode.startswith("F") else "32-bit integer"
        raise PixelFormatError(f"has {kind} pixels (mode {img.mode}), which have no agreed "
                               f"8-bit reading")
    return img.convert("RGB")


@contextlib.contextmanager
def _readable(path: Path, what: str):
    """Turn a missing or undecodable image file into one DataError that names it."""
    try:
        yield
    except FileNotFoundError:
        raise DataError(f"{what} {path} does not exist; restore it or reload the dataset") from None
    except PixelFormatError as err:
        raise DataError(f"{what} {path} {err}; save it with 8 or 16 bits per channel") from None
    except Image.DecompressionBombError as err:
        raise DataError(f"{what} {path} is too large to decode safely ({err}); shrink it"
                        ) from None
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError) as err:
        raise DataError(
            f"cannot read {what} {path} ({type(err).__name__}: {err}); replace or remove the file"
        ) from None


def _open(path: Path, what: str) -> Image.Image:
    """A fully decoded PIL image, or a DataError naming the file."""
    with _readable(path, what), Image.open(path) as img:
        img.load()
        return img


def _image_size(path: Path, what: str) -> tuple[int, int]:
    """(width, height) from the header only."""
    with _readable(path, what), Image.open(path) as img:
        return img.size


def _check_mask_size(sample: Sample, image_size: tuple[int, int]) -> None:
    mask_size = _image_size(sample.mask_path, "mask")
    if mask_size != image_size:
        raise DataError(
            f"mask {sample.mask_path} is {mask_size[0]}x{mask_size[1]} but its image "
            f"{sample.path} is {image_size[0]}x{image_size[1]}; masks must match their image"
        )


def file_sha256(path: str | os.PathLike) -> str:
    """SHA-256 of a file's bytes (hex)."""
    return _records_file_sha256(path)


_SHA256_MEMO: dict[tuple[str, int, int], str] = {}


def cached_file_sha256(path: str | os.PathLike) -> str:
    """:func:`file_sha256`, computed once per process for a file of unchanged (size, mtime):
    many manifests list the same file, and a sweep builds many teachers from one weight file.
    Raises FileNotFoundError for a missing file."""
    st = os.stat(path)
    key = (str(Path(path).resolve()), st.st_size, st.st_mtime_ns)
    if key not in _SHA256_MEMO:
        _SHA256_MEMO[key] = file_sha256(path)
    return _SHA256_MEMO[key]


class ImageCache:
    """Decoded, preprocessed images in memory and optionally on disk.

    In memory the key is (path, size, mtime, geometry): no file read at all on a hit; the least
    recently used arrays are dropped beyond ``max_memory_mb``. On disk the key is
    sha256(file bytes) + geometry, so the cache can be shared between runs and machines.
    Safe to use from the decoding threads of :func:`load_images`.
    """

    def __init__(self, cache_dir: str | os.PathLike | None = None, max_memory_mb: float = 4096):
        self.cache_dir = Path(cache_dir).expanduser() if cache_dir is not None else None
        self.max_bytes = int(max_memory_mb * 2**20)
        self._memory: OrderedDict[tuple, np.ndarray] = OrderedDict()
        self._bytes = 0
        self._lock = threading.Lock()
        self.hits = 0
        self.misses = 0

    def __len__(self) -> int:
        return len(self._memory)

    @property
    def memory_bytes(self) -> int:
        return self._bytes

    def clear(self) -> None:
        with self._lock:
            self._memory.clear()
            self._bytes = 0

    def get(self, path: Path, preprocess: Preprocess, kind: str = "image") -> np.ndarray:
        """The preprocessed array for ``path`` (``kind`` is ``image`` or ``mask``)."""
        try:
            st = os.stat(path)
        except FileNotFoundError:
            raise DataError(
                f"{kind} {path} does not exist; restore it or reload the dataset"
            ) from None
        mem_key = (str(path), st.st_size, st.st_mtime_ns, preprocess.resize, preprocess.crop, kind)
        with self._lock:
            arr = self._memory.get(mem_key)
            if arr is not None:
                self._memory.move_to_end(mem_key)
                self.hits += 1
                return arr
            self.misses += 1
        shape = (3, preprocess.crop, preprocess.crop) if kind == "image" else (preprocess.crop,) * 2
        disk = None
        if self.cache_dir is not None:
            disk = self.cache_dir / f"{file_sha256(path)}_{preprocess.tag()}_{kind}.npy"
            arr = self._read_disk(disk, shape)
        if arr is None:
            img = _open(path, kind)
            with _readable(path, kind):
                arr = preprocess.image(img) if kind == "image" else preprocess.mask(img)
            if disk is not None:
                buf = io.BytesIO()
                np.save(buf, arr, allow_pickle=False)
                write_bytes_atomic(disk, buf.getvalue())
        arr.setflags(write=False)  # shared between callers: never mutated in place
        self._remember(mem_key, arr)
        return arr

    def _remember(self, key: tuple, arr: np.ndarray) -> None:
        with self._lock:
            if key in self._memory:
                return
            self._memory[key] = arr
            self._bytes += arr.nbytes
            while self._bytes > self.max_bytes and len(self._memory) > 1:
                _, old = self._memory.popitem(last=False)
                self._bytes -= old.nbytes

    @staticmethod
    def _read_disk(path: Path, shape: tuple[int, ...]) -> np.ndarray | None:
        try:
            arr = np.load(path, allow_pickle=False)
        except (FileNotFoundError, ValueError, OSError, EOFError):
            return None  # absent or damaged: decode again and rewrite it
        return arr if arr.shape == shape and arr.dtype == np.uint8 else None


def _map(fn, items: Sequence, workers: int) -> list:
    # PIL releases the GIL while decoding, so threads speed up large PNG/JPEG batches.
    if workers <= 1 or len(items) < 2:
        return [fn(item) for item in items]
    with ThreadPoolExecutor(max_workers=workers) as pool:
        return list(pool.map(fn, items))


def load_images(
    samples: Sequence[Sample],
    preprocess: Preprocess,
    cache: ImageCache | None = None,
    workers: int = 1,
) -> torch.Tensor:
    """uint8 tensor (N, 3, crop, crop) of the samples' images, in order."""
    import torch

    def one(sample: Sample) -> np.ndarray:
        if cache is not None:
            return cache.get(sample.path, preprocess, "image")
        img = _open(sample.path, "image")
        with _readable(sample.path, "image"):
            return preprocess.image(img)

    arrays = _map(one, list(samples), workers)
    if not arrays:
        return torch.empty((0, 3, preprocess.crop, preprocess.crop), dtype=torch.uint8)
    return torch.from_numpy(np.stack(arrays))


def load_masks(
    samples: Sequence[Sample],
    preprocess: Preprocess,
    cache: ImageCache | None = None,
    workers: int = 1,
) -> np.ndarray:
    """uint8 {0,1} array (N, crop, crop): each anomalous sample's mask, zeros for normals.

    Each mask is checked against its image's size (read from the header only).
    """

    def one(sample: Sample) -> np.ndarray:
        if sample.label == 0:
            return np.zeros((preprocess.crop, preprocess.crop), dtype=np.uint8)
        if sample.mask_path is None:
            raise DataError(
                f"anomalous image {sample.path} has no mask; add it under ground_truth/<defect>/"
            )
        _check_mask_size(sample, _image_size(sample.path, "image"))
        if cache is not None:
            return cache.get(sample.mask_path, preprocess, "mask")
        img = _open(sample.mask_path, "mask")
        with _readable(sample.mask_path, "mask"):
            return preprocess.mask(img)

    arrays = _map(one, list(samples), workers)
    if not arrays:
        return np.zeros((0, preprocess.crop, preprocess.crop), dtype=np.uint8)
    return np.stack(arrays)


def check_images(samples: Sequence[Sample]) -> None:
    """Header-only check, before training, that every image (and mask) opens and sizes agree."""
    for sample in samples:
        image_size = _image_size(sample.path, "image")
        if sample.label == 1 and sample.mask_path is not None:
            _check_mask_size(sample, image_size)
