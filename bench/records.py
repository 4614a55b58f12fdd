"""The results store: one folder per run, holding an atomically written ``record.json``.

Layout::

    <results>/runs/<fingerprint>/record.json   the record (complete or absent, never partial)
    <results>/runs/<fingerprint>/scores.npz    image scores, labels, injected flags, small maps
    <results>/mlflow.db                        the default MLflow store (see bench.tracking)
    <results>/mlartifacts/                     that store's artifacts
    <results>/sweeps/<sweep>.json              every spec a sweep planned (see bench.report)
    <results>/report/                          the rendered report
    <results>/sweep.lock, sweep-owner.json     the lock one sweep at a time holds on the folder
    <results>/data-check.json                  files a sweep found decodable (see bench.driver)

A record is a JSON object::

    {
      "schema_version": 1,
      "fingerprint": "<sha256 hex of the canonical spec>",
      "status": "ok" | "failed",
      "error": null | {"type": str, "message": str, "traceback": str},
      "sweep": "<preset name>",                   # where it came from; not part of the spec
      "spec": {"method": "cdd", "config": {overrides}, "dataset": "mvtec",
               "category": "bottle", "noise_ratio": 0.1, "split_seed": 0, "train_seed": 0,
               "image_size": 224, "resize_size": 256, "teacher_weights": "imagenet"},
      "resolved_config": {every config field of the method},
      "metrics": {"no_overlap": {name: float}, "overlap": {name: float},
                  "train": {name: float}},            # METRIC_NAMES; NaN stored as null
      "split": {"n_train_normal", "n_injected", "n_test_no_overlap", "n_test_overlap",
                "realized_ratio", "manifest_sha256"},
      "timings": {"fit_s", "infer_images_per_s", "peak_mem_mb"},
      "environment": {"commit", "python", "packages": {...}, "device", "device_name"},
      "provenance": {method describe(): teacher weights id, backbone, ...},
      "history": {"<scalar name>": [value per epoch]},
      "diagnostics": {"<name>": [value per epoch]},   # e.g. CDD confidence AUROC vs injected
      "finished_at": "<ISO time>",
      "reused_from": "<fingerprint>",                # only on a copy (see bench.twins)
      "undefined_metrics": {protocol: {"metrics": [names], "reason": str}},  # only when some
                                                     # metric could not be computed
      "files": {"scores.npz": {"size": int, "sha256": hex}, "manifest.json": {...}}
    }

``files`` lists what the driver wrote beside the record, before the record itself; it makes
the record a done marker that can be checked (:func:`files_intact`).

``scores.npz`` arrays (all optional for readers; figures skip what is missing)::

    test_keys (N,) str, test_scores (N,) float32, test_labels (N,) uint8,
    in_no_overlap (N,) bool (False for the injected images, which only Overlap keeps),
    test_maps (N, h, w) float16 and test_masks (N, h, w) uint8 at reduced size (e.g. 64x64),
    test_images (N, h, w, 3) uint8 at the same reduced size,
    train_keys (M,) str, train_scores (M,) float32, train_injected (M,) bool

A run is done when its record's status is ``ok``, its ``metrics`` are present and the files
the record lists are on disk with the listed size and SHA-256 (:func:`is_done`). A record
written before records listed their files counts as done when its ``scores.npz`` and
``manifest.json`` are there and load whole.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import tempfile
import zipfile
import zlib
from collections.abc import Iterator, Mapping
from pathlib import Path, PurePath
from typing import Any

SCHEMA_VERSION = 1
RECORD_FILE = "record.json"
SCORES_FILE = "scores.npz"
MANIFEST_FILE = "manifest.json"
RUNS_DIR = "runs"
PROTOCOLS = ("no_overlap", "overlap")
# Every metric a record holds per protocol, in report order.
METRIC_NAMES = ("i_auroc", "p_auroc", "aupro", "pro_rd4ad", "i_ap", "p_ap", "i_f1max")


FILES_KEY = "files"
# The files a record written before FILES_KEY existed had beside it.
LEGACY_FILES = (SCORES_FILE, MANIFEST_FILE)


def run_dir(results: str | os.PathLike, fingerprint: str) -> Path:
    return Path(results) / RUNS_DIR / fingerprint


def write_bytes_atomic(path: str | os.PathLike, data: bytes) -> None:
    """Write ``data`` to ``path`` so that readers see the old file or the whole new one."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        # Ctrl-C or a full disk: leave nothing half-written behind.
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise


def json_ready(value: Any) -> Any:
    """A JSON-ready copy of ``value``: mappings with string keys, tuples as lists, paths as
    strings, numpy/torch scalars as numbers, and NaN/inf as null (they are not JSON)."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, Mapping):
        return {str(k): json_ready(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_ready(v) for v in value]
    if isinstance(value, PurePath):
        return str(value)
    if hasattr(value, "item") and callable(value.item) and getattr(value, "ndim", 1) == 0:
        return json_ready(value.item())  # numpy / torch scalars
    return value


def write_json_atomic(path: str | os.PathLike, obj: Any) -> None:
    text = json.dumps(json_ready(obj), indent=2, sort_keys=True, allow_nan=False)
    write_bytes_atomic(path, (text + "\n").encode("utf-8"))


def load_record(path: str | os.PathLike) -> dict | None:
    """A record, or None when the file is missing or unreadable (an interrupted run)."""
    try:
        with open(path, encoding="utf-8") as f:
            record = json.load(f)
    except (FileNotFoundError, json.JSONDecodeError, UnicodeDecodeError):
        return None
    return record if isinstance(record, dict) else None


def is_complete(record: dict | None) -> bool:
    """The record says the run finished (status ok, metrics present); its files are checked
    by :func:`is_done`."""
    return bool(
        record
        and record.get("schema_version") == SCHEMA_VERSION
        and record.get("status") == "ok"
        and isinstance(record.get("metrics"), dict)
    )


def file_sha256(path: str | os.PathLike) -> str:
    """SHA-256 of a file's bytes (hex), read in 1 MiB blocks."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def file_entry(data: bytes) -> dict[str, Any]:
    """What a record lists of one file it has beside it: size and SHA-256 of ``data``."""
    return {"size": len(data), "sha256": hashlib.sha256(data).hexdigest()}


def files_intact(folder: str | os.PathLike, record: Mapping[str, Any]) -> bool:
    """Whether every file ``record`` lists is in ``folder`` with its listed size and SHA-256.

    A record without the list (written by an older version) passes when its ``scores.npz``
    loads whole (every array decompresses, zip CRCs checked) and its ``manifest.json`` parses.
    """
    folder = Path(folder)
    files = record.get(FILES_KEY)
    if files is None:
        return _legacy_files_load(folder)
    if not isinstance(files, Mapping):
        return False
    for name, entry in files.items():
        path = folder / str(name)
        if (PurePath(str(name)).name != str(name) or not isinstance(entry, Mapping)
                or not path.is_file()):
            return False
        try:
            if path.stat().st_size != entry.get("size") or file_sha256(path) != entry.get("sha256"):
                return False
        except OSError:
            return False
    return True


def _legacy_files_load(folder: Path) -> bool:
    import numpy as np

    try:
        with np.load(folder / SCORES_FILE, allow_pickle=False) as data:
            for key in data.files:
                data[key]  # decompresses and checks the member's CRC
        json.loads((folder / MANIFEST_FILE).read_text(encoding="utf-8"))
    except (OSError, ValueError, EOFError, KeyError, zipfile.BadZipFile, zlib.error):
        return False
    return True


def is_done(folder: str | os.PathLike, record: dict | None) -> bool:
    """A complete record whose files are whole: the run need not run again."""
    return is_complete(record) and files_intact(folder, record)


def iter_records(results: str | os.PathLike) -> Iterator[dict]:
    """Every readable record under ``results`` (complete or failed), in a stable order."""
    base = Path(results) / RUNS_DIR
    if not base.is_dir():
        return
    for path in sorted(base.glob(f"*/{RECORD_FILE}")):
        record = load_record(path)
        if record is not None:
            yield record


def load_records(results: str | os.PathLike, include_failed: bool = False) -> list[dict]:
    """Complete records under ``results`` (and failed ones too when asked)."""
    return [r for r in iter_records(results) if is_complete(r) or (include_failed and r)]
