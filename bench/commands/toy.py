"""``run_benchmark.py toy``: the data roots of the appendix A.2 toy experiment (Figs. A2-A4)."""

from __future__ import annotations

import argparse

HELP = ("write the toy-experiment data root (appendix A.2): per category 40 normal + 4 "
        "anomalous training images, and the same split into two domains")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--dataset", default="mvtec", help="dataset of the source data "
                        "(mvtec, visa, synthetic; default mvtec)")
    parser.add_argument("--data-root", required=True, metavar="DIR",
                        help="the source dataset (e.g. the MVTec AD folder)")
    parser.add_argument("--out", required=True, metavar="DIR",
                        help="where to write the toy categories and toy.json")
    parser.add_argument("--categories", nargs="+", default=None, metavar="NAME",
                        help="source categories (default: the paper's cable, metal_nut, "
                             "transistor)")
    parser.add_argument("--normals", type=int, default=40,
                        help="normal training images per category (paper: 40)")
    parser.add_argument("--anomalous", type=int, default=4,
                        help="anomalous training images per category (paper: 4)")
    parser.add_argument("--shared", type=float, default=0.5,
                        help="share of the normal images in both domains (paper: 0.5)")
    parser.add_argument("--selection", choices=("paired", "random"), default="paired",
                        help="paired (default): two images of each of two defect types, one "
                             "of each per domain; random: any anomalous images")
    parser.add_argument("--seed", type=int, default=0, help="seed of every draw (default 0)")
    parser.add_argument("--copy", action="store_true",
                        help="copy the files instead of linking them")


def run(args: argparse.Namespace) -> int:
    from bench.toy import PAPER_TOY_CATEGORIES, build_toy_root

    categories = args.categories or list(PAPER_TOY_CATEGORIES)
    out = build_toy_root(args.dataset, args.data_root, args.out, categories,
                         normals=args.normals, anomalous=args.anomalous, shared=args.shared,
                         selection=args.selection, seed=args.seed, copy=args.copy)
    print(f"toy data written to {out} ({out / 'toy.json'} lists the training sets)")
    names = " ".join(f"{c}-toy {c}-toy-d1 {c}-toy-d2" for c in categories)
    extra = "" if list(categories) == list(PAPER_TOY_CATEGORIES) else f" --categories {names}"
    print(f"run it: python run_benchmark.py run --preset toy-a2 --data-root {out}{extra}")
    return 0
