"""VisA loader: the raw release and the converted MVTec-style ``1cls`` tree, detected automatically.

Raw release: ``<root>/split_csv/1cls.csv`` with columns ``object,split,label,image,mask``
(``split`` train/test, ``label`` normal/anomaly, paths relative to ``<root>``). When that file
exists the raw layout is used; otherwise ``<root>`` is read as the converted tree
``<root>/<obj>/{train/good, test/{good,bad}, ground_truth/bad}`` with the MVTec loader.
VisA masks are multi-valued; :mod:`datasets.images` treats any non-zero pixel as anomalous.
Anomalous samples get the defect name ``bad`` in both layouts.
"""

from __future__ import annotations

import csv
from pathlib import Path

from datasets import mvtec
from datasets.errors import DataError
from datasets.samples import CategoryData, Sample

SPLIT_CSV = Path("split_csv") / "1cls.csv"
CSV_COLUMNS = ("object", "split", "label", "image", "mask")
# Published 1cls counts (train normal, test normal, test anomalous), docs/protocol.md §1.
VISA_COUNTS: dict[str, tuple[int, int, int]] = {
    "candle": (900, 100, 100), "capsules": (542, 60, 100), "cashew": (450, 50, 100),
    "chewinggum": (453, 50, 100), "fryum": (450, 50, 100), "macaroni1": (900, 100, 100),
    "macaroni2": (900, 100, 100), "pcb1": (904, 100, 100), "pcb2": (901, 100, 100),
    "pcb3": (905, 101, 100), "pcb4": (904, 101, 100), "pipe_fryum": (450, 50, 100),
}  # fmt: skip


def is_raw(root: Path) -> bool:
    return (Path(root) / SPLIT_CSV).is_file()


def _read_rows(root: Path) -> list[dict[str, str]]:
    path = root / SPLIT_CSV
    try:
        with open(path, newline="", encoding="utf-8") as f:
            reader = csv.DictReader(f)
            missing = [c for c in CSV_COLUMNS if c not in (reader.fieldnames or [])]
            if missing:
                raise DataError(
                    f"{path} lacks column(s) {', '.join(missing)}; expected the VisA 1cls split "
                    f"file with columns {','.join(CSV_COLUMNS)}"
                )
            return [{k: (v or "").strip() for k, v in row.items() if k} for row in reader]
    except (OSError, UnicodeDecodeError, csv.Error) as err:
        raise DataError(f"cannot read {path}: {err}; restore the VisA split_csv folder") from None


def list_categories(root: Path) -> list[str]:
    root = mvtec.check_root(root, "visa")
    if not is_raw(root):
        return mvtec.list_categories(root, "visa")
    found = sorted({row["object"] for row in _read_rows(root) if row["object"]})
    if not found:
        raise DataError(f"{root / SPLIT_CSV} lists no images; restore the VisA split file")
    return found


def load_category(root: Path, category: str) -> CategoryData:
    root = mvtec.check_root(root, "visa")
    if not is_raw(root):
        return mvtec.load_category(root, category, "visa")
    csv_path = root / SPLIT_CSV
    rows = _read_rows(root)
    found = sorted({row["object"] for row in rows if row["object"]})
    if category not in found:
        raise mvtec.unknown_category("visa", root, category, found or ["(none)"])
    data = CategoryData(dataset="visa", category=category, root=root)
    # Row numbers in messages count the header as line 1, as a spreadsheet shows them.
    for line, row in enumerate(rows, start=2):
        if row["object"] != category:
            continue
        split, label = row["split"].lower(), row["label"].lower()
        if split not in ("train", "test") or label not in ("normal", "anomaly"):
            raise DataError(
                f"{csv_path} line {line}: split {row['split']!r} / label {row['label']!r} not "
                f"understood; expected train|test and normal|anomaly"
            )
        image = root / row["image"]
        if not image.is_file():
            raise DataError(
                f"{csv_path} line {line} names {image}, which does not exist; "
                f"check that --data-root is the VisA root"
            )
        key = Path(row["image"]).as_posix()
        if label == "normal":
            sample = Sample(image, 0, "good", None, split, key)
        else:
            mask = root / row["mask"] if row["mask"] else None
            if mask is None or not mask.is_file():
                raise DataError(
                    f"anomalous image {image} has no mask"
                    + (f" ({mask} does not exist)" if mask is not None else "")
                    + f" ({csv_path} line {line}); restore the mask or drop the row"
                )
            if split == "train":
                raise DataError(
                    f"{csv_path} line {line}: anomalous image {image} is in the train split; "
                    f"the 1cls split trains on normal images only"
                )
            sample = Sample(image, 1, "bad", mask, split, key)
        (data.train if split == "train" else data.test).append(sample)
    if not data.train:
        raise DataError(f"{csv_path} lists no training images for {category!r}")
    data.train.sort(key=lambda s: s.key)
    data.test.sort(key=lambda s: s.key)
    return data
