"""``run_benchmark.py run --preset NAME``: run a sweep, resumably, and track it.

Expands the preset (see :mod:`bench.sweep`) with the command-line overrides, skips runs that
already have a complete record, runs the rest on the chosen executor, writes every record
atomically under ``--results``, logs the sweep to MLflow and renders the report. Exit code 0 when
every run succeeded, 1 when some failed (they are listed at the end), 2 for bad input.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import importlib.util
import signal
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
                            help="methods or method presets instead of the preset's")
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
    from bench.runner import import_plugins
    from bench.sweep import expand, load_preset

    preset = with_image_size(load_preset(args.preset), args.image_size, args.resize_size)
    import_plugins(args.plugins)
    ensure_synthetic_data(preset, args.data_root)
    specs = expand(
        preset, data_root=args.data_root, categories=args.categories,
        noise_ratios=args.noise_ratios, seeds=args.seeds, methods=args.methods,
        teacher_weights=args.teacher_weights, sets=[s for group in args.sets for s in group],
    )
    if args.dry_run:
        return dry_run(specs, args.results, reuse=not args.no_reuse, force=args.force)
    return execute(preset, specs, args)


def with_image_size(preset, image_size: int | None, resize_size: int | None):
    """The preset with ``--image-size``/``--resize-size`` applied (PROTOCOL §3's 256 -> 224
    proportion when only the crop is given)."""
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


def ensure_synthetic_data(preset, data_root) -> None:
    """Write the synthetic dataset (seed 0, default size) where a synthetic sweep expects it and
    nothing exists yet, so ``run --preset ci`` works on a fresh clone. An existing folder is
    used as it is."""
    from bench.sweep import default_data_root
    from datasets import generate_synthetic

    if preset.dataset != "synthetic":
        return
    root = Path(data_root or preset.data_root or default_data_root(preset.dataset))
    if root.exists():
        return
    print(f"writing the synthetic dataset to {root} (seed 0) ...", flush=True)
    generate_synthetic(root, seed=0)


def dry_run(specs, results: Path, reuse: bool = True, force: bool = False) -> int:
    from bench.runner import partition
    from bench.twins import plan_reuse

    todo, done = partition(specs, results, force)
    plan = plan_reuse(todo, results, enabled=reuse, use_disk=not force)
    copied = {s for s, _ in plan.from_disk} | {s for v in plan.followers.values() for s in v}
    done_set = set(done)
    for spec in specs:
        state = "done" if spec in done_set else ("copy" if spec in copied else "todo")
        print(f"{state}  {spec.fingerprint[:12]}  {spec.label}  {dict(spec.config)}")
    reused = f" ({len(copied)} copied from a run that trains the same thing)" if copied else ""
    print(f"{len(specs)} runs, {len(done)} done, {len(specs) - len(done)} to run{reused}")
    return 0


def execute(preset, specs, args: argparse.Namespace, sweep_name: str | None = None) -> int:
    """Run ``specs`` with the executor/tracking/report options of ``args``; print a summary."""
    from bench.executors import make_executor
    from bench.runner import JobOptions, resolve_device, run_sweep
    from bench.tracking import Tracker, resolve_tracking_uri, ui_command

    if args.workers is not None and args.workers < 1:
        raise UserError(f"--workers must be at least 1, got {args.workers}")
    if not (args.executor == "ray" and args.ray_address):
        resolve_device(args.device)  # fail early on --device cuda without a GPU
    results = Path(args.results).resolve()
    results.mkdir(parents=True, exist_ok=True)
    name = sweep_name or preset.name
    uri = resolve_tracking_uri(results, args.tracking_uri)
    weights = specs[0].teacher_weights if specs else preset.teacher_weights
    out = sys.stdout
    print(f"sweep {name}: {preset.description}", file=out)
    print(f"  {len(specs)} runs on {args.executor} (device {args.device}); results {results}",
          file=out)
    if weights.startswith("random"):
        print("  teacher: randomly initialised (seeded) -- numbers are NOT comparable with the "
              "paper; use --teacher-weights imagenet for that", file=out)
    out.flush()
    write_sweep_plan(results, name, preset.name, specs)
    tracker = None
    if not args.no_tracking:
        tracker = Tracker(uri, name, sweep_info={
            "name": f"{name} ({len(specs)} runs)", "preset": preset.name, "executor": args.executor,
            "device": args.device, "teacher_weights": weights, "command": " ".join(sys.argv),
        })
    options = JobOptions(device=args.device, sweep=name, plugins=tuple(getattr(args, "plugins", ())),
                         cache_dir=args.cache_dir)
    executor = make_executor(args.executor, args.workers, args.device, args.ray_address)
    # Teacher weights that cannot be had (offline, wrong file) stop the sweep once, not every
    # run. A remote cluster's nodes may hold weights this machine lacks: not checked then.
    remote = args.executor == "ray" and args.ray_address
    with _sigterm_as_interrupt():
        summary = run_sweep(specs, results, executor=executor, options=options, tracker=tracker,
                            force=args.force, reuse=not args.no_reuse,
                            preflight=None if remote else check_teacher_weights)
    for line in summary.lines():
        print(line, file=out)
    code = summary.exit_code
    report = None
    if not args.no_report:
        report, failed = render_report(results)
        code = code or failed
        if report is not None and tracker is not None:
            tracker.log_report(report.parent)
    print(f"results: {results}", file=out)
    if report is not None:
        print(f"report:  {report} (tables and figures beside it)", file=out)
    if tracker is not None:
        print(f"MLflow:  {uri}\n  browse: {ui_command(uri)}", file=out)
    return code


def write_sweep_plan(results: Path, name: str, preset: str, specs) -> Path:
    """``<results>/sweeps/<name>.json``: every run the sweep means to make.

    The report lists a planned run without a record as "not run", so a sweep stopped before it
    reached some category shows the gap instead of a table that silently lacks the row.
    """
    from datetime import datetime, timezone

    from bench.records import write_json_atomic

    slug = "".join(c if c.isalnum() or c in "-_." else "-" for c in name) or "sweep"
    path = results / "sweeps" / f"{slug}.json"
    write_json_atomic(path, {
        "name": name, "preset": preset,
        "written": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "specs": [spec.to_dict() for spec in specs],
    })
    return path


def check_teacher_weights(specs) -> None:
    """Build each distinct (backbone, weights) teacher that ``specs`` (the runs that will
    train) need, once. Loading is where an offline ImageNet download, a file of the wrong
    network or a broken cache shows; here it is one line before anything starts."""
    from bench.twins import resolved_config
    from methods.backbones import build_teacher, random_teacher_seed

    pairs = set()
    for spec in specs:
        if random_teacher_seed(spec.teacher_weights) is not None:
            continue
        backbone = getattr(resolved_config(spec)[1], "backbone", None)
        if backbone is not None:
            pairs.add((backbone, spec.teacher_weights))
    for backbone, weights in sorted(pairs):
        build_teacher(backbone, weights)


@contextlib.contextmanager
def _sigterm_as_interrupt():
    """Treat SIGTERM (a batch scheduler's stop) like Ctrl-C: clean stop, sweep marked killed."""

    def interrupt(signum, frame):
        raise KeyboardInterrupt

    try:
        previous = signal.signal(signal.SIGTERM, interrupt)
    except ValueError:  # not the main thread: leave signals alone
        yield
        return
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def render_report(results: Path) -> tuple[Path | None, int]:
    """Render ``<results>/report`` when the report module is installed; (path, exit code)."""
    if importlib.util.find_spec("bench.report") is None:
        return None, 0
    from bench.report import render_report as render

    try:
        return Path(render(results, results / "report")), 0
    except UserError:
        raise
    except Exception as err:  # noqa: BLE001 - the runs are safe; say what broke
        print(f"warning: the report could not be rendered: {type(err).__name__}: {err}",
              file=sys.stderr)
        return None, 1
