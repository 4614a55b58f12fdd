"""Writes the golden records with scores.npz under tests/data/report/results_uncertainty (rerun
only to change them; then review the rendered tables by hand before copying them to
expected/uncertainty/).

MVTec AD at noise 0.1, 64 px, random teacher: RD, SoftPatch and CDD (two seeds) on bottle and
cable. Each run's test set is 16 images (6 normal, 10 anomalous, 2 of them injected, so only
Overlap scores them); its metrics are computed at "full resolution" (32 px float32 maps) and its
scores.npz keeps the maps at 16 px float16, as a worker's 64 px copy of larger maps, so the
report's pixel intervals are the stored-map spread centred on the record's value.
"""
import hashlib
import io
import json
import sys
import warnings
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent / "results_uncertainty"
sys.path.insert(0, str(Path(__file__).resolve().parents[3]))

from bench.metrics import MetricWarning, evaluate  # noqa: E402

FULL, STORED = 32, 16
# (method, train seed) -> signal strength of its maps and scores (higher = better detector)
RUNS = {("rd", 0): 0.6, ("softpatch", 0): 1.6, ("cdd", 0): 1.0, ("cdd", 1): 1.1}
CATEGORIES = ("bottle", "cable")


def test_set(category):
    """The category's images: labels, masks (shared by every method), injected flags."""
    rng = np.random.default_rng(CATEGORIES.index(category))
    labels = np.array([0] * 6 + [1] * 10, np.uint8)
    masks = np.zeros((16, FULL, FULL), np.uint8)
    for i in range(6, 16):
        for _ in range(1 + i % 2):
            y, x = rng.integers(2, FULL - 10, 2)
            masks[i, y:y + rng.integers(4, 9), x:x + rng.integers(4, 9)] = 1
    keys = np.array([f"{category}/test/{'good' if lab == 0 else 'broken'}/{i:03d}.png"
                     for i, lab in enumerate(labels)])
    return keys, labels, masks, np.arange(16) < 14  # the last two are injected


def run_arrays(category, method, seed, signal):
    keys, labels, masks, keep = test_set(category)
    methods = sorted({m for m, _ in RUNS})
    rng = np.random.default_rng([CATEGORIES.index(category), methods.index(method), seed])
    noise = rng.random((16, FULL, FULL))
    strength = signal * rng.uniform(0.3, 1.0, (16, 1, 1))
    maps = (noise + strength * masks).astype(np.float32)
    scores = (maps.reshape(16, -1).max(axis=1) + 0.3 * rng.standard_normal(16)).astype(
        np.float32)
    return keys, labels, masks, keep, maps, scores


def shrink(maps):
    f = FULL // STORED
    return maps.reshape(-1, STORED, f, STORED, f).mean(axis=(2, 4))


def record(category, method, seed, signal):
    keys, labels, masks, keep, maps, scores = run_arrays(category, method, seed, signal)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", MetricWarning)
        metrics = {"no_overlap": evaluate(scores[keep], labels[keep], maps[keep], masks[keep]),
                   "overlap": evaluate(scores, labels, maps, masks), "train": {}}
    spec = {"method": method, "config": {}, "dataset": "mvtec", "category": category,
            "noise_ratio": 0.1, "split_seed": 0, "train_seed": seed, "image_size": 64,
            "resize_size": 73, "teacher_weights": "random"}
    fp = hashlib.sha256(json.dumps(spec, sort_keys=True).encode()).hexdigest()
    rec = {"schema_version": 1, "fingerprint": fp, "status": "ok", "error": None,
           "sweep": "golden-uncertainty", "spec": spec,
           "resolved_config": {"epochs": 3, "backbone": "resnet18"},
           "metrics": metrics, "split": {}, "timings": {"infer_images_per_s": 10.0 * signal},
           "environment": {"commit": "0123abc", "device": "cpu", "device_name": "cpu"},
           "provenance": {"method": method, "teacher_weights": "random:seed=0"},
           "history": {}, "diagnostics": {}, "finished_at": "2026-01-01T00:00:00"}
    folder = ROOT / "runs" / fp
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "record.json").write_text(json.dumps(rec, indent=2, sort_keys=True) + "\n")
    buf = io.BytesIO()
    np.savez_compressed(
        buf, test_keys=keys, test_scores=scores, test_labels=labels, in_no_overlap=keep,
        test_maps=shrink(maps).astype(np.float16),
        test_masks=(shrink(masks.astype(np.float32)) > 0.5).astype(np.uint8))
    (folder / "scores.npz").write_bytes(buf.getvalue())


if __name__ == "__main__":
    for category in CATEGORIES:
        for (method, seed), signal in RUNS.items():
            record(category, method, seed, signal)
