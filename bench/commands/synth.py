"""``run_benchmark.py synth``: write the synthetic MVTec-layout dataset from a seed."""

from __future__ import annotations

import time

HELP = "write the synthetic dataset (MVTec layout, PNG images and masks) from a seed"


def add_arguments(p) -> None:
    from datasets import SYNTHETIC_CATEGORIES

    p.add_argument(
        "--out",
        required=True,
        help="folder to write (created; must be empty or a tree written with the same parameters)",
    )
    p.add_argument("--seed", type=int, default=0, help="generator seed (default 0)")
    p.add_argument("--size", type=int, default=128, help="image side in pixels (default 128)")
    p.add_argument("--train", type=int, default=40, help="normal training images per category")
    p.add_argument("--test-good", type=int, default=10, help="normal test images per category")
    p.add_argument(
        "--test-anomalous",
        type=int,
        default=25,
        help="anomalous test images per category, balanced over defect types",
    )
    p.add_argument(
        "--categories",
        nargs="+",
        choices=SYNTHETIC_CATEGORIES,
        metavar="CATEGORY",
        help=f"subset of {', '.join(SYNTHETIC_CATEGORIES)} (default: all)",
    )
    p.add_argument("--force", action="store_true", help="replace a non-empty --out")


def run(args) -> int:
    from bench.commands.list import category_lines
    from datasets import generate_synthetic

    start = time.perf_counter()
    out = generate_synthetic(
        args.out,
        seed=args.seed,
        size=args.size,
        n_train=args.train,
        n_test_good=args.test_good,
        n_test_anomalous=args.test_anomalous,
        categories=args.categories,
        overwrite=args.force,
    )
    seconds = time.perf_counter() - start
    print(f"synthetic dataset (seed {args.seed}, {args.size}px) at {out} ({seconds:.1f} s):")
    print("\n".join(category_lines("synthetic", str(out))))
    return 0
