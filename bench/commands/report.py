"""``run_benchmark.py report``: the paper's tables and figures from a results folder."""

from __future__ import annotations

import argparse

HELP = "render paper-style tables (Markdown, LaTeX, CSV), figures and report.md from results"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--results", required=True, metavar="DIR",
                        help="results folder (the one holding runs/)")
    parser.add_argument("--out", metavar="DIR", default=None,
                        help="where to write the report (default: DIR/report)")
    parser.add_argument("--pro", choices=("pro_rd4ad", "aupro"), default="pro_rd4ad",
                        help="PRO variant shown as 'PRO' (default pro_rd4ad, as RD-family "
                             "papers report it)")
    parser.add_argument("--no-figures", action="store_true",
                        help="tables and index only (faster)")
    parser.add_argument("--bootstrap", type=int, default=None, metavar="B",
                        help="bootstrap resamples per run for the 95 %% intervals over test "
                             "images (default 1000; 0: no intervals)")
    parser.add_argument("--bootstrap-seed", type=int, default=0, metavar="S",
                        help="seed of the resamples (default 0)")
    parser.add_argument("--reference", dest="references", action="append", default=None,
                        metavar="NAME",
                        help="paper name of a reference method for the paired comparisons "
                             "(repeatable; default RD and CDD)")
    parser.add_argument("--tsne", action="store_true",
                        help="also draw Fig. A1, the t-SNE of teacher features, which rebuilds "
                             "the teacher and reads the test images from the data root")
    parser.add_argument("--data-root", default=None, metavar="DIR",
                        help="data root for --tsne (default: the one in the records)")
    parser.add_argument("--tsne-categories", nargs="+", default=None, metavar="CAT",
                        help="categories for --tsne (default: carpet, grid, leather where "
                             "present, else the first three)")
    parser.add_argument("--tsne-points", type=int, default=None, metavar="N",
                        help="points per t-SNE panel (default 1000)")
    parser.add_argument("--device", default="cpu",
                        help="device of the teacher for --tsne (default cpu)")
    parser.add_argument("--plugin", dest="plugins", action="append", default=[],
                        metavar="MODULE",
                        help="import MODULE first (a method it registers gets its own column "
                             "title, order and paper values)")


def run(args: argparse.Namespace) -> int:
    from pathlib import Path

    from bench.errors import UserError
    from bench.report import render_report
    from methods.registry_loader import import_plugins

    import_plugins(args.plugins)
    for option, value in (("--results", args.results), ("--out", args.out)):
        if value is not None and Path(value).exists() and not Path(value).is_dir():
            raise UserError(f"{option} {value} is a file, not a folder; give the folder "
                            f"{'a sweep wrote (it holds runs/)' if option == '--results' else 'to write the report to'}")

    from bench.uncertainty import DEFAULT_REPLICATES

    if args.tsne and args.no_figures:
        from bench.errors import UserError

        raise UserError("--tsne draws a figure; drop --no-figures to use it")
    extra = {}
    if args.references:
        extra["references"] = tuple(args.references)
    path = render_report(
        args.results, args.out, pro=args.pro, figures=not args.no_figures,
        bootstrap=DEFAULT_REPLICATES if args.bootstrap is None else args.bootstrap,
        bootstrap_seed=args.bootstrap_seed, tsne=args.tsne, data_root=args.data_root,
        tsne_categories=args.tsne_categories, tsne_points=args.tsne_points,
        device=args.device, **extra)
    print(f"report written to {path}")
    return 0
