"""Datasets: MVTec AD, VisA, any MVTec-layout folder, the synthetic generator, the image
pipeline and noisy splits with manifests.

``dataset`` names: ``mvtec`` (MVTec AD or any folder in its layout), ``visa`` (raw release or
converted 1cls tree, detected) and ``synthetic`` (the MVTec-layout tree that
:func:`generate_synthetic` writes). See ``docs/datasets.md``.
"""

from __future__ import annotations

import os
from pathlib import Path

from datasets import mvtec, visa
from datasets.check import CheckResult, DecodeVerdicts, check_category
from datasets.errors import DataError
from datasets.images import (
    ImageCache,
    Preprocess,
    check_images,
    file_sha256,
    load_images,
    load_masks,
)
from datasets.samples import CategoryData, Sample
from datasets.splits import (
    InfeasibleRatio,
    Split,
    largest_feasible_ratio,
    load_split,
    make_split,
    manifest_path,
    read_manifest,
    requested_count,
    verify_manifest,
    write_manifest,
)
from datasets.synthetic import SYNTHETIC_CATEGORIES, generate_synthetic

# Name -> one-line description (shown by `run_benchmark.py list`).
DATASETS: dict[str, str] = {
    "mvtec": "MVTec AD layout: <root>/<category>/{train/good,test/<defect>,ground_truth/<defect>}; "
    "any category folder under the root",
    "visa": "VisA: raw release (<root>/split_csv/1cls.csv) or the converted MVTec-style 1cls tree, "
    "detected automatically",
    "synthetic": "synthetic MVTec-layout tree written by `run_benchmark.py synth` "
    "(textures brick/grass/gravel, objects nut/screw)",
}

__all__ = [
    "DATASETS", "CategoryData", "CheckResult", "DataError", "DecodeVerdicts", "ImageCache",
    "InfeasibleRatio", "Preprocess", "Sample", "Split", "SYNTHETIC_CATEGORIES",
    "check_category", "check_images", "file_sha256", "generate_synthetic",
    "largest_feasible_ratio", "list_categories", "load_category", "load_images", "load_masks",
    "load_split", "make_split", "manifest_path", "read_manifest", "requested_count",
    "verify_manifest", "write_manifest",
]  # fmt: skip


def _check_dataset(dataset: str) -> str:
    if dataset not in DATASETS:
        raise DataError(f"unknown dataset {dataset!r}; known datasets: {', '.join(DATASETS)}")
    return dataset


def list_categories(dataset: str, root: str | os.PathLike) -> list[str]:
    """Category names found under ``root`` for ``dataset``, sorted."""
    if _check_dataset(dataset) == "visa":
        return visa.list_categories(Path(root))
    return mvtec.list_categories(Path(root), dataset)


def load_category(dataset: str, root: str | os.PathLike, category: str) -> CategoryData:
    """Every sample of one category (names and pairing checked; pixels are read later)."""
    if (not isinstance(category, str) or category in ("", ".", "..")
            or any(c in category for c in "/\\\0")):
        raise DataError(f"category {category!r} is not a folder name under {root}; give the "
                        f"name of one category folder (run `run_benchmark.py list --dataset "
                        f"{dataset} --data-root {root}`)")
    if _check_dataset(dataset) == "visa":
        return visa.load_category(Path(root), category)
    return mvtec.load_category(Path(root), category, dataset)
