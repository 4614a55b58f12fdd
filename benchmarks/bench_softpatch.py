"""Speed of SoftPatch / PatchCore: fit time (by stage), inference images/s, memory-bank size.

Runs on synthetic images (smooth gradients plus noise; a few with a bright square as injected
anomalies), so it needs no dataset. Prints one line per method. Examples::

    python benchmarks/bench_softpatch.py                         # CPU, resnet18, 64 px
    python benchmarks/bench_softpatch.py --device cuda --backbone wide_resnet50_2 \\
        --size 224 --n-train 900 --weights imagenet             # a VisA-sized category
    python benchmarks/bench_softpatch.py --coreset-only 200000  # greedy coreset alone
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.worker import peak_memory_mb, reset_peak_memory  # noqa: E402
from methods import TrainSet, build_method  # noqa: E402
from methods import coreset as cs  # noqa: E402


def synthetic_images(n: int, size: int, n_defect: int, seed: int) -> torch.Tensor:
    """uint8 (n, 3, size, size): aligned gradients with noise; the last n_defect get a square."""
    gen = torch.Generator().manual_seed(seed)
    ramp = torch.linspace(60, 180, size)
    images = ((ramp[None, :, None] + ramp[None, None, :]) / 2).expand(n, 3, size, size).clone()
    images += 6 * torch.randn(images.shape, generator=gen)
    side = max(2, size // 8)
    if n_defect:
        images[n - n_defect :, :, side : 2 * side, side : 2 * side] = 255.0
    return images.clamp(0, 255).to(torch.uint8)


def method_peak_mb(device: torch.device, reset: bool) -> tuple[float, str]:
    """This method's peak: torch's on CUDA; on Linux the RSS high-water mark since the reset
    before its fit (it includes the process's baseline: torch, the teacher, the images)."""
    mb, kind = peak_memory_mb(device, reset)
    return mb, {"cuda_max_allocated": "GPU allocated", "run_peak_rss": "RSS since the method "
                "started", "process_max_rss": "process RSS (not reset)"}[kind]


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def bench_method(name: str, args, device: torch.device) -> None:
    n_defect = int(args.noise * args.n_train)
    train = TrainSet(
        synthetic_images(args.n_train, args.size, n_defect, 0),
        tuple(f"train{i}" for i in range(args.n_train)),
    )
    test = synthetic_images(args.n_test, args.size, args.n_test // 2, 1)
    method = build_method(
        name, {"backbone": args.backbone, "batch_size": args.batch_size},
        teacher_weights=args.weights, device=device, seed=0,
    )
    method.teacher  # build the backbone outside the timings  # noqa: B018
    reset = reset_peak_memory(device)  # each method's own peak, not the process's so far
    sync(device)
    start = time.perf_counter()
    method.fit(train)
    sync(device)
    fit_s = time.perf_counter() - start
    method.predict(test[: min(2, args.n_test)], batch_size=args.batch_size)  # warm-up
    sync(device)
    start = time.perf_counter()
    method.predict(test, batch_size=args.batch_size)
    sync(device)
    infer_s = time.perf_counter() - start
    stats = method.fit_stats
    bank = method.bank
    peak_mb, peak_kind = method_peak_mb(device, reset)
    print(
        f"{name:10s} train={args.n_train} size={args.size} patches={int(stats['n_patches'])} "
        f"bank={bank.shape[0]}x{bank.shape[1]} ({bank.numel() * 4 / 2**20:.1f} MB) "
        f"removed={int(stats['removed_patches'])} | fit {fit_s:.2f} s (features "
        f"{stats['feature_s']:.2f}, discriminator {stats['discriminator_s']:.2f}, coreset "
        f"{stats['coreset_s']:.2f}) | infer {args.n_test / infer_s:.1f} img/s | peak "
        f"{peak_mb:.0f} MB ({peak_kind})"
    )


def bench_coreset(n_points: int, args, device: torch.device) -> None:
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(n_points, 128, generator=gen).to(device)
    n = max(1, n_points // 10)
    sync(device)
    start = time.perf_counter()
    cs.greedy_coreset(x, n, generator=gen)
    sync(device)
    took = time.perf_counter() - start
    print(f"greedy coreset {n} of {n_points} x 128 on {device}: {took:.2f} s "
          f"({n / took:.0f} picks/s)")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--methods", default="softpatch,patchcore")
    parser.add_argument("--backbone", default="resnet18")
    parser.add_argument("--weights", default="random", help="imagenet, random or a file")
    parser.add_argument("--size", type=int, default=64)
    parser.add_argument("--n-train", type=int, default=100)
    parser.add_argument("--n-test", type=int, default=40)
    parser.add_argument("--noise", type=float, default=0.1, help="fraction of defective train")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--threads", type=int, default=min(2, os.cpu_count() or 1))
    parser.add_argument("--coreset-only", type=int, default=0, metavar="N",
                        help="time the greedy coreset alone on N random 128-d points")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    print(f"device={device} threads={args.threads} torch={torch.__version__}")
    if args.coreset_only:
        bench_coreset(args.coreset_only, args, device)
        return 0
    for name in args.methods.split(","):
        bench_method(name.strip(), args, device)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
