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

    path = render_report(args.results, args.out, pro=args.pro, figures=not args.no_figures)
    print(f"report written to {path}")
    return 0
