"""Speed of ReContrast beside RD: training and inference images/s on the same images.

Usage::

    python benchmarks/bench_recontrast.py --tiny                      # seconds, CPU smoke check
    python benchmarks/bench_recontrast.py --backbone resnet18 --size 64 --n 32 --device cpu
    python benchmarks/bench_recontrast.py --backbone wide_resnet50_2 --size 224 --n 256 --device cuda

Both methods train for the same number of passes over the same images (ReContrast through its
``epochs`` budget, so its steps per pass equal RD's), with their default speed switches (feature
cache, and on CUDA bf16 autocast and channels_last; ``--fp32`` turns the last two off).
Training throughput is measured after the first pass (steady state: the first pass also builds
the networks and fills the feature caches); that setup time is printed separately. Images are
synthetic uint8 noise and the weights random: speed depends on neither.
"""

from __future__ import annotations

import argparse
import time

import torch

from methods.base import TrainSet, build_method


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def measure(method_name: str, overrides: dict, images: torch.Tensor, args: argparse.Namespace
            ) -> dict[str, float]:
    """Train ``method_name`` for ``args.epochs`` passes and predict once; images/s."""
    device = torch.device(args.device)
    n = images.shape[0]
    train = TrainSet(images, tuple(f"img{i}" for i in range(n)))
    speed = {"amp_bf16": not args.fp32, "channels_last": not args.fp32}
    method = build_method(method_name, {"backbone": args.backbone, "batch_size": args.batch_size,
                                        **speed, **overrides},
                          teacher_weights="random", device=device, seed=0)
    # Both methods report to the observer once per pass, after reading the pass's mean loss
    # from the device: the timestamps follow finished work. CPU time is logged too: on a shared
    # CPU host it is steadier than wall time.
    stamps: list[tuple[float, float]] = []
    start = time.perf_counter()
    method.fit(train, observer=lambda epoch, scalars, per_sample=None: stamps.append(
        (time.perf_counter(), time.process_time())))
    if len(stamps) != args.epochs:
        raise RuntimeError(f"{method_name}: expected {args.epochs} passes, got {len(stamps)}")
    steady_s = stamps[-1][0] - stamps[0][0]
    steady_cpu_s = stamps[-1][1] - stamps[0][1]
    method.predict(images[: args.batch_size])  # warm-up (allocations, cudnn autotuning)
    _sync(device)
    t0, c0 = time.perf_counter(), time.process_time()
    method.predict(images, batch_size=args.predict_batch_size)
    _sync(device)
    infer_s, infer_cpu_s = time.perf_counter() - t0, time.process_time() - c0
    trained = n * (len(stamps) - 1)
    return {
        "setup_and_first_pass_s": stamps[0][0] - start,
        "train_images_per_s": trained / steady_s,
        "train_images_per_cpu_s": trained / steady_cpu_s,
        "infer_images_per_s": n / infer_s,
        "infer_images_per_cpu_s": n / infer_cpu_s,
    }


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--backbone", default="resnet18", choices=("resnet18", "wide_resnet50_2"))
    parser.add_argument("--size", type=int, default=64, help="image side in pixels (x32)")
    parser.add_argument("--n", type=int, default=32, help="number of training images")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--epochs", type=int, default=3, help="passes, at least 2 (first is warm-up)")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--predict-batch-size", type=int, default=32)
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    parser.add_argument("--fp32", action="store_true", help="disable bf16 and channels_last")
    parser.add_argument("--tiny", action="store_true",
                        help="ResNet-18, 64 px, 8 images, batch 4, 2 passes (a smoke check)")
    args = parser.parse_args(argv)
    if args.tiny:
        args.backbone, args.size, args.n, args.batch_size, args.epochs = "resnet18", 64, 8, 4, 2
    if args.epochs < 2:
        parser.error("--epochs must be at least 2: the first pass is the warm-up")
    if args.threads:
        torch.set_num_threads(args.threads)
    g = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (args.n, 3, args.size, args.size), dtype=torch.uint8,
                           generator=g)
    print(f"{args.backbone} {args.size}px n={args.n} batch={args.batch_size} "
          f"passes={args.epochs} device={args.device} threads={torch.get_num_threads()}"
          f"{' fp32' if args.fp32 else ''}")
    rows = {
        "rd": measure("rd", {"epochs": args.epochs}, images, args),
        "recontrast": measure("recontrast", {"epochs": args.epochs}, images, args),
    }
    for name, r in rows.items():
        print(f"  {name:10}  train {r['train_images_per_s']:8.1f} img/s "
              f"({r['train_images_per_cpu_s']:.1f} img/CPU-s)  "
              f"infer {r['infer_images_per_s']:8.1f} img/s "
              f"({r['infer_images_per_cpu_s']:.1f} img/CPU-s)  "
              f"setup+first pass {r['setup_and_first_pass_s']:.1f} s")
    for key, what in (("train_images_per_s", "training"), ("infer_images_per_s", "inference")):
        print(f"  {what} time per image, recontrast / rd (wall): "
              f"{rows['rd'][key] / rows['recontrast'][key]:.2f}x")


if __name__ == "__main__":
    main()
