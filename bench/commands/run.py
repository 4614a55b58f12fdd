"""``run_benchmark.py run --preset NAME``: run a sweep, resumably, and track it.

Parses the command line, expands the sweep preset (:mod:`bench.sweep`) with its overrides and
hands the runs to :func:`bench.driver.execute_sweep`, which skips runs that already have a
complete record, runs the rest on the chosen executor, writes every record atomically under
``--results``, logs the sweep to MLflow and renders the report. Exit code 0 when every run
succeeded, 1 when some failed (they are listed at the end), 2 for bad input.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
from pathlib import Path

from bench.errors import UserError

HELP = "run a sweep preset (resumable; MLflow-tracked; local, processes or ray executor)"
DEFAULT_RESULTS = Path("results") / "runs"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--preset", required=True,
                        help="preset name (bench/presets/*.yaml) or a path to a preset .yaml")
    add_sweep_arguments(parser)


def add_sweep_arguments(parser: argparse.ArgumentParser, results_default: Path = DEFAULT_RESULTS,
                        selection: bool = True) -> None:
    """Options shared by ``run`` and ``demo``."""
    parser.add_argument("--data-root", help="dataset folder (default: the preset's, else data/<dataset>)")
    if selection:
        parser.add_argument("--categories", nargs="+", metavar="CAT", help="only these categories")
        parser.add_argument("--noise-ratios", nargs="+", type=float, metavar="R",
                            help="noise ratios instead of the preset's")
        parser.add_argument("--seeds", nargs="+", type=int, metavar="S",
                            help="seeds instead of the preset's (split seed = training seed)")
        parser.add_argument("--methods", nargs="+", metavar="M",
                            help="methods or method variants instead of the preset's")
        parser.add_argument("--set", dest="sets", action="append", default=[], nargs="+",
                            metavar="KEY=VALUE",
                            help="config override for every method (key=value) or one "
                                 "(method.key=value); type-checked against the method's config")
        parser.add_argument("--plugin", dest="plugins", action="append", default=[],
                            metavar="MODULE", help="import MODULE first (it may register methods)")
        parser.add_argument("--dry-run", action="store_true",
                            help="list the runs and whether they are done, then stop")
    parser.add_argument("--image-size", type=int, metavar="PX",
                        help="center-crop size instead of the preset's (multiple of 32 for "
                             "RD/CDD); the resize follows at 256/224 of it unless --resize-size")
    parser.add_argument("--resize-size", type=int, metavar="PX",
                        help="resize before the crop (default: the preset's, or 256/224 of "
                             "--image-size)")
    parser.add_argument("--device", default="auto", help="auto (default), cpu, cuda or cuda:N")
    parser.add_argument("--teacher-weights", help="imagenet, random (seed 0), random:N or a state_dict file")
    parser.add_argument("--executor", default="local", choices=("local", "processes", "ray"),
                        help="where runs execute (default: local, in this process)")
    parser.add_argument("--workers", type=int,
                        help="parallel runs (processes: default = GPUs or 1; ray: local CPUs)")
    parser.add_argument("--ray-address", help="existing Ray cluster (default: a local instance)")
    parser.add_argument("--results", type=Path, default=results_default,
                        help=f"results folder (default: {results_default})")
    parser.add_argument("--cache-dir", help="on-disk cache of decoded images shared by runs")
    parser.add_argument("--tracking-uri",
                        help="MLflow store (default: $MLFLOW_TRACKING_URI, else "
                             "sqlite:///<results>/mlflow.db)")
    parser.add_argument("--no-tracking", action="store_true", help="do not log to MLflow")
    parser.add_argument("--force", action="store_true", help="rerun runs that are already done")
    parser.add_argument("--no-reuse", action="store_true",
                        help="train every spec itself, even one that trains exactly what another "
                             "does (e.g. the same config under two ablation-row names)")
    parser.add_argument("--no-report", action="store_true", help="do not render the report")


def run(args: argparse.Namespace) -> int:
    from bench.driver import dry_run_states, ensure_synthetic_data
    from bench.sweep import default_data_root, expand, load_preset
    from methods.registry_loader import import_plugins

    preset = with_image_size(load_preset(args.preset), args.image_size, args.resize_size)
    import_plugins(args.plugins)
    root = Path(args.data_root or preset.data_root or default_data_root(preset.dataset))
    if preset.dataset == "synthetic" and not root.exists():
        if args.data_root:  # a path the user typed: a typo must not grow a dataset there
            raise UserError(f"synthetic data root {root} does not exist; write it with "
                            f"`run_benchmark.py synth --out {root}`, or leave --data-root out "
                            f"to use (and on first use write) "
                            f"{preset.data_root or default_data_root(preset.dataset)}")
        print(f"writing the synthetic dataset to {root} (seed 0) ...", flush=True)
        ensure_synthetic_data(preset.dataset, root)
    specs = expand(
        preset, data_root=args.data_root, categories=args.categories,
        noise_ratios=args.noise_ratios, seeds=args.seeds, methods=args.methods,
        teacher_weights=args.teacher_weights, sets=[s for group in args.sets for s in group],
    )
    if args.dry_run:
        states = dry_run_states(specs, args.results, reuse=not args.no_reuse, force=args.force)
        for state, spec in states:
            print(f"{state}  {spec.fingerprint[:12]}  {spec.label}  {dict(spec.config)}")
        done = sum(state == "done" for state, _ in states)
        copied = sum(state == "copy" for state, _ in states)
        reused = f" ({copied} copied from a run that trains the same thing)" if copied else ""
        print(f"{len(specs)} runs, {done} done, {len(specs) - done} to run{reused}")
        return 0
    return execute(preset, specs, args)


def with_image_size(preset, image_size: int | None, resize_size: int | None):
    """The preset with ``--image-size``/``--resize-size`` applied (the paper's 256 -> 224
    proportion when only the crop is given; docs/protocol.md §3)."""
    if image_size is None and resize_size is None:
        return preset
    crop = preset.image_size if image_size is None else image_size
    if resize_size is None:
        resize_size = round(crop * 256 / 224) if image_size is not None else preset.resize_size
    if crop < 1 or resize_size < crop:
        raise UserError(f"--image-size {crop} / --resize-size {resize_size}: the crop must be "
                        f"positive and no larger than the resize")
    # The command line's geometry is every method's: entries lose their own.
    methods = tuple(dataclasses.replace(m, image_size=None, resize_size=None)
                    for m in preset.methods)
    return dataclasses.replace(preset, image_size=crop, resize_size=resize_size, methods=methods)


def execute(preset, specs, args: argparse.Namespace, sweep_name: str | None = None) -> int:
    """Run ``specs`` with the executor/tracking/report options of ``args``; print a summary."""
    from bench.driver import SweepSettings, execute_sweep
    from bench.tracking import ui_command

    settings = SweepSettings(
        name=sweep_name or preset.name, preset=preset.name, description=preset.description,
        results=Path(args.results), executor=args.executor, workers=args.workers,
        device=args.device, ray_address=args.ray_address, tracking=not args.no_tracking,
        tracking_uri=args.tracking_uri, force=args.force, reuse=not args.no_reuse,
        report=not args.no_report, cache_dir=args.cache_dir,
        plugins=tuple(getattr(args, "plugins", ())), command=" ".join(sys.argv),
    )
    outcome = execute_sweep(specs, settings, say=lambda line: print(line, flush=True))
    print(f"results: {outcome.results}")
    if outcome.report is not None:
        print(f"report:  {outcome.report} (tables and figures beside it)")
    if outcome.tracking_uri is not None:
        print(f"MLflow:  {outcome.tracking_uri}\n  browse: {ui_command(outcome.tracking_uri)}")
    return outcome.exit_code
