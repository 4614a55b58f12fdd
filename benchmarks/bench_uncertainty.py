"""Time of the report's bootstrap, and what the stored 64 px maps do to pixel intervals.

Usage::

    python benchmarks/bench_uncertainty.py [--categories 15] [--methods 8] [--replicates 1000]
    python benchmarks/bench_uncertainty.py --approximation [--size 128] [--epochs 2]
    python benchmarks/bench_uncertainty.py --tiny          # seconds: checks the script runs

Timing (default): a results folder shaped like a full MVTec AD report, ``--categories``
categories with MVTec AD's test-set sizes at noise 0.1 (bench/datasets counts) x ``--methods``
methods, each run's ``scores.npz`` as a worker writes it (64 x 64 float16 maps, masks with
defects covering about 3 % of an anomalous image, both protocols). It times
:func:`bench.report.bootstrap_runs` over all of them (loading the arrays included), for the
report's metrics with PRO = ``pro_rd4ad`` and with ``aupro``, and prints the time per run.
Both protocols of a run come out of one pass, so this is the time of categories x methods x 2
protocols cells.

Approximation (``--approximation``): RD (ResNet-18, random teacher, ``--epochs`` epochs) on one
synthetic category at ``--size`` px, its full-resolution maps against the 64 px float16 copy
``scores.npz`` keeps: P-AUC and PRO values and the widths of their 95 % intervals, both ways.
"""

from __future__ import annotations

import argparse
import io
import os
import sys
import tempfile
import time
import warnings
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.records import write_bytes_atomic  # noqa: E402


def _blob_masks(rng, n_anomalous: int, n: int, size: int) -> np.ndarray:
    masks = np.zeros((n, size, size), np.uint8)
    yy, xx = np.mgrid[:size, :size]
    for i in range(n - n_anomalous, n):
        for _ in range(rng.integers(1, 3)):
            cy, cx = rng.uniform(0.15, 0.85, 2) * size
            ry, rx = rng.uniform(0.04, 0.12, 2) * size
            masks[i] |= (((yy - cy) / ry) ** 2 + ((xx - cx) / rx) ** 2 <= 1).astype(np.uint8)
    return masks


def _smooth(rng, n: int, size: int) -> np.ndarray:
    from scipy import ndimage

    return ndimage.gaussian_filter(rng.random((n, size, size)), sigma=(0, 3, 3))


def write_fake_results(root: Path, categories: int, methods: int, size: int = 64,
                       seed: int = 0) -> int:
    """Records and scores.npz of ``categories`` x ``methods`` runs; returns the run count."""
    import hashlib
    import json

    from datasets.mvtec import MVTEC_COUNTS

    rng = np.random.default_rng(seed)
    names = list(MVTEC_COUNTS)[:categories]
    count = 0
    for category in names:
        train, good, bad = MVTEC_COUNTS[category]
        n = good + bad
        injected = int(0.1 * train)
        masks = _blob_masks(rng, bad, n, size)
        labels = np.r_[np.zeros(good), np.ones(bad)].astype(np.uint8)
        keep = np.ones(n, bool)
        keep[n - injected:] = False
        keys = np.array([f"{category}/test/{'good' if lab == 0 else 'defect'}/{i:03d}.png"
                         for i, lab in enumerate(labels)])
        for m in range(methods):
            maps = _smooth(rng, n, size) + rng.uniform(0.05, 0.5) * masks
            scores = maps.reshape(n, -1).max(axis=1).astype(np.float32)
            spec = {"method": f"method{m}", "config": {}, "dataset": "mvtec",
                    "category": category, "noise_ratio": 0.1, "split_seed": 0,
                    "train_seed": 0, "image_size": 224, "resize_size": 256,
                    "teacher_weights": "imagenet"}
            fp = hashlib.sha256(json.dumps(spec, sort_keys=True).encode()).hexdigest()
            metric = {"i_auroc": 0.9, "p_auroc": 0.9, "pro_rd4ad": 0.8, "aupro": 0.8}
            record = {"schema_version": 1, "fingerprint": fp, "status": "ok", "spec": spec,
                      "metrics": {"no_overlap": metric, "overlap": metric, "train": {}}}
            folder = root / "runs" / fp
            write_bytes_atomic(folder / "record.json", json.dumps(record).encode())
            buf = io.BytesIO()
            np.savez_compressed(buf, test_keys=keys, test_scores=scores, test_labels=labels,
                                in_no_overlap=keep, test_maps=maps.astype(np.float16),
                                test_masks=masks)
            write_bytes_atomic(folder / "scores.npz", buf.getvalue())
            count += 1
        print(f"  {category}: {n} test images ({bad} anomalous, {injected} injected)",
              file=sys.stderr)
    return count


def time_bootstrap(categories: int, methods: int, replicates: int, repeats: int) -> None:
    from bench.report import bootstrap_runs, load_runs, run_dir

    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        n = write_fake_results(root, categories, methods)
        runs = load_runs(root)
        print(f"{n} runs ({categories} categories x {methods} methods), 2 protocols each, "
              f"{replicates} replicates, load {os.getloadavg()[0]:.1f} on {os.cpu_count()} "
              "CPUs")
        for pro in ("pro_rd4ad", "aupro"):
            times = []
            for _ in range(repeats):
                for run in runs:
                    run.deviations.clear()
                t0 = time.perf_counter()
                summary = bootstrap_runs(runs, lambda r: run_dir(root, r.fingerprint)
                                         / "scores.npz", ("i_auroc", "p_auroc", pro),
                                         replicates)
                times.append(time.perf_counter() - t0)
            assert summary.runs == n
            best = min(times)
            print(f"  metrics i_auroc, p_auroc, {pro:9s}: {best:7.2f} s in all "
                  f"(best of {repeats}), {best / n * 1000:6.1f} ms per run, "
                  f"{best / (2 * n) * 1000:6.1f} ms per (run, protocol)")


def approximation(size: int, epochs: int, replicates: int) -> None:
    """Full-resolution maps against the 64 px float16 copy of scores.npz."""
    import torch

    from bench.metrics import MetricWarning, pixel_auroc, pro_rd4ad
    from bench.uncertainty import bootstrap_run, interval, pixel_statistics, run_statistics
    from bench.worker import scores_npz
    from datasets import Preprocess, generate_synthetic, load_category, load_images, load_masks
    from methods.base import TrainSet, build_method

    torch.set_num_threads(2)
    with tempfile.TemporaryDirectory() as tmp:
        root = generate_synthetic(Path(tmp) / "synth", categories=["nut", "brick"])
        for category in ("nut", "brick"):
            data = load_category("synthetic", root, category)
            pre = Preprocess.for_size(size)
            train = load_images(data.train, pre)
            test = load_images(data.test, pre)
            masks = load_masks(data.test, pre)
            labels = np.array([s.label for s in data.test], np.uint8)
            method = build_method("rd", {"epochs": epochs, "backbone": "resnet18"},
                                  teacher_weights="random", device="cpu", seed=0)
            method.fit(TrainSet(train, tuple(f"t{i}" for i in range(len(train)))))
            pred = method.predict(test)
            maps = np.asarray(pred.maps, np.float32)
            scores = np.asarray(pred.scores, np.float32)
            blob = scores_npz(test_keys=[s.key for s in data.test], test_scores=scores,
                              test_labels=labels, in_no_overlap=np.ones(len(labels), bool),
                              test_maps=maps, test_masks=masks, test_images=test.numpy(),
                              train_keys=[], train_scores=np.zeros(0), train_injected=[])
            with np.load(io.BytesIO(blob)) as z:
                stored = {k: z[k] for k in z.files}
            full = {**stored, **pixel_statistics(maps, masks)}
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", MetricWarning)
                record = {"p_auroc": pixel_auroc(maps, masks), "pro_rd4ad": pro_rd4ad(maps, masks)}
            print(f"{category}, {size} px maps vs the stored {stored['test_maps'].shape[-1]} px "
                  f"float16 copy, {len(labels)} test images:")
            for name, arrays in (("full resolution", full), ("stored maps", stored)):
                reps = bootstrap_run(run_statistics(arrays, ("p_auroc", "pro_rd4ad")),
                                     ("p_auroc", "pro_rd4ad"), replicates)
                for metric in ("p_auroc", "pro_rd4ad"):
                    rep = reps[("overlap", metric)]
                    ci = interval(record[metric], rep.deviations)
                    print(f"  {name:15s} {metric:9s} value {rep.value:.4f} (record "
                          f"{record[metric]:.4f}, diff {rep.value - record[metric]:+.4f}); "
                          f"interval [{ci.low:.4f}, {ci.high:.4f}], width "
                          f"{ci.high - ci.low:.4f}")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--categories", type=int, default=15)
    parser.add_argument("--methods", type=int, default=8)
    parser.add_argument("--replicates", type=int, default=1000)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--approximation", action="store_true")
    parser.add_argument("--size", type=int, default=128)
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--tiny", action="store_true", help="2 categories x 2 methods, 50 "
                        "replicates; with --approximation, 64 px and 1 epoch")
    args = parser.parse_args(argv)
    if args.approximation:
        size, epochs = (64, 1) if args.tiny else (args.size, args.epochs)
        approximation(size, epochs, 50 if args.tiny else args.replicates)
    elif args.tiny:
        time_bootstrap(2, 2, 50, 1)
    else:
        time_bootstrap(args.categories, args.methods, args.replicates, args.repeats)
    return 0


if __name__ == "__main__":
    sys.exit(main())
