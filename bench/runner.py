"""Run one spec (in a worker) and drive a sweep (in the driver).

:func:`run_one` is what a worker executes: it loads the category, draws the noisy split, trains
the method **once**, predicts the whole test set once and evaluates both protocols from that
prediction (*No overlap* is the test set minus the injected images; *Overlap* is all of it),
scores the training images with their injected flags (the paper's histograms), and measures
timings. It returns the record and the bytes of ``scores.npz`` and the split manifest; it never
writes to the results store. A failure inside the run becomes a ``failed`` record, never an
exception, so one bad run cannot stop a sweep.

:func:`run_sweep` is the driver: it skips runs that already have a complete record with the same
fingerprint (unless forced), hands the rest to an executor, and, as each result streams back,
writes it atomically (scores and manifest first, the record last: the record is the done
marker) and logs it to MLflow. Ctrl-C leaves finished runs complete and no partial record.
"""

from __future__ import annotations

import dataclasses
import gc
import hashlib
import io
import math
import os
import resource
import sys
import time
import traceback
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np

from bench.records import (
    MANIFEST_FILE,
    METRIC_NAMES,
    RECORD_FILE,
    SCHEMA_VERSION,
    SCORES_FILE,
    is_complete,
    load_record,
    run_dir,
    write_bytes_atomic,
    write_json_atomic,
)
from bench.spec import RunSpec

FIGURE_SIZE = 64  # side of the maps/masks/images kept in scores.npz for figures
WARMUP_IMAGES = 8  # images predicted once, untimed, before the throughput measurement


@dataclass
class RunResult:
    """What a worker sends back: the record and the files that go beside it."""

    record: dict[str, Any]
    scores: bytes | None = None  # scores.npz
    manifest: bytes | None = None  # split manifest JSON

    @property
    def ok(self) -> bool:
        return self.record.get("status") == "ok"


@dataclass(frozen=True)
class JobOptions:
    """How a worker runs a spec (not part of the spec: it does not change the result)."""

    device: str = "auto"  # auto | cpu | cuda | cuda:N
    sweep: str = ""
    plugins: tuple[str, ...] = ()  # modules to import first (they register extra methods)
    progress: bool = False  # epoch bar (only where a terminal sees it: the local executor)
    threads: int | None = None  # torch intra-op threads; None leaves torch's default
    cache_dir: str | None = None  # on-disk decoded-image cache shared between runs


# --------------------------------------------------------------------------------------------
# Worker side


def resolve_device(device: str | None) -> str:
    """``auto`` -> ``cuda`` when a GPU is visible, else ``cpu``; others are checked."""
    import torch

    from bench.errors import UserError

    device = (device or "auto").lower()
    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise UserError(f"--device {device} asked for, but no CUDA GPU is visible; use --device cpu")
    try:
        torch.device(device)
    except RuntimeError:
        raise UserError(f"bad --device {device!r}; use auto, cpu, cuda or cuda:N") from None
    return device


def import_plugins(plugins: Iterable[str]) -> None:
    """Import the modules that register extra methods (``--plugin``), in workers too."""
    import importlib

    from bench.errors import UserError

    for name in plugins:
        try:
            importlib.import_module(name)
        except ImportError as err:
            raise UserError(f"cannot import plugin module {name!r}: {err}; check PYTHONPATH") from None


_IMAGE_CACHES: dict[str | None, Any] = {}


def _image_cache(cache_dir: str | None):
    """One decoded-image cache per worker process, reused by every run it executes."""
    from datasets import ImageCache

    if cache_dir not in _IMAGE_CACHES:
        _IMAGE_CACHES[cache_dir] = ImageCache(cache_dir)
    return _IMAGE_CACHES[cache_dir]


class RunObserver:
    """Collects a method's per-epoch scalars and turns per-sample arrays into diagnostics.

    The method reports per-sample values (e.g. CDD's confidence) without knowing which training
    images are injected; here they are compared with the injected flags.
    """

    def __init__(self, injected: np.ndarray, diagnose: Callable, bar=None):
        self.injected = np.asarray(injected, dtype=bool)
        self.diagnose = diagnose
        self.bar = bar
        self.epochs: list[int] = []
        self.history: dict[str, list] = {}
        self.diagnostics: dict[str, list] = {}

    def __call__(self, epoch: int, scalars: Mapping[str, float],
                 per_sample: Mapping[str, np.ndarray] | None = None) -> None:
        self.epochs.append(int(epoch))
        _append_row(self.history, scalars, len(self.epochs))
        if per_sample:
            _append_row(self.diagnostics, self.diagnose(per_sample, self.injected), len(self.epochs))
        if self.bar is not None:
            self.bar.update(1)
            if "loss" in scalars:
                self.bar.set_postfix(loss=f"{float(scalars['loss']):.4f}", refresh=False)

    def as_dict(self) -> tuple[dict[str, list], dict[str, list]]:
        history = {"epoch": list(self.epochs), **self.history} if self.epochs else {}
        diagnostics = {"epoch": list(self.epochs), **self.diagnostics} if self.diagnostics else {}
        return history, diagnostics


def _append_row(table: dict[str, list], values: Mapping[str, Any], n_rows: int) -> None:
    """Append one epoch's values, padding with None where a name skipped an epoch."""
    for key, value in values.items():
        column = table.setdefault(str(key), [])
        column.extend([None] * (n_rows - 1 - len(column)))
        column.append(_as_float(value))
    for column in table.values():
        column.extend([None] * (n_rows - len(column)))


def _as_float(value: Any) -> float | None:
    try:
        number = float(value)
    except (TypeError, ValueError):
        return None
    return number if math.isfinite(number) else None


def _sync(device) -> None:
    import torch

    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)


def reset_peak_memory(device) -> bool:
    """Start a fresh peak for this run; True when the CPU peak could be reset.

    On CUDA torch's counter is reset. On Linux writing "5" to ``/proc/self/clear_refs`` resets
    the process's high-water mark (VmHWM), so a worker that runs several specs in turn reports
    each run's own peak rather than the largest so far.
    """
    import torch

    if torch.device(device).type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        return False
    try:
        with open("/proc/self/clear_refs", "w") as handle:
            handle.write("5")
        return _vm_hwm_kib() is not None
    except OSError:
        return False


def _vm_hwm_kib() -> int | None:
    try:
        with open("/proc/self/status") as handle:
            for line in handle:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1])
    except (OSError, ValueError, IndexError):
        pass
    return None


def peak_memory_mb(device, reset: bool) -> tuple[float, str]:
    """Peak GPU memory allocated by torch on CUDA; else the peak resident set.

    ``run_peak_rss`` when the peak was reset at the start of the run (Linux), otherwise the
    process's lifetime peak (``process_max_rss``), which can include earlier runs.
    """
    import torch

    if torch.device(device).type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20, "cuda_max_allocated"
    hwm = _vm_hwm_kib() if reset else None
    if hwm is not None:
        return hwm / 2**10, "run_peak_rss"
    rss_kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    scale = 1 / 2**20 if sys.platform == "darwin" else 1 / 2**10  # bytes on macOS, KiB on Linux
    return rss_kb * scale, "process_max_rss"


def _shrink(array: np.ndarray, size: int, mode: str) -> np.ndarray:
    """Resize (N, H, W) or (N, C, H, W) to ``size`` x ``size`` for figures."""
    import torch
    import torch.nn.functional as F

    tensor = torch.from_numpy(np.ascontiguousarray(array))
    squeeze = tensor.ndim == 3
    if squeeze:
        tensor = tensor[:, None]
    if tensor.shape[-1] != size or tensor.shape[-2] != size:
        if mode == "nearest":
            tensor = F.interpolate(tensor.float(), size=(size, size), mode="nearest-exact")
        else:  # area averaging: a faithful thumbnail of a smooth map or an image
            tensor = F.interpolate(tensor.float(), size=(size, size), mode="area")
    out = tensor[:, 0] if squeeze else tensor
    return out.numpy()


def _metrics_or_nan(evaluate, scores, labels, maps, masks) -> dict[str, float]:
    """Every metric, or NaN for all when one class is missing (e.g. training set at ratio 0)."""
    labels = np.asarray(labels)
    if labels.size == 0 or labels.min() == labels.max():
        return {name: float("nan") for name in METRIC_NAMES}
    return {name: float(value) for name, value in evaluate(scores, labels, maps, masks).items()}


def run_one(spec: RunSpec, options: JobOptions = JobOptions()) -> RunResult:
    """Train and evaluate one spec; failures come back as a failed record (see module doc)."""
    started = time.time()
    device = "cpu"
    try:
        import torch

        import_plugins(options.plugins)
        if options.threads:
            torch.set_num_threads(int(options.threads))
        device = resolve_device(options.device)
        return _run(spec, options, device, started)
    except KeyboardInterrupt:
        raise
    except Exception as err:  # noqa: BLE001 - a run's failure is data, not a crash
        return RunResult(failed_record(spec, err, sweep=options.sweep, device=device,
                                       started=started))
    finally:
        gc.collect()
        try:
            import torch

            if torch.cuda.is_available():
                torch.cuda.empty_cache()  # an OOM must not poison the worker's next run
        except Exception:  # noqa: BLE001
            pass


def _run(spec: RunSpec, options: JobOptions, device: str, started: float) -> RunResult:
    import torch
    from tqdm.auto import tqdm

    from bench.environment import environment
    from bench.metrics import evaluate
    from datasets import Preprocess, load_category, load_images, load_masks, make_split
    from datasets.splits import manifest_bytes
    from methods.base import TrainSet, build_method

    peak_reset = reset_peak_memory(device)
    torch.manual_seed(spec.train_seed)
    np.random.seed(spec.train_seed % 2**32)

    # Data: the split is a pure function of (dataset, category, ratio, split seed).
    data = load_category(spec.dataset, spec.data_root, spec.category)
    split = make_split(data, spec.noise_ratio, spec.split_seed)
    manifest = manifest_bytes(split)
    preprocess = Preprocess(resize=spec.resize_size, crop=spec.image_size)
    cache = _image_cache(options.cache_dir)
    train_images = load_images(split.train, preprocess, cache)
    injected = np.asarray(split.injected, dtype=bool)
    test = list(split.test_overlap)  # the union: every test image, scored once
    injected_keys = {s.key for s, inj in zip(split.train, split.injected) if inj}
    in_no_overlap = np.array([s.key not in injected_keys for s in test], dtype=bool)
    test_images = load_images(test, preprocess, cache)
    test_labels = np.array([s.label for s in test], dtype=np.uint8)
    test_masks = load_masks(test, preprocess, cache)

    method = build_method(spec.method, spec.config, teacher_weights=spec.teacher_weights,
                          device=device, seed=spec.train_seed)
    epochs = getattr(method.config, "epochs", None)
    bar = tqdm(total=epochs, desc=f"  {spec.method} {spec.category} r={spec.noise_ratio:g}",
               unit="ep", leave=False, disable=not options.progress, file=sys.stderr)
    observer = RunObserver(
        injected, lambda per_sample, flags: method.diagnostics(per_sample, flags, method.config),
        bar)

    # One training ...
    _sync(device)
    t0 = time.perf_counter()
    try:
        # Opaque names: the file paths would tell a method which images came from test/.
        names = tuple(f"train-{i:05d}" for i in range(len(split.train)))
        method.fit(TrainSet(train_images, names), observer=observer)
        _sync(device)
    finally:
        bar.close()
    fit_s = time.perf_counter() - t0

    # ... every evaluation. Warm up first so the throughput excludes one-off setup costs.
    method.predict(test_images[:WARMUP_IMAGES])
    _sync(device)
    t0 = time.perf_counter()
    prediction = method.predict(test_images)
    _sync(device)
    infer_s = time.perf_counter() - t0
    scores = np.asarray(prediction.scores, dtype=np.float32)
    maps = np.asarray(prediction.maps, dtype=np.float32)
    if scores.shape != (len(test),) or maps.shape != (len(test), *test_masks.shape[1:]):
        raise ValueError(
            f"{spec.method}.predict returned scores {scores.shape} and maps {maps.shape}; "
            f"expected ({len(test)},) and ({len(test)}, {test_masks.shape[1]}, {test_masks.shape[2]})"
        )
    metrics = {
        "no_overlap": _metrics_or_nan(evaluate, scores[in_no_overlap], test_labels[in_no_overlap],
                                      maps[in_no_overlap], test_masks[in_no_overlap]),
        "overlap": _metrics_or_nan(evaluate, scores, test_labels, maps, test_masks),
    }
    # The training images, scored by the trained model: how much of the noise it absorbed.
    train_pred = method.predict(train_images)
    train_scores = np.asarray(train_pred.scores, dtype=np.float32)
    train_masks = load_masks(split.train, preprocess, cache)
    metrics["train"] = _metrics_or_nan(evaluate, train_scores, injected.astype(np.uint8),
                                       np.asarray(train_pred.maps, dtype=np.float32), train_masks)
    peak_mb, peak_kind = peak_memory_mb(device, peak_reset)

    history, diagnostics = observer.as_dict()
    record = {
        "schema_version": SCHEMA_VERSION,
        "fingerprint": spec.fingerprint,
        "status": "ok",
        "error": None,
        "sweep": options.sweep,
        "spec": spec.to_dict(),
        "resolved_config": _plain(dataclasses.asdict(method.config)),
        "metrics": metrics,
        "split": {
            **split.summary(),
            "manifest_sha256": hashlib.sha256(manifest).hexdigest(),
        },
        "timings": {
            "fit_s": fit_s,
            "infer_images_per_s": len(test) / infer_s if infer_s > 0 else None,
            "peak_mem_mb": peak_mb,
            "peak_mem_kind": peak_kind,
            "total_s": time.time() - started,
        },
        "environment": environment(device),
        "provenance": _plain(method.describe()),
        "history": history,
        "diagnostics": diagnostics,
        "finished_at": _now(),
    }
    npz = scores_npz(
        test_keys=[s.key for s in test], test_scores=scores, test_labels=test_labels,
        in_no_overlap=in_no_overlap, test_maps=maps, test_masks=test_masks,
        test_images=test_images.numpy(), train_keys=[s.key for s in split.train],
        train_scores=train_scores, train_injected=injected,
    )
    return RunResult(record, npz, manifest)


def scores_npz(*, test_keys, test_scores, test_labels, in_no_overlap, test_maps, test_masks,
               test_images, train_keys, train_scores, train_injected) -> bytes:
    """The compressed ``scores.npz`` of the layout fixed in :mod:`bench.records`."""
    size = min(FIGURE_SIZE, int(test_maps.shape[-1]))
    images = np.clip(np.rint(_shrink(test_images, size, "area")), 0, 255).astype(np.uint8)
    buf = io.BytesIO()
    np.savez_compressed(
        buf,
        test_keys=np.asarray(test_keys, dtype=str),
        test_scores=np.asarray(test_scores, dtype=np.float32),
        test_labels=np.asarray(test_labels, dtype=np.uint8),
        in_no_overlap=np.asarray(in_no_overlap, dtype=bool),
        test_maps=_shrink(test_maps, size, "area").astype(np.float16),
        test_masks=(_shrink(test_masks, size, "nearest") > 0.5).astype(np.uint8),
        test_images=images.transpose(0, 2, 3, 1),
        train_keys=np.asarray(train_keys, dtype=str),
        train_scores=np.asarray(train_scores, dtype=np.float32),
        train_injected=np.asarray(train_injected, dtype=bool),
    )
    return buf.getvalue()


def _plain(value: Any) -> Any:
    """JSON-ready copy (tuples -> lists, paths -> str, numpy scalars -> numbers)."""
    if isinstance(value, Mapping):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if isinstance(value, Path):
        return str(value)
    if hasattr(value, "item") and getattr(value, "ndim", 1) == 0:
        return value.item()
    return value


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def failed_record(spec: RunSpec, err: BaseException | None = None, *, sweep: str = "",
                  device: str | None = None, started: float | None = None,
                  error_type: str | None = None, message: str | None = None) -> dict[str, Any]:
    """A record saying the run failed, and why (an exception, a dead worker, ...)."""
    if err is not None:
        tb = "".join(traceback.format_exception(type(err), err, err.__traceback__))
        error_type = error_type or type(err).__name__
        message = message or str(err) or type(err).__name__
    else:
        tb = ""
    env = None
    if device is not None:
        try:
            from bench.environment import environment

            env = environment(device)
        except Exception:  # noqa: BLE001 - the failure is what matters here
            env = None
    return {
        "schema_version": SCHEMA_VERSION,
        "fingerprint": spec.fingerprint,
        "status": "failed",
        "error": {"type": error_type or "Error", "message": message or "", "traceback": tb},
        "sweep": sweep,
        "spec": spec.to_dict(),
        "metrics": None,
        "timings": {"total_s": time.time() - started} if started else {},
        "environment": env,
        "finished_at": _now(),
    }


# --------------------------------------------------------------------------------------------
# Driver side


def write_result(results: str | os.PathLike, result: RunResult) -> Path:
    """Store a result: files first, the record last (the record is the done marker)."""
    folder = run_dir(results, result.record["fingerprint"])
    folder.mkdir(parents=True, exist_ok=True)
    record_path = folder / RECORD_FILE
    # A rerun first retracts the old record, so old record + new scores never pair up.
    try:
        os.unlink(record_path)
    except FileNotFoundError:
        pass
    if result.scores is not None:
        write_bytes_atomic(folder / SCORES_FILE, result.scores)
    if result.manifest is not None:
        write_bytes_atomic(folder / MANIFEST_FILE, result.manifest)
    write_json_atomic(record_path, result.record)
    return folder


def partition(specs: Sequence[RunSpec], results: str | os.PathLike,
              force: bool = False) -> tuple[list[RunSpec], list[RunSpec]]:
    """(to run, already done): done = a complete record with the same fingerprint."""
    todo, done = [], []
    for spec in specs:
        record = load_record(run_dir(results, spec.fingerprint) / RECORD_FILE)
        complete = is_complete(record) and record.get("fingerprint") == spec.fingerprint
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
    """``Type: first line``; a UserError's line says what to do (often with a path): never cut."""
    limit = None if error.get("type") == "UserError" else 200
    return f"{error.get('type')}: {_first_line(error.get('message', ''), limit)}"


def _first_line(text: str, limit: int | None = 200) -> str:
    line = (text or "").strip().splitlines()[0] if (text or "").strip() else ""
    return line if limit is None or len(line) <= limit else line[: limit - 3] + "..."


def run_sweep(
    specs: Sequence[RunSpec],
    results: str | os.PathLike,
    *,
    executor=None,
    options: JobOptions = JobOptions(),
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

    from bench import twins
    from bench.executors import LocalExecutor

    log = log or (lambda line: print(line, file=sys.stderr))
    executor = executor or LocalExecutor()
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
