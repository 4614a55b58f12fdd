"""Cost of a CDD epoch against an RD epoch on the same data: wall time beside FLOPs.

CDD does several times RD's arithmetic per epoch by design (K domain-specific students, the
affinity forwards, two global-student stages). This script checks that it wastes nothing beyond
that: it times every epoch of both methods, counts their FLOPs with
``torch.utils.flop_counter.FlopCounterMode`` in a second, identical run, and prints per epoch

    time ratio CDD/RD, FLOP ratio CDD/RD, and throughput per FLOP of CDD relative to RD

(1.00 = CDD turns FLOPs into progress exactly as fast as RD). Epoch 0 includes building the
teacher feature cache and is left out of the RD reference. On a shared machine wall time is
noisy: the fits are repeated, RD and CDD interleaved, and each epoch's fastest repeat is kept. Optimizer arithmetic has no FLOP
formula in the counter and is not counted for either method.

Usage (CPU numbers in docs/cdd.md were measured this way)::

    python benchmarks/bench_cdd.py --backbone resnet18 --size 64 --images 32 --epochs 4
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


def epoch_costs(name: str, overrides: dict, train: TrainSet, device: str, count_flops: bool):
    """Per-epoch wall seconds (or FLOPs when ``count_flops``) of one fit of ``name``."""
    method = build_method(name, overrides, teacher_weights="random", device=device, seed=0)
    dev = torch.device(device)
    marks: list[float] = []
    counter = FlopCounterMode(display=False) if count_flops else None

    def observer(epoch, scalars, per_sample=None):
        _sync(dev)
        marks.append(float(counter.get_total_flops()) if counter else time.perf_counter())

    _sync(dev)
    start = 0.0 if counter else time.perf_counter()
    if counter:
        with counter:
            method.fit(train, observer)
    else:
        method.fit(train, observer)
    return np.diff([start, *marks])


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
    parser.add_argument("--unbatched", action="store_true",
                        help="run the other students one by one (batched_students=false)")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    train = _images(args.images, args.size)
    common = {"backbone": args.backbone, "epochs": args.epochs}
    cdd_overrides = {**common, "batched_students": not args.unbatched}
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
