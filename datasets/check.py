"""Check a category's data before anything trains on it: the splits can be drawn and every
file the runs read decodes at their geometry.

A run reads every training image and every test image of its category (the Overlap protocol
scores the whole test set) and the masks of the anomalous test images, so checking a category
for a set of runs is: draw each (noise ratio, split seed) the runs need (pure and cheap; an
infeasible ratio or nothing to inject stops here), build each geometry (a crop of 0 or larger
than the resize stops here), then decode each image and mask as the runs will
(:class:`datasets.images.ImageCache`), the mask checked against its image's size.

Decoding is the costly part, so verdicts are remembered (:class:`DecodeVerdicts`): a file whose
path, size, modification and change times are those of a file that decoded before is not
decoded again. A file that failed is never remembered, so it fails again, at once.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import PIL

from bench.records import write_bytes_atomic
from datasets.errors import DataError
from datasets.images import (
    ImageCache,
    Preprocess,
    _check_mask_size,
    _image_size,
    _open,
    _readable,
    to_rgb8,
)
from datasets.samples import CategoryData, Sample
from datasets.splits import make_split

# Bumped when what "decodes" means changes (e.g. 16-bit images read differently): verdicts of
# another version, or of another PIL, are not trusted.
DECODER_VERSION = 2


def _decoder_id() -> str:
    return f"fuad-decode-v{DECODER_VERSION}/pillow-{PIL.__version__}"


def _stat_key(path: Path) -> str:
    st = os.stat(path)
    return f"{Path(path).resolve()}|{st.st_size}|{st.st_mtime_ns}|{st.st_ctime_ns}"


class DecodeVerdicts:
    """Samples that decoded before, remembered in a JSON file (``path``) or only in memory.

    A sample's key covers its image and, for an anomalous one, its mask (path, size, mtime and
    ctime of each), so changing either file, or the decoder, makes it checked again.
    """

    def __init__(self, path: str | os.PathLike | None = None):
        self.path = Path(path) if path is not None else None
        self._ok: set[str] = set()
        self._new = False
        if self.path is not None:
            try:
                data = json.loads(self.path.read_text(encoding="utf-8"))
                if isinstance(data, dict) and data.get("decoder") == _decoder_id():
                    self._ok = {str(k) for k in data.get("ok", [])}
            except (OSError, ValueError):
                pass  # absent or damaged: everything is checked again

    def __len__(self) -> int:
        return len(self._ok)

    @staticmethod
    def key(sample: Sample) -> str:
        key = _stat_key(sample.path)
        if sample.label == 1 and sample.mask_path is not None:
            key += "+" + _stat_key(sample.mask_path)
        return key

    def known(self, sample: Sample) -> bool:
        try:
            return self.key(sample) in self._ok
        except OSError:
            return False  # missing: the decode says so, naming the file

    def add(self, sample: Sample) -> None:
        try:
            key = self.key(sample)
        except OSError:
            return
        if key not in self._ok:
            self._ok.add(key)
            self._new = True

    def save(self) -> None:
        """Write the verdicts (atomically) when something was added."""
        if self.path is None or not self._new:
            return
        text = json.dumps({"decoder": _decoder_id(), "ok": sorted(self._ok)}, indent=0)
        write_bytes_atomic(self.path, (text + "\n").encode("utf-8"))
        self._new = False


@dataclass(frozen=True)
class CheckResult:
    """What :func:`check_category` looked at."""

    samples: int  # images the runs read
    decoded: int  # of those, decoded now (the others had a verdict)


def check_category(data: CategoryData, splits: Iterable[tuple[float, int]],
                   geometries: Iterable[tuple[int, int]], *, verdicts: DecodeVerdicts | None = None,
                   cache: ImageCache | None = None, workers: int = 1,
                   infeasible_advice: str | None = None) -> CheckResult:
    """Raise a one-line :class:`DataError` (or :class:`bench.errors.UserError` for a geometry)
    for the first problem the runs on ``data`` would meet; see the module docstring.

    ``splits`` are (noise ratio, split seed) pairs and ``geometries`` (resize, crop) pairs; with
    no geometry, files are decoded at their own size (the ``splits`` command).
    ``cache`` receives the decoded arrays (a local sweep's runs then read them from memory);
    ``infeasible_advice`` replaces what an infeasible ratio's message says to do.
    """
    from datasets.splits import InfeasibleRatio

    for ratio, seed in sorted(set(splits)):
        try:
            make_split(data, ratio, seed)
        except InfeasibleRatio as err:
            raise err.with_advice(infeasible_advice) if infeasible_advice else err from None
    preprocesses = [Preprocess(resize=int(r), crop=int(c)) for r, c in sorted(set(geometries))]
    samples = list(data.train) + list(data.test)
    pending = [s for s in samples if verdicts is None or not verdicts.known(s)]
    cache = cache if cache is not None else ImageCache(max_memory_mb=0)
    _decode_all(pending, preprocesses, cache, workers)
    if verdicts is not None:
        for sample in pending:
            verdicts.add(sample)
    return CheckResult(samples=len(samples), decoded=len(pending))


def _decode_all(samples: Sequence[Sample], preprocesses: Sequence[Preprocess],
                cache: ImageCache, workers: int) -> None:
    """Decode every sample (and mask) at every geometry, or at its own size when no geometry
    is given; the first failure in sample order is raised (so the message does not depend on
    thread timing)."""

    def one(sample: Sample) -> DataError | None:
        try:
            if sample.label == 1:
                if sample.mask_path is None:
                    raise DataError(f"anomalous image {sample.path} has no mask; add it under "
                                    f"ground_truth/<defect>/")
                _check_mask_size(sample, _image_size(sample.path, "image"))
            if not preprocesses:
                _decode_native(sample)
            for preprocess in preprocesses:
                cache.get(sample.path, preprocess, "image")
                if sample.label == 1:
                    cache.get(sample.mask_path, preprocess, "mask")
        except DataError as err:
            return err
        return None

    if workers <= 1 or len(samples) < 2:
        for sample in samples:
            error = one(sample)
            if error is not None:
                raise error
        return
    with ThreadPoolExecutor(max_workers=workers) as pool:
        for error in pool.map(one, samples):
            if error is not None:
                raise error


def _decode_native(sample: Sample) -> None:
    """Decode an image (and its mask) as the pipeline reads them, without resizing."""
    img = _open(sample.path, "image")
    with _readable(sample.path, "image"):
        to_rgb8(img)
    if sample.label == 1 and sample.mask_path is not None:
        _open(sample.mask_path, "mask")
