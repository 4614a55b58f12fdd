"""Fake dataset trees with the published layouts and image counts.

Tests (and anyone trying the split tooling without downloading the data) use these: MVTec AD,
the raw VisA release and the converted VisA 1cls tree, either with tiny real images or with
empty files (enough for listing and splitting, where pixels are never read). File names follow
the real datasets, and the two VisA layouts use the same names, as the conversion script does.
"""

from __future__ import annotations

import csv
import io
import os
from collections.abc import Mapping
from pathlib import Path

import numpy as np
from PIL import Image

from datasets.mvtec import MVTEC_COUNTS
from datasets.visa import SPLIT_CSV, VISA_COUNTS

Counts = Mapping[str, tuple[int, int, int]]  # category -> (train, test good, test anomalous)


def _image_bytes(index: int, size: int, fmt: str, gray: bool = False) -> bytes:
    """A small distinct image: a gradient offset by ``index``."""
    ramp = (np.arange(size * size).reshape(size, size) * 7 + index * 13) % 256
    arr = ramp.astype(np.uint8)
    img = (
        Image.fromarray(arr, "L")
        if gray
        else Image.fromarray(np.stack([arr, arr[::-1], arr.T], -1))
    )
    buf = io.BytesIO()
    img.save(buf, format=fmt)
    return buf.getvalue()


def _mask_bytes(index: int, size: int, values: tuple[int, ...] = (255,)) -> bytes:
    arr = np.zeros((size, size), dtype=np.uint8)
    lo = index % max(1, size // 2)
    arr[lo : lo + max(1, size // 4), 1 : 1 + max(1, size // 3)] = values[index % len(values)]
    buf = io.BytesIO()
    Image.fromarray(arr, "L").save(buf, format="PNG")
    return buf.getvalue()


class _Writer:
    def __init__(self, content: bool, size: int):
        self.content = content
        self.size = size
        self.made: set[Path] = set()

    def put(self, path: Path, data_fn) -> None:
        if path.parent not in self.made:
            path.parent.mkdir(parents=True, exist_ok=True)
            self.made.add(path.parent)
        path.write_bytes(data_fn() if self.content else b"")


def write_fake_mvtec(
    root: str | os.PathLike,
    counts: Counts | None = None,
    content: bool = False,
    size: int = 8,
    defects: tuple[str, ...] = ("crack", "scratch"),
    gray: bool = False,
) -> Path:
    """An MVTec-layout tree (default: the 15 categories with their published counts)."""
    root = Path(root)
    w = _Writer(content, size)
    for category, (n_train, n_good, n_anomalous) in (counts or MVTEC_COUNTS).items():
        cat = root / category
        for i in range(n_train):
            w.put(
                cat / "train" / "good" / f"{i:03d}.png",
                lambda i=i: _image_bytes(i, size, "PNG", gray),
            )
        for i in range(n_good):
            w.put(
                cat / "test" / "good" / f"{i:03d}.png",
                lambda i=i: _image_bytes(i + 1, size, "PNG", gray),
            )
        for i in range(n_anomalous):
            defect, j = defects[i % len(defects)], i // len(defects)
            w.put(
                cat / "test" / defect / f"{j:03d}.png",
                lambda i=i: _image_bytes(i + 2, size, "PNG", gray),
            )
            w.put(
                cat / "ground_truth" / defect / f"{j:03d}_mask.png",
                lambda i=i: _mask_bytes(i, size),
            )
    return root


def _visa_names(n_train: int, n_good: int, n_anomalous: int):
    normals = [f"{i:04d}.JPG" for i in range(n_train + n_good)]
    return normals[:n_train], normals[n_train:], [f"{i:03d}.JPG" for i in range(n_anomalous)]


def write_fake_visa_raw(
    root: str | os.PathLike, counts: Counts | None = None, content: bool = False, size: int = 8
) -> Path:
    """The raw VisA release: images, multi-valued masks and ``split_csv/1cls.csv``."""
    root = Path(root)
    w = _Writer(content, size)
    rows = []
    for obj, (n_train, n_good, n_anomalous) in (counts or VISA_COUNTS).items():
        train, good, anomalous = _visa_names(n_train, n_good, n_anomalous)
        for split, names in (("train", train), ("test", good)):
            for i, name in enumerate(names):
                rel = f"{obj}/Data/Images/Normal/{name}"
                w.put(root / rel, lambda i=i: _image_bytes(i, size, "JPEG"))
                rows.append((obj, split, "normal", rel, ""))
        for i, name in enumerate(anomalous):
            rel = f"{obj}/Data/Images/Anomaly/{name}"
            mask = f"{obj}/Data/Masks/Anomaly/{Path(name).stem}.png"
            w.put(root / rel, lambda i=i: _image_bytes(i + 3, size, "JPEG"))
            w.put(root / mask, lambda i=i: _mask_bytes(i, size, values=(1, 7, 255)))
            rows.append((obj, "test", "anomaly", rel, mask))
    (root / SPLIT_CSV).parent.mkdir(parents=True, exist_ok=True)
    with open(root / SPLIT_CSV, "w", newline="", encoding="utf-8") as f:
        writer = csv.writer(f)
        writer.writerow(("object", "split", "label", "image", "mask"))
        writer.writerows(rows)
    return root


def write_fake_visa_converted(
    root: str | os.PathLike, counts: Counts | None = None, content: bool = False, size: int = 8
) -> Path:
    """The MVTec-style VisA 1cls tree: train/good, test/{good,bad}, ground_truth/bad/<stem>.png."""
    root = Path(root)
    w = _Writer(content, size)
    for obj, (n_train, n_good, n_anomalous) in (counts or VISA_COUNTS).items():
        train, good, anomalous = _visa_names(n_train, n_good, n_anomalous)
        for folder, names in (("train/good", train), ("test/good", good)):
            for i, name in enumerate(names):
                w.put(root / obj / folder / name, lambda i=i: _image_bytes(i, size, "JPEG"))
        for i, name in enumerate(anomalous):
            w.put(root / obj / "test" / "bad" / name, lambda i=i: _image_bytes(i + 3, size, "JPEG"))
            w.put(
                root / obj / "ground_truth" / "bad" / f"{Path(name).stem}.png",
                lambda i=i: _mask_bytes(i, size, values=(255,)),
            )
    return root
