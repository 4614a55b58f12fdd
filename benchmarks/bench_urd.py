"""Speed of URD beside RD: training and inference images/s on the same images and backbone.

Usage::

    python benchmarks/bench_urd.py --tiny                       # seconds on a CPU: a smoke run
    python benchmarks/bench_urd.py --backbone resnet18 --size 64 --n 32 --device cpu
    python benchmarks/bench_urd.py --backbone wide_resnet50_2 --size 256 --n 64 --device cuda
    python benchmarks/bench_urd.py --backbone wide_resnet50_2 --size 224 --n 64 --device cuda \\
        --foreground grabcut

Training throughput is measured after the first epoch (steady state: the first epoch also
builds the networks; URD's setup also makes its textures and foreground masks, printed
separately as part of "setup + first epoch"). Both methods train whole epochs over the same
images with the same batch size; RD uses its feature cache (its default). Images are synthetic
uint8 and the weights random: speed does not depend on either. URD uses its built-in textures
unless ``--texture-root`` is given.
"""

from __future__ import annotations

import argparse
import time

import torch
import torch.nn.functional as F

from methods.base import TrainSet, build_method
from methods.registry_loader import load_builtin_methods


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _images(n: int, size: int) -> torch.Tensor:
    """Smooth random uint8 images (GrabCut and the foreground masks see some structure)."""
    g = torch.Generator().manual_seed(0)
    coarse = torch.randint(0, 256, (n, 3, max(size // 16, 2), max(size // 16, 2)), generator=g)
    images = F.interpolate(coarse.float(), size=(size, size), mode="bilinear",
                           align_corners=False)
    return images.round().clamp(0, 255).to(torch.uint8)


def measure(method_name: str, config: dict, args: argparse.Namespace) -> dict[str, float]:
    """Train ``args.epochs`` epochs and predict once; throughputs in images/s."""
    device = torch.device(args.device)
    images = _images(args.n, args.size)
    train = TrainSet(images, tuple(f"img{i}" for i in range(args.n)))
    method = build_method(method_name, config, teacher_weights="random", device=device, seed=0)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    stamps: list[tuple[float, float]] = []
    start = time.perf_counter()
    # The observer reads the epoch loss, which synchronises the device: timestamps are honest.
    method.fit(train, observer=lambda epoch, scalars, per_sample=None: stamps.append(
        (time.perf_counter(), time.process_time())))
    steady_s = stamps[-1][0] - stamps[0][0]
    steady_cpu_s = stamps[-1][1] - stamps[0][1]
    method.predict(images[: args.batch_size])  # warm-up
    _sync(device)
    t0, c0 = time.perf_counter(), time.process_time()
    method.predict(images, batch_size=args.predict_batch_size)
    _sync(device)
    infer_s, infer_cpu_s = time.perf_counter() - t0, time.process_time() - c0
    trained = args.n * (len(stamps) - 1)
    peak_mb = (torch.cuda.max_memory_allocated(device) / 2**20 if device.type == "cuda"
               else float("nan"))
    return {
        "setup_and_first_epoch_s": stamps[0][0] - start,
        "train_images_per_s": trained / steady_s,
        "train_images_per_cpu_s": trained / steady_cpu_s,
        "infer_images_per_s": args.n / infer_s,
        "infer_images_per_cpu_s": args.n / infer_cpu_s,
        "peak_cuda_mb": peak_mb,
    }


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tiny", action="store_true",
                        help="smoke mode: resnet18, 32 px, 4 images, batch 4, 2 epochs")
    parser.add_argument("--backbone", default="resnet18", choices=("resnet18", "wide_resnet50_2"))
    parser.add_argument("--size", type=int, default=64, help="image side in pixels (x32)")
    parser.add_argument("--n", type=int, default=32, help="number of training images")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--epochs", type=int, default=3, help="at least 2 (first is warm-up)")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--predict-batch-size", type=int, default=32)
    parser.add_argument("--foreground", default="none", choices=("none", "otsu", "grabcut"))
    parser.add_argument("--texture-root", default=None, help="URD texture folder (default: built-in)")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    parser.add_argument("--fp32", action="store_true", help="disable bf16 and channels_last")
    args = parser.parse_args(argv)
    if args.tiny:
        args.backbone, args.size, args.n, args.batch_size, args.epochs = "resnet18", 32, 4, 4, 2
        args.predict_batch_size = 4
    if args.epochs < 2:
        parser.error("--epochs must be at least 2: the first epoch is the warm-up")
    if args.threads:
        torch.set_num_threads(args.threads)
    load_builtin_methods()
    common = {"backbone": args.backbone, "batch_size": args.batch_size, "epochs": args.epochs,
              "amp_bf16": not args.fp32, "channels_last": not args.fp32}
    runs = {
        "rd": common,
        "urd": {**common, "foreground": args.foreground, "texture_root": args.texture_root},
    }
    print(f"{args.backbone} {args.size}px n={args.n} batch={args.batch_size} "
          f"epochs={args.epochs} device={args.device} threads={torch.get_num_threads()} "
          f"urd foreground={args.foreground}")
    print(f"  {'method':6} {'train img/s':>12} {'(img/CPU-s)':>12} {'infer img/s':>12} "
          f"{'(img/CPU-s)':>12} {'setup+1st ep s':>15} {'peak CUDA MB':>13}")
    results = {}
    for name, config in runs.items():
        results[name] = r = measure(name, config, args)
        print(f"  {name:6} {r['train_images_per_s']:12.1f} {r['train_images_per_cpu_s']:12.1f} "
              f"{r['infer_images_per_s']:12.1f} {r['infer_images_per_cpu_s']:12.1f} "
              f"{r['setup_and_first_epoch_s']:15.1f} {r['peak_cuda_mb']:13.0f}")
    ratio = results["rd"]["train_images_per_s"] / results["urd"]["train_images_per_s"]
    print(f"  URD trains {ratio:.2f}x slower than RD per image (wall time)")


if __name__ == "__main__":
    main()
