"""Training time of FUN-AD per epoch, by stage, and its extrapolation to the full budget.

FUN-AD's cost sits in its training loop: every iteration scores the whole training set, searches
the batch's patches in the rebuilt memory bank and matches them among themselves, so an epoch
costs about N/32 iterations of O(N) work each. The loop does not care what the backbone tokens
are, so it runs here on random tokens of the chosen size (no dataset, no weights); the backbone's
one-off extraction is timed separately on a few random images.

Prints one line per measurement: the seconds per epoch (and per iteration, split into the score
pass, the bank search, the within-batch matching and the optimiser step), the budget at this
geometry (x 1,500 epochs, the README's, and x 200, the argparse default), and, when the geometry
is smaller than the paper's (28 x 28 patches, 1,536 values), a FLOP-scaled estimate for the
paper's geometry (rough: it assumes the same FLOP rate at both sizes; measure on the target
device for a real number). Examples::

    python benchmarks/bench_funad.py --tiny                 # seconds, CPU: checks it runs
    python benchmarks/bench_funad.py                        # 250 images, 8 x 8 patches, CPU
    python benchmarks/bench_funad.py --device cuda --grid 28 --extract-images 32  # the paper's
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
from methods import build_method  # noqa: E402
from methods.funad import HIDDEN_DIMS, FunADNet, PatchTokens, count_parameters  # noqa: E402

PAPER_GRID = 28  # 224 px / 8 px patches
PAPER_DIM = 1536  # 2 x 768 (ViT-B)
BUDGETS = (1500, 200)  # README command, argparse default
TINY_VIT = ("embed_dim=32", "depth=1", "num_heads=2")


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def random_tokens(n: int, grid: int, embed_dim: int, device: torch.device,
                  dtype: torch.dtype) -> PatchTokens:
    """Tokens shaped like a ViT's final LayerNorm output (unit-variance values)."""
    gen = torch.Generator().manual_seed(0)
    cls = torch.randn(n, embed_dim, generator=gen)
    patches = torch.randn(n, grid * grid, embed_dim, generator=gen)
    return PatchTokens(cls.to(device, dtype), patches.to(device, dtype), (grid, grid))


def flops_per_iteration(n: int, patches: int, dim: int, batch: int, bank_images: float) -> float:
    """Multiply-adds x 2 of one iteration: the score pass over every training patch, the bank
    search (batch patches x bank patches x dim), the within-batch matching and the step
    (forward + backward ~ 3 forwards)."""
    mlp = count_parameters(FunADNet(dim, HIDDEN_DIMS))  # one multiply-add per weight
    queries = batch * patches
    score_pass = 2.0 * n * patches * mlp
    search = 2.0 * queries * bank_images * patches * dim
    matching = 2.0 * queries * queries * dim
    step = 3 * 2.0 * queries * mlp
    return score_pass + search + matching + step


def hours(seconds: float) -> str:
    return f"{seconds / 3600:.2f} h" if seconds >= 360 else f"{seconds:.0f} s"


def bench_training(args, device: torch.device) -> None:
    overrides = {"epochs": args.epochs, "batch_size": args.batch_size,
                 "feature_dtype": args.feature_dtype}
    method = build_method("funad", overrides, teacher_weights="random", device=device, seed=0)
    tokens = random_tokens(args.n_images, args.grid, args.embed_dim, device,
                           getattr(torch, args.feature_dtype))
    epoch_ends: list[float] = []
    bank_sizes: list[float] = []

    def observer(epoch, scalars, per_sample=None):
        sync(device)
        epoch_ends.append(time.perf_counter())
        bank_sizes.append(scalars["bank_images"])

    method.stage_seconds = {}
    reset = reset_peak_memory(device)
    sync(device)
    start = time.perf_counter()
    method.fit_features(tokens, observer)
    peak_mb, peak_kind = peak_memory_mb(device, reset)
    per_epoch = [b - a for a, b in zip([start, *epoch_ends[:-1]], epoch_ends)]
    # The first epoch carries one-off costs (allocations, kernel selection) when there are more.
    measured = per_epoch[1:] if len(per_epoch) > 1 else per_epoch
    epoch_s = sum(measured) / len(measured)
    iterations = args.n_images // args.batch_size
    total_iterations = iterations * len(per_epoch)
    stages = ", ".join(f"{name} {secs / total_iterations:.3f}"
                       for name, secs in method.stage_seconds.items())
    dim, patches = 2 * args.embed_dim, args.grid * args.grid
    print(f"funad training N={args.n_images} grid={args.grid}x{args.grid} D={dim} "
          f"B={args.batch_size} on {device}: {iterations} it/epoch, {epoch_s:.2f} s/epoch "
          f"({epoch_s / iterations:.3f} s/it: {stages} s/it) | peak {peak_mb:.0f} MB "
          f"({peak_kind})")
    print("  full budget at this geometry: " + ", ".join(
        f"{e} epochs {hours(epoch_s * e)}" for e in BUDGETS))
    if (args.grid, dim) != (PAPER_GRID, PAPER_DIM):
        bank = sum(bank_sizes) / len(bank_sizes)
        ratio = (flops_per_iteration(args.n_images, PAPER_GRID ** 2, PAPER_DIM,
                                     args.batch_size, bank)
                 / flops_per_iteration(args.n_images, patches, dim, args.batch_size, bank))
        print(f"  FLOP-scaled to {PAPER_GRID}x{PAPER_GRID} patches, D={PAPER_DIM} (x{ratio:.0f}; "
              f"rough, same FLOP rate assumed): " + ", ".join(
                  f"{e} epochs {hours(epoch_s * ratio * e)}" for e in BUDGETS))


def bench_extraction(args, device: torch.device) -> None:
    """The backbone's one-off cost: tokens of ``--extract-images`` random images."""
    overrides = {"vit_overrides": TINY_VIT if args.tiny else ()}
    method = build_method("funad", overrides, teacher_weights="random", device=device, seed=0)
    backbone = method._build_backbone()
    size = backbone.patch_size * args.grid
    gen = torch.Generator().manual_seed(1)
    images = (torch.rand(args.extract_images, 3, size, size, generator=gen) * 255).to(torch.uint8)
    method.extract(images[:1])  # warm-up
    sync(device)
    start = time.perf_counter()
    method.extract(images)
    sync(device)
    took = time.perf_counter() - start
    per_image = took / args.extract_images
    print(f"funad features {backbone.model_name}{' (tiny)' if args.tiny else ''} at {size} px "
          f"on {device}: {per_image * 1000:.1f} ms/image, so {hours(per_image * args.n_images)} "
          f"for {args.n_images} images (once per fit)")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tiny", action="store_true",
                        help="40 images, 4 x 4 patches, 64-wide tokens, tiny ViT: runs in seconds")
    parser.add_argument("--n-images", type=int, default=250, help="training images")
    parser.add_argument("--grid", type=int, default=8,
                        help="patches per side (8 = 64 px; the paper's 224 px = 28)")
    parser.add_argument("--embed-dim", type=int, default=768, help="token width (ViT-B: 768)")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--epochs", type=int, default=2,
                        help="epochs to time (the first is dropped when there are several)")
    parser.add_argument("--feature-dtype", default="float16", choices=("float16", "float32"))
    parser.add_argument("--extract-images", type=int, default=4,
                        help="images for the backbone timing (0: skip it)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--threads", type=int, default=min(2, os.cpu_count() or 1))
    args = parser.parse_args(argv)
    if args.tiny:
        args.n_images, args.grid, args.embed_dim, args.batch_size = 40, 4, 32, 8
        args.epochs, args.extract_images = 2, min(args.extract_images, 2)
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    print(f"device={device} threads={args.threads} torch={torch.__version__}")
    bench_training(args, device)
    if args.extract_images > 0:
        bench_extraction(args, device)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
