"""``run_benchmark.py regress``: check a results folder against a committed metric baseline.

Exit code 0 when nothing regressed (and no baseline run is missing, unless ``--allow-missing``),
1 otherwise, 2 for bad input. ``--update`` writes a new baseline from the results (after showing
the comparison with the old one, if there is one) and exits 0. See :mod:`bench.regress` and
docs/regress.md for the matching and tolerance rules.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from bench.errors import UserError
from bench.records import METRIC_NAMES

HELP = ("compare results with a metric baseline (each run vs mean - k*std over seeds); "
        "--update rewrites it")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--results", required=True, type=Path, metavar="DIR",
                        help="results folder (the one holding runs/)")
    parser.add_argument("--baseline", required=True, type=Path, metavar="FILE",
                        help="baseline file (.json, or .yaml/.yml), e.g. results/baselines/ci.json")
    parser.add_argument("--k", type=float, default=None,
                        help="regress below mean - k*std (default: the baseline's, else 3)")
    parser.add_argument("--rule", choices=regress_rules(), default=None,
                        help="run: every run must stay above the threshold; mean: the group's "
                             "mean must (default: the baseline's, else run)")
    parser.add_argument("--min-tol", type=float, default=None, metavar="X",
                        help="smallest tolerated drop in metric units, so std=0 survives float "
                             "noise (default: the baseline's, else 0.005)")
    parser.add_argument("--floor", action="append", default=[], metavar="METRIC=VALUE",
                        help="absolute floor for a metric, e.g. i_auroc=0.6 (repeatable; "
                             "stored in the baseline with --update)")
    parser.add_argument("--metrics", nargs="+", choices=METRIC_NAMES, metavar="METRIC",
                        help=f"metrics to compare (default: the baseline's; {' '.join(METRIC_NAMES)})")
    parser.add_argument("--allow-missing", action="store_true",
                        help="baseline runs without a result now do not fail the check")
    parser.add_argument("--only-problems", action="store_true",
                        help="print only regressed rows (and missing/failed runs)")
    parser.add_argument("--json", type=Path, metavar="FILE",
                        help="also write the comparison as JSON (e.g. a CI artefact)")
    parser.add_argument("--update", action="store_true",
                        help="write a new baseline from --results to --baseline, then exit 0")


def regress_rules() -> tuple[str, ...]:
    from bench.regress import RULES

    return RULES


def _floors(items: list[str]) -> dict[str, float]:
    floors = {}
    for item in items:
        name, sep, value = item.partition("=")
        try:
            if not sep:
                raise ValueError
            floors[name.strip()] = float(value)
        except ValueError:
            raise UserError(f"--floor {item!r} is not METRIC=VALUE; e.g. --floor i_auroc=0.6"
                            ) from None
    return floors


def run(args: argparse.Namespace) -> int:
    from bench import regress
    from bench.records import write_json_atomic

    floors = _floors(args.floor)
    # Where the command will write, checked before it compares anything.
    if args.update:
        regress.check_writable_file(args.baseline, "baseline")
    if args.json:
        regress.check_writable_file(args.json, "--json file")
    results = regress.Results.load(args.results)
    if args.update and not results.groups:  # said before any warning about the old baseline
        raise UserError(f"no complete run in {args.results}; run the sweep before writing a "
                        f"baseline")
    old = None
    if not args.update:
        old = regress.load_baseline(args.baseline)
    elif args.baseline.is_file():
        try:
            old = regress.load_baseline(args.baseline)
        except UserError as err:  # --update is the way out of a broken baseline
            problem = str(err).split("; ")[0]  # drop the advice: --update is what runs now
            print(f"warning: {problem}; nothing to compare with, writing a new baseline",
                  file=sys.stderr)
    if old is not None:
        comparison = regress.compare(old, results, k=args.k, min_tolerance=args.min_tol,
                                     floors=floors, metrics=args.metrics,
                                     allow_missing=args.allow_missing, rule=args.rule)
        print(regress.format_table(comparison, only_problems=args.only_problems))
        if args.json:
            write_json_atomic(args.json, regress.comparison_dict(comparison))
    if args.update:
        previous = old or {}
        baseline = regress.build_baseline(
            results,
            k=args.k if args.k is not None else float(previous.get("k", regress.DEFAULT_K)),
            min_tolerance=(args.min_tol if args.min_tol is not None else
                           float(previous.get("min_tolerance", regress.DEFAULT_MIN_TOLERANCE))),
            rule=args.rule or previous.get("rule") or regress.DEFAULT_RULE,
            floors={**(previous.get("floors") or {}), **floors},
            metrics=args.metrics or previous.get("metrics") or METRIC_NAMES,
            source=str(args.results))
        regress.write_baseline(args.baseline, baseline)
        n_runs = baseline["source"]["runs"]
        print(f"baseline written to {args.baseline}: {len(baseline['groups'])} groups, "
              f"{n_runs} runs")
        return 0
    return 0 if comparison.passed else 1
