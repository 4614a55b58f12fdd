"""Speed and memory of InReaCh beside SoftPatch: bank build time, inference images/s, peak memory.

Runs on synthetic images (aligned gradients plus noise; a few with a bright square as injected
anomalies, see ``bench_softpatch.synthetic_images``), so it needs no dataset. Prints one line
per method. Examples::

    python benchmarks/bench_inreach.py --tiny                    # seconds, CPU, resnet18, 64 px
    python benchmarks/bench_inreach.py                            # CPU, resnet18, 64 px, 100 train
    python benchmarks/bench_inreach.py --device cuda --backbone wide_resnet50_2 --size 224 \\
        --n-train 250 --n-test 50 --weights imagenet --methods inreach   # a 250-image category
    python benchmarks/bench_inreach.py --memory --device cuda --weights imagenet   # the same,
        # peak memory only (GPU allocated and host RSS), the store kept on the GPU or on the host

Peak memory is each method's own: torch's counter on CUDA (reset before its fit) and, on Linux,
the process's resident high-water mark since that reset (it includes the process's baseline:
torch, the backbone, the images). The bank size of InReaCh depends on the images, so a real
category's figure comes from a real run (its record's ``timings.peak_mem_mb``); the descriptor
store, the largest part, depends only on the image count and size.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench_softpatch import method_peak_mb, sync, synthetic_images  # noqa: E402

from bench.worker import peak_memory_mb, reset_peak_memory  # noqa: E402
from methods import TrainSet, build_method  # noqa: E402

# Smaller descriptors for the --tiny mode (both methods have these fields).
TINY_DIMS = {"pretrain_embed_dimension": 128, "target_embed_dimension": 128}


def host_peak_mb(reset: bool) -> str:
    """The process's resident high-water mark since the reset, when Linux can say."""
    mb, kind = peak_memory_mb("cpu", reset)
    return f"{mb:.0f} MB host ({'since reset' if kind == 'run_peak_rss' else 'process lifetime'})"


def bench_method(name: str, args, device: torch.device) -> None:
    n_defect = int(args.noise * args.n_train)
    train = TrainSet(
        synthetic_images(args.n_train, args.size, n_defect, 0),
        tuple(f"train{i}" for i in range(args.n_train)),
    )
    test = synthetic_images(args.n_test, args.size, args.n_test // 2, 1)
    overrides = {"backbone": args.backbone, "batch_size": args.batch_size}
    if args.tiny:
        overrides.update(TINY_DIMS)
    if name.startswith("inreach") and args.store:
        overrides["store"] = args.store
    method = build_method(name, overrides, teacher_weights=args.weights, device=device, seed=0)
    # Build the backbone outside the timings.
    method.extractor if name.startswith("inreach") else method.teacher  # noqa: B018
    reset_gpu = reset_peak_memory(device)
    reset_host = reset_peak_memory("cpu") if device.type == "cuda" else reset_gpu
    sync(device)
    start = time.perf_counter()
    method.fit(train)
    sync(device)
    fit_s = time.perf_counter() - start
    stats = method.fit_stats
    bank = method.bank
    bank_mb = bank.numel() * bank.element_size() / 2**20
    if args.memory:
        peak, kind = method_peak_mb(device, reset_gpu)
        line = f"peak {peak:.0f} MB ({kind})"
        if device.type == "cuda":
            line += f", {host_peak_mb(reset_host)}"
        print(f"{name:10s} fit only: train={args.n_train} size={args.size} "
              f"bank={bank.shape[0]}x{bank.shape[1]} {str(bank.dtype).replace('torch.', '')} "
              f"({bank_mb:.0f} MB) | "
              f"fit {fit_s:.2f} s | {line}")
        return
    method.predict(test[: min(2, args.n_test)], batch_size=args.batch_size)  # warm-up
    sync(device)
    start = time.perf_counter()
    method.predict(test, batch_size=args.batch_size)
    sync(device)
    infer_s = time.perf_counter() - start
    peak, kind = method_peak_mb(device, reset_gpu)
    if name.startswith("inreach"):
        stages = (f"features {stats['feature_s']:.2f}, associations {stats['association_s']:.2f}, "
                  f"channels {stats['channel_s']:.2f}")
    else:
        stages = (f"features {stats['feature_s']:.2f}, discriminator "
                  f"{stats['discriminator_s']:.2f}, coreset {stats['coreset_s']:.2f}")
    print(
        f"{name:10s} train={args.n_train} size={args.size} patches={int(stats['n_patches'])} "
        f"bank={bank.shape[0]}x{bank.shape[1]} {str(bank.dtype).replace('torch.', '')} "
        f"({bank_mb:.1f} MB) | fit {fit_s:.2f} s ({stages}) | infer "
        f"{args.n_test / infer_s:.1f} img/s | peak {peak:.0f} MB ({kind})"
    )


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--methods", default="inreach,softpatch")
    parser.add_argument("--backbone", default="resnet18")
    parser.add_argument("--weights", default="random", help="imagenet, random or a file")
    parser.add_argument("--size", type=int, default=64)
    parser.add_argument("--n-train", type=int, default=100)
    parser.add_argument("--n-test", type=int, default=40)
    parser.add_argument("--noise", type=float, default=0.1, help="fraction of defective train")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--threads", type=int, default=min(2, os.cpu_count() or 1))
    parser.add_argument("--store", choices=("auto", "device", "cpu"), default=None,
                        help="where InReaCh keeps the training descriptors (default: auto)")
    parser.add_argument("--tiny", action="store_true",
                        help="seconds on a CPU: 20 train, 6 test, 64 px, resnet18, 128-d")
    parser.add_argument("--memory", action="store_true",
                        help="peak memory of a 250-image, 224 px WideResNet-50 category (fit "
                             "only; --n-train/--size/--backbone still override)")
    args = parser.parse_args(argv)
    # A mode's settings fill in the flags the command line did not give.
    given = {a.split("=")[0] for a in (argv if argv is not None else sys.argv[1:])}
    mode = {}
    if args.memory:
        mode = {"n_train": 250, "size": 224, "backbone": "wide_resnet50_2", "methods": "inreach"}
    if args.tiny:
        mode = {**mode, "n_train": 20, "n_test": 6, "size": 64, "backbone": "resnet18"}
    for attr, value in mode.items():
        if "--" + attr.replace("_", "-") not in given:
            setattr(args, attr, value)
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    print(f"device={device} threads={args.threads} torch={torch.__version__}")
    for name in args.methods.split(","):
        bench_method(name.strip(), args, device)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
