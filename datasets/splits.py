"""Noisy (FUAD) splits and their manifests.

The rule is SoftPatch's (docs/protocol.md §2): ``floor(noise_ratio × n_normal_train)`` anomalous *test*
images, drawn uniformly without replacement, join the unchanged normal training set unlabeled.
*No overlap* removes the injected images from the test set; *Overlap* keeps the test set whole.

Unlike the reference code the draw is a pure function of (dataset, category, noise_ratio, seed):
every anomalous image gets a rank ``sha256(dataset|category|seed|identity)`` and the ``n`` lowest
ranks are injected. That is one seeded permutation taken first-``n``, so for a fixed seed the
draws are nested across ratios, and it does not depend on file-system order, Python's ``hash``
or a library's random stream. The identity is the image's path inside its category (for VisA its
file name, so the raw release and the converted tree give the same draw).

A split is written as a JSON manifest listing every file with its SHA-256, so it can be checked
against the data (:func:`verify_manifest`) and shared between labs (:func:`load_split`).
"""

from __future__ import annotations

import hashlib
import json
import math
import numbers
import os
from dataclasses import dataclass
from decimal import Decimal
from pathlib import Path, PurePosixPath
from typing import Any

from bench.records import write_bytes_atomic
from datasets.errors import DataError
from datasets.images import cached_file_sha256, file_sha256
from datasets.samples import CategoryData, Sample

MANIFEST_SCHEMA = 1
RULE = (
    "softpatch: inject floor(noise_ratio x n_train_normal) anomalous test images, uniform "
    "without replacement (ranked by sha256(dataset|category|seed|identity)); no_overlap drops "
    "them from the test set, overlap keeps it whole"
)
_GROUPS = ("train", "test_no_overlap", "test_overlap")


@dataclass(frozen=True)
class Split:
    """One noisy split of a category. ``injected`` is parallel to ``train``."""

    dataset: str
    category: str
    noise_ratio: float
    seed: int
    train: list[Sample]
    injected: list[bool]
    test_no_overlap: list[Sample]
    test_overlap: list[Sample]
    requested: int  # floor(noise_ratio * n_train_normal), before any cap
    n_injected: int
    realized_ratio: float  # n_injected / n_train_normal
    capped: bool
    root: Path | None = None

    @property
    def n_train_normal(self) -> int:
        return len(self.train) - self.n_injected

    def summary(self) -> dict[str, Any]:
        """Counts for records and tables."""
        return {
            "n_train_normal": self.n_train_normal,
            "n_injected": self.n_injected,
            "n_test_no_overlap": len(self.test_no_overlap),
            "n_test_overlap": len(self.test_overlap),
            "requested": self.requested,
            "realized_ratio": self.realized_ratio,
            "capped": self.capped,
        }


def requested_count(noise_ratio: float, n_normal: int) -> int:
    """floor(noise_ratio × n_normal), reading the ratio as the decimal it was written as.

    Plain float arithmetic would give floor(0.29 × 100) = 28; the decimal reading gives 29.
    """
    return math.floor(Decimal(repr(float(noise_ratio))) * n_normal)


def largest_feasible_ratio(n_anomalous: int, n_normal: int) -> str:
    """The largest ratio (2 decimals, more if needed) whose floor count fits ``n_anomalous``."""
    for decimals in range(2, 7):
        scale = 10**decimals
        k = ((n_anomalous + 1) * scale - 1) // n_normal  # largest k: floor(k*n/scale) <= A
        if k > 0:
            return f"{min(k, scale - 1) / scale:.{decimals}f}"
    return "0"


def _check_ratio(noise_ratio: Any, where: str) -> float:
    try:
        ratio = float(noise_ratio)
    except (TypeError, ValueError):
        raise DataError(f"{where}: noise ratio {noise_ratio!r} is not a number") from None
    if isinstance(noise_ratio, bool) or not (0.0 <= ratio < 1.0) or not math.isfinite(ratio):
        raise DataError(f"{where}: noise ratio {noise_ratio!r} must be in [0, 1), e.g. 0.1")
    return ratio


class InfeasibleRatio(DataError):
    """A noise ratio that asks for more anomalous test images than the category has.

    The message says what to do; callers with their own way out (the ``splits`` command's
    ``--cap``, ``run``'s ``--noise-ratios``) replace that part with :meth:`with_advice`.
    """

    def __init__(self, where: str, ratio: float, requested: int, available: int, n_normal: int,
                 advice: str | None = None):
        self.where, self.ratio, self.requested = where, ratio, requested
        self.available, self.n_normal = available, n_normal
        self.largest = largest_feasible_ratio(available, n_normal)
        if not available:
            text = (f"{where}: noise ratio {ratio:g} asks for {requested} anomalous images but "
                    f"the test set has none to inject; "
                    f"{advice or 'use noise ratio 0 for this category (or add anomalous test images)'}")
        else:
            text = (f"{where}: noise ratio {ratio:g} asks for {requested} anomalous images "
                    f"(floor({ratio:g} x {n_normal} normal training images)) but only "
                    f"{available} exist; the largest feasible ratio is {self.largest} "
                    f"({advice or 'lower the ratio'})")
        super().__init__(text)

    def with_advice(self, advice: str) -> InfeasibleRatio:
        """The same error, saying ``advice`` (``{largest}`` and ``{available}`` are filled in)
        as what to do; with nothing to inject, the advice for that case is kept."""
        if not self.available:
            return self
        return InfeasibleRatio(self.where, self.ratio, self.requested, self.available,
                               self.n_normal, advice.format(largest=self.largest,
                                                            available=self.available))


def draw_identity(dataset: str, sample: Sample) -> str:
    """The name a sample is ranked by: layout-independent for VisA, path-in-category otherwise."""
    parts = PurePosixPath(sample.key).parts
    if dataset == "visa":
        return parts[-1]
    return "/".join(parts[1:]) if len(parts) > 1 else sample.key


def _rank(seed_key: str, identity: str) -> str:
    return hashlib.sha256(f"{seed_key}|{identity}".encode()).hexdigest()


def make_split(data: CategoryData, noise_ratio: float, seed: int, cap: bool = False) -> Split:
    """The noisy split of ``data`` at ``noise_ratio`` for ``seed`` (pure; nested across ratios).

    An infeasible ratio raises DataError unless ``cap`` is set, which injects every anomalous
    test image and records ``capped`` and the realized ratio.
    """
    where = f"{data.dataset}/{data.category}"
    ratio = _check_ratio(noise_ratio, where)
    if isinstance(seed, bool) or not isinstance(seed, numbers.Integral):
        raise DataError(f"{where}: split seed {seed!r} must be an integer")
    seed = int(seed)  # numpy integers too; the hash input must not depend on the type
    normals = sorted(data.train, key=lambda s: s.key)
    if any(s.label != 0 for s in normals):
        raise DataError(f"{where}: the training set holds anomalous images; it must be normal only")
    test = sorted(data.test, key=lambda s: s.key)
    anomalous = [s for s in test if s.label == 1]
    n_normal = len(normals)
    requested = requested_count(ratio, n_normal)
    capped = False
    if requested > len(anomalous):
        if not cap or not anomalous:
            raise InfeasibleRatio(where, ratio, requested, len(anomalous), n_normal)
        capped = True
    n_injected = min(requested, len(anomalous))

    seed_key = f"fuad-split-v1|{data.dataset}|{data.category}|{seed}"
    order = sorted(
        anomalous, key=lambda s: (_rank(seed_key, draw_identity(data.dataset, s)), s.key)
    )
    injected_keys = {s.key for s in order[:n_injected]}
    chosen = [s for s in anomalous if s.key in injected_keys]
    # Mix the injected images among the normals (seeded), so position in the training set says
    # nothing about which images are anomalous.
    train = sorted(normals + chosen, key=lambda s: _rank(seed_key + "|order", s.key))
    return Split(
        dataset=data.dataset,
        category=data.category,
        noise_ratio=ratio,
        seed=seed,
        train=train,
        injected=[s.key in injected_keys for s in train],
        test_no_overlap=[s for s in test if s.key not in injected_keys],
        test_overlap=test,
        requested=requested,
        n_injected=n_injected,
        realized_ratio=n_injected / n_normal,
        capped=capped,
        root=Path(data.root),
    )


# --------------------------------------------------------------------------------------------
# Manifests


def manifest_path(
    out_dir: str | os.PathLike, dataset: str, category: str, noise_ratio: float, seed: int
) -> Path:
    """Where the CLI writes a split's manifest: ``<out>/<dataset>/<category>/noise<r>_seed<s>.json``."""
    return Path(out_dir) / dataset / category / f"noise{float(noise_ratio):g}_seed{int(seed)}.json"


def _sha256(path: Path) -> str:
    try:
        return cached_file_sha256(path)
    except FileNotFoundError:
        raise DataError(f"{path} does not exist; restore it or reload the dataset") from None


def _relative(path: Path, root: Path) -> str:
    try:
        return Path(path).relative_to(root).as_posix()
    except ValueError:
        raise DataError(
            f"{path} is not under the data root {root}; masks must live under it"
        ) from None


def _entry(sample: Sample, root: Path) -> dict[str, Any]:
    entry = {
        "key": sample.key,
        "label": sample.label,
        "defect": sample.defect,
        "split": sample.split,
        "sha256": _sha256(sample.path),
        "mask": None,
        "mask_sha256": None,
    }
    if sample.mask_path is not None:
        entry["mask"] = _relative(sample.mask_path, root)
        entry["mask_sha256"] = _sha256(sample.mask_path)
    return entry


def manifest_dict(split: Split) -> dict[str, Any]:
    """The manifest of ``split``: machine-independent (keys, not absolute paths; no timestamps)."""
    if split.root is None:
        raise ValueError("Split.root is needed to write a manifest")
    root = Path(split.root)
    train = []
    for sample, injected in zip(split.train, split.injected):
        train.append({**_entry(sample, root), "injected": bool(injected)})
    return {
        "schema_version": MANIFEST_SCHEMA,
        "rule": RULE,
        "dataset": split.dataset,
        "category": split.category,
        "noise_ratio": split.noise_ratio,
        "seed": split.seed,
        **split.summary(),
        "train": train,
        "test_no_overlap": [_entry(s, root) for s in split.test_no_overlap],
        "test_overlap": [_entry(s, root) for s in split.test_overlap],
    }


def manifest_bytes(split: Split) -> bytes:
    return (json.dumps(manifest_dict(split), indent=1, sort_keys=True) + "\n").encode("utf-8")


def write_manifest(split: Split, path: str | os.PathLike) -> str:
    """Write the manifest atomically; returns its SHA-256 (the ``manifest_sha256`` of records)."""
    data = manifest_bytes(split)
    write_bytes_atomic(path, data)
    return hashlib.sha256(data).hexdigest()


def read_manifest(path: str | os.PathLike) -> dict[str, Any]:
    """A manifest as a dict, or a DataError saying why it cannot be used."""
    path = Path(path)
    try:
        with open(path, encoding="utf-8") as f:
            manifest = json.load(f)
    except FileNotFoundError:
        raise DataError(
            f"split manifest {path} does not exist; write it with the splits command"
        ) from None
    except (json.JSONDecodeError, UnicodeDecodeError, OSError) as err:
        raise DataError(
            f"split manifest {path} is not valid JSON ({err}); write it again"
        ) from None
    if not isinstance(manifest, dict) or manifest.get("schema_version") != MANIFEST_SCHEMA:
        raise DataError(
            f"split manifest {path} has schema {manifest.get('schema_version') if isinstance(manifest, dict) else None!r}, "
            f"expected {MANIFEST_SCHEMA}; write it again with this version"
        )
    missing = [
        k for k in ("dataset", "category", "noise_ratio", "seed", *_GROUPS) if k not in manifest
    ]
    if missing:
        raise DataError(f"split manifest {path} lacks {', '.join(missing)}; write it again")
    check_manifest(manifest, f"split manifest {path}")
    return manifest


def check_manifest(manifest: dict[str, Any], where: str = "split manifest") -> None:
    """Raise a one-line DataError for a manifest field of the wrong type or a path that could
    leave the data root (absolute, ``..``, a drive or a backslash): a manifest may come from
    elsewhere, and :func:`verify_manifest` must never read, or report on, files outside it."""

    def bad(field: str, value: Any, expected: str) -> DataError:
        return DataError(f"{where}: {field} is {value!r}, expected {expected}; write the "
                         f"manifest again with the splits command")

    for key in ("dataset", "category"):
        if not isinstance(manifest[key], str) or not manifest[key]:
            raise bad(key, manifest[key], "a non-empty string")
    if not _is_plain_name(manifest["category"]):
        raise bad("category", manifest["category"], "a folder name (no '/', '\\' or '..')")
    ratio = manifest["noise_ratio"]
    if isinstance(ratio, bool) or not isinstance(ratio, (int, float)) or not (
            math.isfinite(ratio) and 0 <= ratio < 1):
        raise bad("noise_ratio", ratio, "a number in [0, 1)")
    if isinstance(manifest["seed"], bool) or not isinstance(manifest["seed"], int):
        raise bad("seed", manifest["seed"], "an integer")
    for group in _GROUPS:
        entries = manifest[group]
        if not isinstance(entries, list):
            raise bad(group, type(entries).__name__, "a list of file entries")
        for i, entry in enumerate(entries):
            at = f"{group}[{i}]"
            if not isinstance(entry, dict):
                raise bad(at, entry, "an object with key, sha256, label, ...")
            for field in ("key", "sha256"):
                if not isinstance(entry.get(field), str) or not entry.get(field):
                    raise bad(f"{at}.{field}", entry.get(field), "a non-empty string")
            _check_relative(entry["key"], f"{where}: {at}.key")
            if entry.get("label") not in (0, 1) or isinstance(entry.get("label"), bool):
                raise bad(f"{at}.label", entry.get("label"), "0 (normal) or 1 (anomalous)")
            for field in ("defect", "split"):
                if field in entry and not isinstance(entry[field], str):
                    raise bad(f"{at}.{field}", entry[field], "a string")
            if entry.get("mask") is not None:
                if not isinstance(entry["mask"], str):
                    raise bad(f"{at}.mask", entry["mask"], "a path string or null")
                _check_relative(entry["mask"], f"{where}: {at}.mask")
                if not isinstance(entry.get("mask_sha256"), str):
                    raise bad(f"{at}.mask_sha256", entry.get("mask_sha256"), "a sha256 string")
            if group == "train" and not isinstance(entry.get("injected", False), bool):
                raise bad(f"{at}.injected", entry.get("injected"), "true or false")


def _is_plain_name(name: str) -> bool:
    return name not in ("", ".", "..") and not any(c in name for c in "/\\:\0")


def _check_relative(key: str, where: str) -> None:
    """``key`` must be a relative POSIX path that stays inside the folder it is joined to."""
    parts = PurePosixPath(key).parts
    if (not parts or key.startswith("/") or "\\" in key or "\0" in key or ":" in parts[0]
            or any(p in ("..", ".") for p in parts)):
        raise DataError(f"{where} is {key!r}: a manifest path must be relative to the data "
                        f"root, without '..' or a drive; the manifest is refused")


def _manifest_files(manifest: dict[str, Any]):
    seen = set()
    for group in _GROUPS:
        for entry in manifest[group]:
            for key, digest in (
                (entry["key"], entry["sha256"]),
                (entry.get("mask"), entry.get("mask_sha256")),
            ):
                if key is not None and key not in seen:
                    seen.add(key)
                    yield key, digest


def verify_manifest(manifest: dict[str, Any] | str | os.PathLike, root: str | os.PathLike) -> int:
    """Re-hash every file a manifest lists under ``root``; returns how many were checked.

    The first missing or changed file raises a one-line DataError.
    """
    where = "split manifest"
    if not isinstance(manifest, dict):
        where = f"split manifest {manifest}"
        manifest = read_manifest(manifest)
    check_manifest(manifest, where)
    root = Path(root)
    count = 0
    for key, expected in _manifest_files(manifest):
        path = root / key
        if not path.is_file():
            raise DataError(
                f"{where}: {key} is missing under {root}; restore the data or re-make the split"
            )
        found = file_sha256(path)
        if found != expected:
            raise DataError(
                f"{where}: {path} has sha256 {found[:12]}..., the manifest says {expected[:12]}...; "
                f"the data changed since the split was made (restore it or re-make the split)"
            )
        count += 1
    return count


def load_split(path: str | os.PathLike, root: str | os.PathLike, verify: bool = True) -> Split:
    """Rebuild the :class:`Split` a manifest describes, against the data under ``root``."""
    manifest = read_manifest(path)  # checked: every path stays under ``root``
    root = Path(root)
    if verify:
        verify_manifest(manifest, root)

    def sample(entry: dict[str, Any]) -> Sample:
        mask = root / entry["mask"] if entry.get("mask") else None
        return Sample(
            root / entry["key"],
            int(entry["label"]),
            entry["defect"],
            mask,
            entry.get("split", "test"),
            entry["key"],
        )

    train = [sample(e) for e in manifest["train"]]
    injected = [bool(e.get("injected", False)) for e in manifest["train"]]
    n_injected = sum(injected)
    return Split(
        dataset=manifest["dataset"],
        category=manifest["category"],
        noise_ratio=float(manifest["noise_ratio"]),
        seed=int(manifest["seed"]),
        train=train,
        injected=injected,
        test_no_overlap=[sample(e) for e in manifest["test_no_overlap"]],
        test_overlap=[sample(e) for e in manifest["test_overlap"]],
        requested=int(manifest.get("requested", n_injected)),
        n_injected=n_injected,
        realized_ratio=n_injected / max(1, len(train) - n_injected),
        capped=bool(manifest.get("capped", False)),
        root=root,
    )
