"""MVTec AD layout loader, for MVTec AD itself and any folder laid out the same way.

Layout::

    <root>/<category>/train/good/*.png
    <root>/<category>/test/<good|defect>/*.png
    <root>/<category>/ground_truth/<defect>/<stem>_mask.png     (no masks for ``good``)

Every folder under ``<root>`` that holds ``train/good`` is a category, so people can point the
loader at their own data. Images and masks are paired by name, never by sorted order; a mask
named ``<stem>.png`` (as the converted VisA tree has it) is accepted too. Reading pixels is left
to :mod:`datasets.images`; here only names and existence are checked, which is cheap.
"""

from __future__ import annotations

import os
from pathlib import Path

from datasets.errors import DataError
from datasets.samples import CategoryData, Sample

# Extensions compared lower-case; VisA ships ``.JPG``.
IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff")
MASK_SUFFIXES = ("_mask", "")
# Published counts (train normal, test good, test anomalous) of MVTec AD, docs/protocol.md §1.
MVTEC_COUNTS: dict[str, tuple[int, int, int]] = {
    "bottle": (209, 20, 63), "cable": (224, 58, 92), "capsule": (219, 23, 109),
    "carpet": (280, 28, 89), "grid": (264, 21, 57), "hazelnut": (391, 40, 70),
    "leather": (245, 32, 92), "metal_nut": (220, 22, 93), "pill": (267, 26, 141),
    "screw": (320, 41, 119), "tile": (230, 33, 84), "toothbrush": (60, 12, 30),
    "transistor": (213, 60, 40), "wood": (247, 19, 60), "zipper": (240, 32, 119),
}  # fmt: skip


def is_image_file(path: Path) -> bool:
    return (
        path.is_file() and not path.name.startswith(".") and path.suffix.lower() in IMAGE_EXTENSIONS
    )


def image_files(folder: Path) -> list[Path]:
    """Image files directly inside ``folder``, sorted by name. A link with an image name whose
    target is gone is an error, not a file skipped in silence (the set would shrink)."""
    if not folder.is_dir():
        return []
    for p in folder.iterdir():
        if p.is_symlink() and not p.exists() and p.suffix.lower() in IMAGE_EXTENSIONS:
            raise DataError(f"{p} is a link to {os.readlink(p)}, which does not exist; restore "
                            f"the target or remove the link")
    return sorted((p for p in folder.iterdir() if is_image_file(p)), key=lambda p: p.name)


def check_root(root: Path, dataset: str) -> Path:
    """``root`` as a Path, or a DataError when it is not a folder."""
    root = Path(root).expanduser()
    if not root.is_dir():
        raise DataError(
            f"{dataset} data root {root} does not exist or is not a folder; "
            f"pass --data-root pointing at the folder that holds the category folders"
        )
    return root


def list_categories(root: Path, dataset: str = "mvtec") -> list[str]:
    """Names of the folders under ``root`` that hold ``train/good``, sorted."""
    root = check_root(root, dataset)
    found = sorted(p.name for p in root.iterdir() if p.is_dir() and (p / "train" / "good").is_dir())
    if not found:
        hint = ""
        if (root / "train" / "good").is_dir():
            hint = f" ({root} looks like a single category folder: pass its parent {root.parent})"
        raise DataError(
            f"no category folders with train/good found under {dataset} root {root}{hint}; "
            f"expected <root>/<category>/train/good/*.png"
        )
    return found


def unknown_category(dataset: str, root: Path, category: str, found: list[str]) -> DataError:
    return DataError(
        f"unknown {dataset} category {category!r} under {root}; found: {', '.join(found)}"
    )


def find_mask(gt_dir: Path, image: Path) -> Path | None:
    """The mask paired by name with ``image`` inside ``gt_dir`` (``<stem>_mask.*`` or ``<stem>.*``)."""
    for suffix in MASK_SUFFIXES:
        for ext in (".png", image.suffix, *IMAGE_EXTENSIONS):
            candidate = gt_dir / f"{image.stem}{suffix}{ext}"
            if candidate.is_file():
                return candidate
    return None


def load_category(root: Path, category: str, dataset: str = "mvtec") -> CategoryData:
    """Samples of one MVTec-layout category, with every anomalous test image paired to a mask."""
    root = check_root(root, dataset)
    cat_dir = root / category
    if not cat_dir.is_dir():
        try:
            found = list_categories(root, dataset)
        except DataError:
            found = []
        raise unknown_category(dataset, root, category, found or ["(none)"])
    train_dir = cat_dir / "train" / "good"
    train_files = image_files(train_dir)
    if not train_files:
        state = "has no images" if train_dir.is_dir() else "is missing"
        raise DataError(
            f"{train_dir} {state}; an MVTec-layout category needs its normal training images "
            f"in <category>/train/good"
        )

    def key(path: Path) -> str:
        return path.relative_to(root).as_posix()

    data = CategoryData(dataset=dataset, category=category, root=root)
    data.train = [Sample(p, 0, "good", None, "train", key(p)) for p in train_files]

    test_dir = cat_dir / "test"
    if not test_dir.is_dir():
        raise DataError(
            f"{test_dir} is missing; an MVTec-layout category needs test/good and test/<defect>"
        )
    for defect_dir in sorted((p for p in test_dir.iterdir() if p.is_dir()), key=lambda p: p.name):
        defect = defect_dir.name
        for image in image_files(defect_dir):
            if defect == "good":
                data.test.append(Sample(image, 0, "good", None, "test", key(image)))
                continue
            gt_dir = cat_dir / "ground_truth" / defect
            mask = find_mask(gt_dir, image)
            if mask is None:
                raise DataError(
                    f"anomalous test image {image} has no mask: expected "
                    f"{gt_dir / (image.stem + '_mask.png')}; add the mask or remove the image"
                )
            data.test.append(Sample(image, 1, defect, mask, "test", key(image)))
    data.test.sort(key=lambda s: s.key)
    if not data.test:
        raise DataError(f"{test_dir} holds no test images; expected test/good and test/<defect>")
    return data
