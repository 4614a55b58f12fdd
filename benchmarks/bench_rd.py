"""Speed of the RD baseline: training and inference images/s, with and without the feature cache.

Usage::

    python benchmarks/bench_rd.py --backbone resnet18 --size 64 --n 32 --device cpu
    python benchmarks/bench_rd.py --backbone wide_resnet50_2 --size 224 --n 256 --device cuda

Training throughput is measured after the first epoch (steady state: the first epoch also builds
the networks and, with the cache, fills it once); the one-off setup time is printed separately.
Images are synthetic uint8 noise and the teacher is random: speed does not depend on either.
"""

from __future__ import annotations

import argparse
import time

import torch

from methods.base import TrainSet, build_method


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def measure(args: argparse.Namespace, feature_cache: bool) -> dict[str, float]:
    """Train for ``args.epochs`` epochs and predict once; return throughputs in images/s."""
    device = torch.device(args.device)
    g = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (args.n, 3, args.size, args.size), dtype=torch.uint8,
                           generator=g)
    train = TrainSet(images, tuple(f"img{i}" for i in range(args.n)))
    method = build_method(
        "rd",
        {"backbone": args.backbone, "epochs": args.epochs, "batch_size": args.batch_size,
         "feature_cache": feature_cache, "amp_bf16": not args.fp32,
         "channels_last": not args.fp32},
        teacher_weights="random", device=device, seed=0,
    )
    # The observer reads the epoch loss, which synchronises the device: timestamps are honest.
    # Process CPU time is logged too: on a shared CPU host it is steadier than wall time.
    stamps: list[tuple[float, float]] = []
    start = time.perf_counter()
    method.fit(train, observer=lambda epoch, scalars, per_sample=None: stamps.append(
        (time.perf_counter(), time.process_time())))
    steady_s = stamps[-1][0] - stamps[0][0]
    steady_cpu_s = stamps[-1][1] - stamps[0][1]
    method.predict(images[: args.batch_size])  # warm-up (allocations, cudnn autotuning)
    _sync(device)
    t0, c0 = time.perf_counter(), time.process_time()
    method.predict(images, batch_size=args.predict_batch_size)
    _sync(device)
    infer_s, infer_cpu_s = time.perf_counter() - t0, time.process_time() - c0
    trained = args.n * (len(stamps) - 1)
    return {
        "setup_and_first_epoch_s": stamps[0][0] - start,
        "train_images_per_s": trained / steady_s,
        "train_images_per_cpu_s": trained / steady_cpu_s,
        "infer_images_per_s": args.n / infer_s,
        "infer_images_per_cpu_s": args.n / infer_cpu_s,
    }


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--backbone", default="resnet18", choices=("resnet18", "wide_resnet50_2"))
    parser.add_argument("--size", type=int, default=64, help="image side in pixels (x32)")
    parser.add_argument("--n", type=int, default=32, help="number of training images")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--epochs", type=int, default=3, help="at least 2 (first is warm-up)")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--predict-batch-size", type=int, default=32)
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    parser.add_argument("--fp32", action="store_true", help="disable bf16 and channels_last")
    args = parser.parse_args(argv)
    if args.epochs < 2:
        parser.error("--epochs must be at least 2: the first epoch is the warm-up")
    if args.threads:
        torch.set_num_threads(args.threads)
    print(f"rd {args.backbone} {args.size}px n={args.n} batch={args.batch_size} "
          f"epochs={args.epochs} device={args.device} threads={torch.get_num_threads()}")
    results = {}
    for cached in (True, False):
        results[cached] = r = measure(args, cached)
        print(f"  feature_cache={str(cached):5}  train {r['train_images_per_s']:8.1f} img/s "
              f"({r['train_images_per_cpu_s']:.1f} img/CPU-s)  "
              f"infer {r['infer_images_per_s']:8.1f} img/s "
              f"({r['infer_images_per_cpu_s']:.1f} img/CPU-s)  "
              f"setup+first epoch {r['setup_and_first_epoch_s']:.1f} s")
    for key, unit in (("train_images_per_s", "wall"), ("train_images_per_cpu_s", "CPU time")):
        ratio = results[True][key] / results[False][key]
        print(f"  training speed-up from the feature cache ({unit}): {ratio:.2f}x")


if __name__ == "__main__":
    main()
