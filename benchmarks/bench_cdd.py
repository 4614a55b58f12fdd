"""Cost of a CDD epoch against an RD epoch on the same data: wall time beside FLOPs.

CDD does several times RD's arithmetic per epoch by design (K domain-specific students, the
affinity forwards, two global-student stages). This script checks that it wastes nothing beyond
that: it times every epoch of both methods, counts their FLOPs with
``torch.utils.flop_counter.FlopCounterMode`` in a second, identical run, and prints per epoch

    time ratio CDD/RD, FLOP ratio CDD/RD, and throughput per FLOP of CDD relative to RD

(1.00 = CDD turns FLOPs into progress exactly as fast as RD). Epoch 0 includes building the
teacher feature cache and is left out of the RD reference. On a shared machine wall time is
noisy: the fits are repeated, RD and CDD interleaved, and each epoch's fastest repeat is kept.
Optimizer arithmetic has no FLOP formula in the counter and is not counted for either method.

``--compare-recompute`` times the same CDD configuration twice in one run, with
``avoid_recomputation`` off (before: each domain student's outputs on D^HC recomputed at every
visit, S_glo(e-1)'s pass run every epoch, its buffers reallocated) and on (after), interleaved
with RD; it prints both CDD/RD time ratios per epoch, both FLOP counts, and how far the two
runs' losses and anomaly maps are apart (float rounding only).

Usage::

    python benchmarks/bench_cdd.py --backbone resnet18 --size 64 --images 32 --epochs 4
    python benchmarks/bench_cdd.py --compare-recompute --k-schedule 3 --images 32 --epochs 4
    python benchmarks/bench_cdd.py --device cuda --backbone wide_resnet50_2 --size 224
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import torch
from torch.utils.flop_counter import FlopCounterMode

from methods import TrainSet, build_method


def _images(n: int, size: int, seed: int = 0) -> TrainSet:
    g = torch.Generator().manual_seed(seed)
    images = torch.randint(0, 256, (n, 3, size, size), generator=g, dtype=torch.uint8)
    return TrainSet(images, tuple(f"img{i:03d}" for i in range(n)))


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def fit_costs(name: str, overrides: dict, train: TrainSet, device: str, count_flops: bool):
    """One fit of ``name``: (per-epoch wall seconds, or FLOPs when ``count_flops``; per-epoch
    losses; the fitted method)."""
    method = build_method(name, overrides, teacher_weights="random", device=device, seed=0)
    dev = torch.device(device)
    marks: list[float] = []
    losses: list[float] = []
    counter = FlopCounterMode(display=False) if count_flops else None

    def observer(epoch, scalars, per_sample=None):
        _sync(dev)
        marks.append(float(counter.get_total_flops()) if counter else time.perf_counter())
        losses.append(float(scalars["loss"]))

    _sync(dev)
    start = 0.0 if counter else time.perf_counter()
    if counter:
        with counter:
            method.fit(train, observer)
    else:
        method.fit(train, observer)
    return np.diff([start, *marks]), np.array(losses), method


def epoch_costs(name: str, overrides: dict, train: TrainSet, device: str, count_flops: bool):
    """Per-epoch wall seconds (or FLOPs when ``count_flops``) of one fit of ``name``."""
    return fit_costs(name, overrides, train, device, count_flops)[0]


def compare_ratio(args, train: TrainSet, common: dict, cdd_overrides: dict) -> None:
    """Before/after ``avoid_recomputation``: CDD/RD time ratio per epoch, both in one run."""
    variants = {"before": {**cdd_overrides, "avoid_recomputation": False},
                "after": {**cdd_overrides, "avoid_recomputation": True}}
    times: dict[str, list] = {"rd": [], "before": [], "after": []}
    fitted = {}
    for _ in range(args.repeats):
        times["rd"].append(epoch_costs("rd", common, train, args.device, False))
        for tag, overrides in variants.items():
            seconds, losses, method = fit_costs(args.preset, overrides, train, args.device, False)
            times[tag].append(seconds)
            fitted[tag] = (losses, method)
    best = {tag: np.min(runs, axis=0) for tag, runs in times.items()}
    flops = {tag: epoch_costs(args.preset, overrides, train, args.device, True)
             for tag, overrides in variants.items()}
    rd_time = float(np.mean(best["rd"][1:]))
    print(f"{args.preset} avoid_recomputation off (before) / on (after) vs rd | backbone "
          f"{args.backbone}, {args.images} images at {args.size} px, {args.epochs} epochs, "
          f"k_schedule {cdd_overrides.get('k_schedule', 'default')}, device {args.device}, "
          f"{torch.get_num_threads()} threads, fastest of {args.repeats} repeats")
    print(f"RD epoch (mean of epochs 1..): {rd_time:.3f} s")
    print("epoch  before_s  after_s  ratio_before  ratio_after  time_saved  "
          "GFLOP_before  GFLOP_after")
    for e in range(1, len(best["after"])):
        before, after = best["before"][e], best["after"][e]
        print(f"{e:5d}  {before:8.3f}  {after:7.3f}  {before / rd_time:12.2f}  "
              f"{after / rd_time:11.2f}  {1 - after / before:10.1%}  "
              f"{flops['before'][e] / 1e9:12.2f}  {flops['after'][e] / 1e9:11.2f}")
    before, after = float(np.sum(best["before"][1:])), float(np.sum(best["after"][1:]))
    n = len(best["after"]) - 1
    print(f"all    {before / n:8.3f}  {after / n:7.3f}  {before / n / rd_time:12.2f}  "
          f"{after / n / rd_time:11.2f}  {1 - after / before:10.1%}  "
          f"{np.sum(flops['before'][1:]) / n / 1e9:12.2f}  "
          f"{np.sum(flops['after'][1:]) / n / 1e9:11.2f}")
    # Same seed, same streams: the two code paths differ by float rounding only.
    (loss_b, method_b), (loss_a, method_a) = fitted["before"], fitted["after"]
    maps_b = method_b.predict(train.images).maps
    maps_a = method_a.predict(train.images).maps
    print(f"same results: max |loss after - before| {np.max(np.abs(loss_a - loss_b)):.2e} "
          f"(losses ~{np.mean(loss_b):.3f}), max |map after - before| "
          f"{np.max(np.abs(maps_a - maps_b)):.2e} (maps up to {maps_b.max():.3f})")


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--backbone", default="resnet18")
    parser.add_argument("--size", type=int, default=64)
    parser.add_argument("--images", type=int, default=32)
    parser.add_argument("--epochs", type=int, default=4)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=3,
                        help="timed fits per method, interleaved; the fastest per epoch is kept")
    parser.add_argument("--preset", default="cdd", help="CDD preset to compare (default: full)")
    parser.add_argument("--k-schedule", default=None,
                        help="override the preset's K schedule, e.g. 3 or 2,3,3,2")
    parser.add_argument("--unbatched", action="store_true",
                        help="run the other students one by one (batched_students=false)")
    parser.add_argument("--compare-recompute", action="store_true",
                        help="time CDD with avoid_recomputation off and on in the same run")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    train = _images(args.images, args.size)
    common = {"backbone": args.backbone, "epochs": args.epochs}
    cdd_overrides = {**common, "batched_students": not args.unbatched}
    if args.k_schedule:
        cdd_overrides["k_schedule"] = tuple(int(k) for k in args.k_schedule.split(","))
    if args.compare_recompute:
        compare_ratio(args, train, common, cdd_overrides)
        return
    rd_runs, cdd_runs = [], []
    for _ in range(args.repeats):
        rd_runs.append(epoch_costs("rd", common, train, args.device, count_flops=False))
        cdd_runs.append(epoch_costs(args.preset, cdd_overrides, train, args.device, False))
    rd_t, cdd_t = np.min(rd_runs, axis=0), np.min(cdd_runs, axis=0)
    rd_f = epoch_costs("rd", common, train, args.device, count_flops=True)
    cdd_f = epoch_costs(args.preset, cdd_overrides, train, args.device, count_flops=True)
    rd_time, rd_flops = float(np.mean(rd_t[1:])), float(np.mean(rd_f[1:]))
    print(f"{args.preset} vs rd | backbone {args.backbone}, {args.images} images at "
          f"{args.size} px, {args.epochs} epochs, device {args.device}, "
          f"{torch.get_num_threads()} threads, fastest of {args.repeats} repeats")
    print(f"RD epoch (mean of epochs 1..): {rd_time:.3f} s, {rd_flops / 1e9:.2f} GFLOP")
    print("epoch  cdd_s   cdd_GFLOP  time_ratio  flop_ratio  throughput_per_flop_vs_rd")
    for e in range(1, len(cdd_t)):
        time_ratio = cdd_t[e] / rd_time
        flop_ratio = cdd_f[e] / rd_flops
        print(f"{e:5d}  {cdd_t[e]:6.3f}  {cdd_f[e] / 1e9:9.2f}  {time_ratio:10.2f}  "
              f"{flop_ratio:10.2f}  {flop_ratio / time_ratio:25.2f}")
    total_t, total_f = float(np.sum(cdd_t[1:])), float(np.sum(cdd_f[1:]))
    n = len(cdd_t) - 1
    print(f"all    {total_t / n:6.3f}  {total_f / n / 1e9:9.2f}  {total_t / n / rd_time:10.2f}  "
          f"{total_f / n / rd_flops:10.2f}  {(total_f / rd_flops) / (total_t / rd_time):25.2f}")


if __name__ == "__main__":
    main()
