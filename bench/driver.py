"""The driver's side of a sweep: plan, reuse, write, track, report.

Workers compute (:mod:`bench.worker`, one spec -> one result, no files written); this module
is the single writer. :func:`execute_sweep` is a whole ``run`` command without its argument
parsing. Before it writes anything it checks what can be checked (:func:`check_sweep`: device,
workers, folders, the tracking server, and for the runs that will train their geometry, their
data, every file decoded, and their teacher weights), so bad input stops with one line and an
untouched results folder. Then it takes the results folder's lock (one sweep per folder:
:func:`results_lock`), writes the sweep plan, sets up MLflow tracking (finishing what a killed
sweep left ``RUNNING``), runs the sweep (:func:`run_sweep`) and renders the report.

:func:`run_sweep` skips runs that are already done (unless forced), shares trainings between
specs that train the same thing (:mod:`bench.twins`), hands the rest to an executor
(:mod:`bench.executors`) and, as each result streams back, writes it atomically (scores and
manifest first, the record last, listing their sizes and hashes: the record is the done marker)
and logs it to MLflow. Ctrl-C leaves finished runs complete and no partial record.
"""

from __future__ import annotations

import contextlib
import importlib.util
import json
import os
import signal
import socket
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from bench import twins
from bench.errors import UserError
from bench.executors import LocalExecutor, make_executor
from bench.identity import resolved_config
from bench.records import (
    FILES_KEY,
    MANIFEST_FILE,
    RECORD_FILE,
    SCORES_FILE,
    file_entry,
    is_done,
    load_record,
    run_dir,
    write_bytes_atomic,
    write_json_atomic,
)
from bench.spec import RunSpec
from bench.util import first_line, utc_timestamp
from bench.worker import JobOptions, RunResult, image_cache, resolve_device

LOCK_FILE = "sweep.lock"
OWNER_FILE = "sweep-owner.json"
DATA_CHECK_FILE = "data-check.json"


def write_result(results: str | os.PathLike, result: RunResult) -> Path:
    """Store a result: files first, the record last, listing each file's size and SHA-256
    (the record is the done marker, and says what a whole run folder holds)."""
    folder = run_dir(results, result.record["fingerprint"])
    folder.mkdir(parents=True, exist_ok=True)
    record_path = folder / RECORD_FILE
    # A rerun first retracts the old record, so old record + new scores never pair up.
    try:
        os.unlink(record_path)
    except FileNotFoundError:
        pass
    files = {}
    for name, data in ((SCORES_FILE, result.scores), (MANIFEST_FILE, result.manifest)):
        if data is not None:
            write_bytes_atomic(folder / name, data)
            files[name] = file_entry(data)
    write_json_atomic(record_path, {**result.record, FILES_KEY: files})
    return folder


def partition(specs: Sequence[RunSpec], results: str | os.PathLike,
              force: bool = False) -> tuple[list[RunSpec], list[RunSpec]]:
    """(to run, already done): done = a complete record with the same fingerprint whose files
    are whole (:func:`bench.records.is_done`); a truncated ``scores.npz`` runs again."""
    todo, done = [], []
    for spec in specs:
        folder = run_dir(results, spec.fingerprint)
        record = load_record(folder / RECORD_FILE)
        complete = (record is not None and record.get("fingerprint") == spec.fingerprint
                    and is_done(folder, record))
        (done if complete and not force else todo).append(spec)
    return todo, done


@dataclass
class SweepSummary:
    """What happened to each run of a sweep."""

    total: int = 0
    skipped: list[RunSpec] = field(default_factory=list)
    ok: list[RunSpec] = field(default_factory=list)
    failed: list[tuple[RunSpec, dict]] = field(default_factory=list)  # (spec, error)
    reused: list[RunSpec] = field(default_factory=list)  # ok runs copied from an identical one
    elapsed_s: float = 0.0
    interrupted: bool = False

    @property
    def exit_code(self) -> int:
        if self.interrupted:
            return 130
        return 1 if self.failed else 0

    def lines(self) -> list[str]:
        reused = (f" ({len(self.reused)} copied from runs that train the same thing)"
                  if self.reused else "")
        out = [f"{len(self.ok)} ok{reused}, {len(self.failed)} failed, {len(self.skipped)} "
               f"skipped (already done) of {self.total} runs in {self.elapsed_s:.0f} s"]
        for spec, error in self.failed:
            out.append(f"  FAILED {spec.label} [{spec.fingerprint[:12]}]: {_error_line(error)}")
        return out


def _error_line(error: Mapping[str, Any]) -> str:
    """``Type: first line``; a UserError's line (DataError too) says what to do, often with a
    path: never cut."""
    limit = None if error.get("user_error") or error.get("type") == "UserError" else 200
    return f"{error.get('type')}: {first_line(error.get('message', ''), limit)}"


def run_sweep(
    specs: Sequence[RunSpec],
    results: str | os.PathLike,
    *,
    executor=None,
    options: JobOptions | None = None,
    tracker=None,
    force: bool = False,
    progress: bool = True,
    log: Callable[[str], None] | None = None,
    reuse: bool = True,
    preflight: Callable[[list[RunSpec]], None] | None = None,
) -> SweepSummary:
    """Run every spec not already done; write and track each result as it arrives.

    ``executor`` is an object from :func:`bench.executors.make_executor` (local by default);
    ``tracker`` a :class:`bench.tracking.Tracker` or None. With ``reuse``, specs that train the
    same thing share one training (:mod:`bench.twins`); records on disk are reused unless
    ``force``. ``preflight`` gets the specs that will train before anything starts (a check
    that may raise, e.g. that their teacher weights can be loaded).
    """
    from tqdm.auto import tqdm

    log = log or (lambda line: print(line, file=sys.stderr))
    executor = executor or LocalExecutor()
    options = options or JobOptions()
    started = time.time()
    todo, done = partition(specs, results, force)
    plan = twins.plan_reuse(todo, results, enabled=reuse, use_disk=not force)
    if preflight is not None:
        preflight(plan.leaders)
    summary = SweepSummary(total=len(specs), skipped=done)
    if tracker is not None:
        tracker.start_sweep(total=len(specs), todo=len(todo))
        tracker.log_existing(results, done)
    # The bar counts the whole sweep; runs already done start it off (the ETA uses the rest).
    bar = tqdm(total=len(specs), initial=len(done), desc=options.sweep or "sweep", unit="run",
               disable=not progress, file=sys.stderr, dynamic_ncols=True)
    bar.set_postfix(failed=0)

    def store(spec: RunSpec, result: RunResult, reused: bool = False) -> None:
        folder = write_result(results, result)
        if result.ok:
            summary.ok.append(spec)
            if reused:
                summary.reused.append(spec)
        else:
            error = result.record.get("error") or {}
            summary.failed.append((spec, error))
            bar.write(f"failed: {spec.label}: {_error_line(error)}", file=sys.stderr)
        if tracker is not None:
            tracker.log_run(result.record, folder)
        bar.update(1)
        bar.set_postfix(failed=len(summary.failed))

    try:
        for spec, folder in plan.from_disk:
            store(spec, twins.copy_from_disk(spec, folder, options.sweep), reused=True)
        for spec, result in executor.run(plan.leaders, options):
            store(spec, result)
            for twin in plan.followers.get(spec.fingerprint, ()):
                store(twin, twins.copy_result(result.record, twin, spec.fingerprint,
                                              result.scores, result.manifest, options.sweep),
                      reused=True)
            # Copies an earlier sweep made of a run retrained now (--force) follow it.
            for twin in plan.stale_copies.get(spec.fingerprint, ()):
                write_result(results, twins.copy_result(
                    result.record, twin, spec.fingerprint, result.scores, result.manifest,
                    options.sweep))
    except KeyboardInterrupt:
        summary.interrupted = True
        raise
    finally:
        bar.close()
        summary.elapsed_s = time.time() - started
        if tracker is not None:
            tracker.end_sweep(summary)
    return summary


# --------------------------------------------------------------------------------------------
# A whole sweep, as the ``run`` and ``demo`` commands execute it.


@dataclass(frozen=True)
class SweepSettings:
    """How to run a sweep: everything of ``run``'s command line except what selects the runs."""

    name: str  # the sweep's name (MLflow experiment, plan file)
    preset: str  # the sweep preset it came from
    description: str = ""
    results: Path = Path("results") / "runs"
    executor: str = "local"
    workers: int | None = None
    device: str = "auto"
    ray_address: str | None = None
    tracking: bool = True
    tracking_uri: str | None = None
    force: bool = False
    reuse: bool = True
    report: bool = True
    cache_dir: str | None = None
    plugins: tuple[str, ...] = ()
    command: str = ""  # the command line, for the sweep's MLflow run


@dataclass
class SweepOutcome:
    """What :func:`execute_sweep` did; ``exit_code`` is the command's."""

    summary: SweepSummary
    results: Path
    report: Path | None = None
    report_failed: bool = False
    tracking_uri: str | None = None

    @property
    def exit_code(self) -> int:
        return self.summary.exit_code or int(self.report_failed)


def execute_sweep(specs: Sequence[RunSpec], settings: SweepSettings,
                  say: Callable[[str], None] = print) -> SweepOutcome:
    """Run ``specs`` as ``settings`` say; ``say`` receives the lines a user should read.

    Bad input raises a one-line :class:`UserError` before anything is written (see the module
    docstring); a second sweep on a results folder that one is running on stops the same way.
    """
    from bench.tracking import Tracker, resolve_tracking_uri

    results = Path(settings.results).expanduser().resolve()
    checked = check_sweep(specs, settings, results, say)
    uri = resolve_tracking_uri(results, settings.tracking_uri)
    weights = specs[0].teacher_weights if specs else ""
    with results_lock(results, settings.command):
        if checked.verdicts is not None:
            checked.verdicts.save()
        say(f"sweep {settings.name}: {settings.description}")
        say(f"  {len(specs)} runs on {settings.executor} (device {settings.device}); results "
            f"{results}")
        if weights.startswith("random"):
            say("  teacher: randomly initialised (seeded) -- numbers are NOT comparable with the "
                "paper; use --teacher-weights imagenet for that")
        write_sweep_plan(results, settings.name, settings.preset, specs)
        tracker = None
        if settings.tracking:
            tracker = Tracker(uri, settings.name, results_dir=results, sweep_info={
                "name": f"{settings.name} ({len(specs)} runs)", "preset": settings.preset,
                "executor": settings.executor, "device": settings.device,
                "teacher_weights": weights, "command": settings.command,
            })
            # We hold the folder's lock: a RUNNING run of this folder is a dead sweep's.
            tracker.reconcile(results, say=say)
        options = JobOptions(device=settings.device, sweep=settings.name,
                             plugins=settings.plugins, cache_dir=settings.cache_dir)
        with _sigterm_as_interrupt():
            summary = run_sweep(specs, results, executor=checked.executor, options=options,
                                tracker=tracker, force=settings.force, reuse=settings.reuse)
        for line in summary.lines():
            say(line)
        outcome = SweepOutcome(summary, results, tracking_uri=uri if tracker else None)
        if settings.report:
            outcome.report, outcome.report_failed = render_report(results)
            if outcome.report is not None and tracker is not None:
                tracker.log_report(outcome.report.parent)
    return outcome


@dataclass
class CheckedSweep:
    """What :func:`check_sweep` found and built: the executor, and the decode verdicts to keep
    once the sweep holds its folder (None when the data was not checked here)."""

    executor: Any
    verdicts: Any = None


def check_sweep(specs: Sequence[RunSpec], settings: SweepSettings, results: Path,
                say: Callable[[str], None] = print) -> CheckedSweep:
    """Everything a sweep can check before it writes anything; the first problem raises a
    one-line :class:`UserError`. Reads only (records, data, weights).

    The runs that will train are those :func:`partition` and :func:`bench.twins.plan_reuse`
    leave to an executor; their data and teacher weights are checked, not those of runs that
    are done or copied. A cluster's nodes (``--ray-address``) may hold data and weights this
    machine lacks: those are not checked then.
    """
    from bench.tracking import check_tracking_store, resolve_tracking_uri

    if settings.workers is not None and settings.workers < 1:
        raise UserError(f"--workers must be at least 1, got {settings.workers}")
    remote = settings.executor == "ray" and bool(settings.ray_address)
    if not remote:
        resolve_device(settings.device)  # fail early on --device cuda without a GPU
    check_folder(results, "results folder", "--results")
    if settings.cache_dir is not None:
        check_folder(Path(settings.cache_dir).expanduser(), "image cache folder", "--cache-dir")
    check_not_running(results)
    check_geometry(specs)
    if not remote:
        from methods.backbones import check_weights_name

        for weights in sorted({spec.teacher_weights for spec in specs}):
            check_weights_name(weights)
    if settings.tracking:
        check_tracking_store(resolve_tracking_uri(results, settings.tracking_uri), results)
    executor = make_executor(settings.executor, settings.workers, settings.device,
                             settings.ray_address)
    if hasattr(executor, "check"):  # e.g. Ray installed, its cluster reachable
        executor.check()
    todo, _ = partition(specs, results, settings.force)
    leaders = twins.plan_reuse(todo, results, enabled=settings.reuse,
                               use_disk=not settings.force).leaders
    checked = CheckedSweep(executor)
    if not remote and leaders:
        from datasets import DecodeVerdicts

        checked.verdicts = DecodeVerdicts(results / DATA_CHECK_FILE)
        # A local sweep's runs read the images the check decoded from the same cache.
        cache = image_cache(settings.cache_dir) if settings.executor == "local" else None
        check_data(leaders, checked.verdicts, cache=cache, cache_dir=settings.cache_dir,
                   say=say)
        check_method_geometry(leaders)
        check_teacher_weights(leaders)
    return checked


def check_method_geometry(specs) -> None:
    """Each method's own limits on the image size of the runs ``specs`` (those that will
    train): :meth:`methods.base.Method.geometry_check`, once per method, config and size."""
    from methods.base import get_method_class

    seen = set()
    for spec in specs:
        method, config = resolved_config(spec)
        key = (method, repr(config), spec.image_size, spec.resize_size)
        if key not in seen:
            seen.add(key)
            get_method_class(method).geometry_check(config, spec.image_size, spec.resize_size)


def check_folder(path: Path, what: str, option: str) -> None:
    """``path`` is a folder or can be made one: not a file, and its nearest existing ancestor
    a writable folder. Creates nothing."""
    if path.exists():
        if not path.is_dir():
            raise UserError(f"{what} {path} is a file, not a folder; give a folder with {option}")
        if not os.access(path, os.W_OK | os.X_OK):
            raise UserError(f"{what} {path} is not writable; give another folder with {option}")
        return
    ancestor = path.parent
    while not ancestor.exists() and ancestor != ancestor.parent:
        ancestor = ancestor.parent
    if not ancestor.is_dir():
        raise UserError(f"{what} {path} cannot be created: {ancestor} is a file; give another "
                        f"folder with {option}")
    if not os.access(ancestor, os.W_OK | os.X_OK):
        raise UserError(f"{what} {path} cannot be created: {ancestor} is not writable; give "
                        f"another folder with {option}")


def check_geometry(specs: Sequence[RunSpec]) -> None:
    """Every run's resize and crop make a valid :class:`datasets.Preprocess`."""
    from datasets import Preprocess

    for resize, crop in sorted({(s.resize_size, s.image_size) for s in specs}):
        try:
            Preprocess(resize=resize, crop=crop)
        except UserError as err:
            raise UserError(f"image geometry resize {resize} / crop {crop}: {err} (--image-size,"
                            f" --resize-size or the preset's image_size/resize_size)") from None


# What a run's split error says to do, in ``run``'s words (the library's default names no
# command-line option).
RUN_INFEASIBLE_ADVICE = ("lower --noise-ratios to at most {largest}, or leave the category out "
                         "with --categories")


def check_data(specs: Sequence[RunSpec], verdicts=None, *, cache=None,
               cache_dir: str | None = None, workers: int | None = None,
               say: Callable[[str], None] | None = None) -> int:
    """Check the data of every distinct (dataset, data root, category) ``specs`` read: the
    category loads, each split they draw is feasible, every image and mask decodes at their
    geometry (:func:`datasets.check_category`). Returns how many files were decoded (the others
    had a verdict in ``verdicts``)."""
    from datasets import ImageCache, check_category, load_category

    groups: dict[tuple[str, str, str], list[RunSpec]] = {}
    for spec in specs:
        groups.setdefault((spec.dataset, spec.data_root, spec.category), []).append(spec)
    if cache is None:
        # Decoded arrays are not kept, but a --cache-dir on disk serves the workers too.
        cache = ImageCache(cache_dir, max_memory_mb=0) if cache_dir else None
    workers = workers or min(8, os.cpu_count() or 1)
    # Layouts first (a directory listing each): a missing folder stops before any decoding.
    loaded = {key: load_category(*key) for key in sorted(groups)}
    if say is not None:
        pending = sum(1 for data in loaded.values() for s in [*data.train, *data.test]
                      if verdicts is None or not verdicts.known(s))
        if pending:
            say(f"checking the data: decoding {pending} images (and their masks) the runs will "
                f"read; a rerun skips the files that did not change")
    decoded = total = 0
    started = time.perf_counter()
    for (dataset, root, category), group in sorted(groups.items()):
        data = loaded[(dataset, root, category)]
        result = check_category(
            data, {(s.noise_ratio, s.split_seed) for s in group},
            {(s.resize_size, s.image_size) for s in group}, verdicts=verdicts, cache=cache,
            workers=workers, infeasible_advice=RUN_INFEASIBLE_ADVICE)
        decoded += result.decoded
        total += result.samples
    if say is not None and decoded:
        say(f"data checked: {len(groups)} categories, {decoded} of {total} images decoded "
            f"in {time.perf_counter() - started:.1f} s")
    return decoded


def check_not_running(results: Path) -> None:
    """A sweep already running on ``results`` (holding its lock) stops this one, before it
    checks or writes anything; creates nothing."""
    if (results / LOCK_FILE).is_file():
        with results_lock(results, probe=True):
            pass


@contextlib.contextmanager
def results_lock(results: Path, command: str = "", probe: bool = False):
    """Hold ``<results>/sweep.lock`` for the duration: one sweep per results folder.

    A second sweep stops at once with one line naming the first (its pid, host, start time and
    command, from ``sweep-owner.json``). The lock is the operating system's (``flock`` through
    :mod:`filelock`), so a sweep killed by any signal releases it. ``probe`` only tries it.
    """
    from filelock import FileLock, Timeout

    if not probe:
        results.mkdir(parents=True, exist_ok=True)
    lock = FileLock(str(results / LOCK_FILE), timeout=0)
    try:
        lock.acquire()
    except Timeout:
        raise UserError(f"another sweep is running on results folder {results} "
                        f"({_owner_text(results)}); wait for it to finish or give another "
                        f"--results") from None
    try:
        if not probe:
            write_json_atomic(results / OWNER_FILE, {
                "pid": os.getpid(), "host": socket.gethostname(), "started": utc_timestamp(),
                "command": command})
        yield
    finally:
        lock.release()


def _owner_text(results: Path) -> str:
    try:
        owner = json.loads((results / OWNER_FILE).read_text(encoding="utf-8"))
        return (f"pid {owner.get('pid')} on {owner.get('host')}, started "
                f"{owner.get('started')}")
    except (OSError, ValueError, AttributeError):
        return "its owner is not recorded"


def dry_run_states(specs: Sequence[RunSpec], results: Path, reuse: bool = True,
                   force: bool = False) -> list[tuple[str, RunSpec]]:
    """What a sweep would do with each spec: ``done``, ``copy`` (from a run that trains the
    same thing) or ``todo``."""
    todo, done = partition(specs, results, force)
    plan = twins.plan_reuse(todo, results, enabled=reuse, use_disk=not force)
    copied = {s for s, _ in plan.from_disk} | {s for v in plan.followers.values() for s in v}
    done_set = set(done)
    return [("done" if spec in done_set else "copy" if spec in copied else "todo", spec)
            for spec in specs]


def write_sweep_plan(results: Path, name: str, preset: str, specs) -> Path:
    """``<results>/sweeps/<name>.json``: every run the sweep means to make.

    The report lists a planned run without a record as "not run", so a sweep stopped before it
    reached some category shows the gap instead of a table that silently lacks the row.
    """
    slug = "".join(c if c.isalnum() or c in "-_." else "-" for c in name) or "sweep"
    path = results / "sweeps" / f"{slug}.json"
    write_json_atomic(path, {
        "name": name, "preset": preset, "written": utc_timestamp(),
        "specs": [spec.to_dict() for spec in specs],
    })
    return path


def check_teacher_weights(specs) -> None:
    """Load, once per distinct weights, what the runs ``specs`` (those that will train) need
    and might not get: an ImageNet download offline, a file of the wrong network, a broken
    cache. Each method says what that is (:meth:`methods.base.Method.weights_check`); here it
    is one line before anything starts, not one failed run per spec."""
    from methods.base import get_method_class

    checks = {}
    for spec in specs:
        method, config = resolved_config(spec)
        check = get_method_class(method).weights_check(config, spec.teacher_weights)
        if check is not None:
            checks.setdefault(check[0], check[1])
    for key in sorted(checks, key=repr):
        checks[key]()


def ensure_synthetic_data(dataset: str, root: Path) -> bool:
    """Write the synthetic dataset (seed 0, default size) at ``root`` when a synthetic sweep
    expects it there and nothing exists yet, so ``run --preset ci`` works on a fresh clone.
    An existing folder is used as it is. True when it was written."""
    from datasets import generate_synthetic

    if dataset != "synthetic" or root.exists():
        return False
    generate_synthetic(root, seed=0)
    return True


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


def render_report(results: Path) -> tuple[Path | None, bool]:
    """Render ``<results>/report`` when the report module is installed: (path, whether the
    rendering failed). The runs are safe either way; a failure is said in one line."""
    if importlib.util.find_spec("bench.report") is None:
        return None, False
    from bench.report import render_report as render

    try:
        return Path(render(results, results / "report")), False
    except UserError:
        raise
    except Exception as err:  # noqa: BLE001 - the runs are safe; say what broke
        print(f"warning: the report could not be rendered: {type(err).__name__}: {err}",
              file=sys.stderr)
        return None, True
