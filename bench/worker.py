"""The worker's side of a sweep: one :class:`RunSpec` in, one :class:`RunResult` out.

:func:`run_one` is what an executor runs, in this process or in another: it loads the category,
draws the noisy split, trains the method **once**, predicts the whole test set once and
evaluates both protocols from that prediction (*No overlap* is the test set minus the injected
images; *Overlap* is all of it), scores the training images with their injected flags (the
paper's histograms), and measures timings. It returns the record and the bytes of
``scores.npz`` and the split manifest, and writes nothing: the driver (:mod:`bench.driver`)
stores results. A failure inside the run becomes a ``failed`` record, never an exception, so one
bad run cannot stop a sweep.
"""

from __future__ import annotations

import dataclasses
import gc
import hashlib
import io
import math
import resource
import sys
import time
import traceback
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np

from bench.records import METRIC_NAMES, SCHEMA_VERSION, json_ready
from bench.spec import RunSpec
from bench.util import utc_timestamp

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


_IMAGE_CACHES: dict[str | None, Any] = {}


def image_cache(cache_dir: str | None):
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


IMAGE_METRICS = ("i_auroc", "i_ap", "i_f1max")


def _metrics_or_nan(evaluate, scores, labels, maps, masks) -> tuple[dict[str, float], str | None]:
    """(every metric, why some are NaN or None): NaN for all when one image class is missing
    (the training set at ratio 0, a test set without normal images)."""
    labels = np.asarray(labels)
    if labels.size == 0:
        return {name: float("nan") for name in METRIC_NAMES}, "the set is empty"
    if labels.min() == labels.max():
        missing = "anomalous" if labels.min() == 0 else "normal"
        return ({name: float("nan") for name in METRIC_NAMES},
                f"the set has no {missing} image, so no metric separates the two")
    values = {name: float(value) for name, value in evaluate(scores, labels, maps, masks).items()}
    undefined = [name for name in METRIC_NAMES if not math.isfinite(values[name])]
    reason = None
    if undefined:
        masks = np.asarray(masks)
        reason = ("the masks have no anomalous pixel" if not masks.any()
                  else "the masks have no normal pixel" if masks.all()
                  else "a class is missing")
    return values, reason


def undefined_metrics(metrics: Mapping[str, Mapping[str, float]],
                      reasons: Mapping[str, str | None]) -> dict[str, dict[str, Any]]:
    """``{protocol: {"metrics": [names that are NaN], "reason": why}}`` for the record: a
    metric that cannot be computed is said so, not left as a silent null."""
    out = {}
    for protocol, values in metrics.items():
        names = [n for n in METRIC_NAMES if not math.isfinite(values.get(n, float("nan")))]
        if names:
            out[protocol] = {"metrics": names, "reason": reasons.get(protocol) or "undefined"}
    return out


def run_one(spec: RunSpec, options: JobOptions = JobOptions()) -> RunResult:
    """Train and evaluate one spec; failures come back as a failed record (see module doc)."""
    started = time.time()
    device = "cpu"
    try:
        import torch

        from methods.registry_loader import import_plugins

        import_plugins(options.plugins)
        if options.threads:
            torch.set_num_threads(int(options.threads))
        device = resolve_device(options.device)
        return _run(spec, options, device, started)
    except KeyboardInterrupt:
        raise
    except BaseException as err:  # noqa: BLE001 - a run's failure is data, not a crash:
        # SystemExit from a method's sys.exit() too, which would otherwise end the sweep.
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


@dataclass
class _RunData:
    """A run's images and labels: the noisy split, loaded at the spec's geometry."""

    split: Any
    manifest: bytes
    train_images: Any  # uint8 tensor (M, 3, H, W), the split's training list in order
    injected: np.ndarray  # (M,) bool
    test: list  # every test sample (the Overlap set), scored once
    in_no_overlap: np.ndarray  # (N,) bool: False for the injected images
    test_images: Any  # uint8 tensor (N, 3, H, W)
    test_labels: np.ndarray  # (N,) uint8
    test_masks: np.ndarray  # (N, H, W) uint8
    preprocess: Any
    cache: Any


def _load_data(spec: RunSpec, options: JobOptions) -> _RunData:
    """The split is a pure function of (dataset, category, ratio, split seed)."""
    from datasets import Preprocess, load_category, load_images, load_masks, make_split
    from datasets.splits import manifest_bytes

    data = load_category(spec.dataset, spec.data_root, spec.category)
    split = make_split(data, spec.noise_ratio, spec.split_seed)
    preprocess = Preprocess(resize=spec.resize_size, crop=spec.image_size)
    cache = image_cache(options.cache_dir)
    test = list(split.test_overlap)  # the union: every test image, scored once
    injected_keys = {s.key for s, inj in zip(split.train, split.injected) if inj}
    return _RunData(
        split=split,
        manifest=manifest_bytes(split),
        train_images=load_images(split.train, preprocess, cache),
        injected=np.asarray(split.injected, dtype=bool),
        test=test,
        in_no_overlap=np.array([s.key not in injected_keys for s in test], dtype=bool),
        test_images=load_images(test, preprocess, cache),
        test_labels=np.array([s.label for s in test], dtype=np.uint8),
        test_masks=load_masks(test, preprocess, cache),
        preprocess=preprocess,
        cache=cache,
    )


def _train(spec: RunSpec, method, data: _RunData, options: JobOptions, device: str):
    """Fit ``method`` on the noisy training set; (observer with the logs, fit seconds)."""
    from tqdm.auto import tqdm

    from methods.base import TrainSet

    epochs = getattr(method.config, "epochs", None)
    bar = tqdm(total=epochs, desc=f"  {spec.method} {spec.category} r={spec.noise_ratio:g}",
               unit="ep", leave=False, disable=not options.progress, file=sys.stderr)
    observer = RunObserver(
        data.injected,
        lambda per_sample, flags: method.diagnostics(per_sample, flags, method.config), bar)
    _sync(device)
    t0 = time.perf_counter()
    try:
        # Opaque names: the file paths would tell a method which images came from test/.
        names = tuple(f"train-{i:05d}" for i in range(len(data.split.train)))
        method.fit(TrainSet(data.train_images, names), observer=observer)
        _sync(device)
    finally:
        bar.close()
    return observer, time.perf_counter() - t0


def _predict_test(spec: RunSpec, method, data: _RunData, device: str):
    """Scores and maps of every test image, and the inference seconds (after a warm-up, so
    the throughput excludes one-off setup costs)."""
    method.predict(data.test_images[:WARMUP_IMAGES])
    _sync(device)
    t0 = time.perf_counter()
    prediction = method.predict(data.test_images)
    _sync(device)
    infer_s = time.perf_counter() - t0
    scores = np.asarray(prediction.scores, dtype=np.float32)
    maps = np.asarray(prediction.maps, dtype=np.float32)
    n, (h, w) = len(data.test), data.test_masks.shape[1:]
    if scores.shape != (n,) or maps.shape != (n, h, w):
        raise ValueError(
            f"{spec.method}.predict returned scores {scores.shape} and maps {maps.shape}; "
            f"expected ({n},) and ({n}, {h}, {w})"
        )
    check_finite(spec.method, scores, maps, "test")
    return scores, maps, infer_s


def check_finite(method: str, scores: np.ndarray, maps: np.ndarray, what: str) -> None:
    """A prediction with NaN or inf would give metrics that look computed but mean nothing
    (every rank comparison with NaN is false): the run fails instead, saying so."""
    bad_scores = int(np.size(scores) - np.isfinite(scores).sum())
    bad_pixels = int(np.size(maps) - np.isfinite(maps).sum())
    if bad_scores or bad_pixels:
        raise ValueError(f"{method}.predict returned non-finite values on the {what} images "
                         f"({bad_scores} of {np.size(scores)} scores, {bad_pixels} of "
                         f"{np.size(maps)} map pixels are NaN or inf)")


def _run(spec: RunSpec, options: JobOptions, device: str, started: float) -> RunResult:
    import torch

    from bench.environment import environment
    from bench.metrics import evaluate
    from datasets import load_masks
    from methods.base import build_method

    peak_reset = reset_peak_memory(device)
    torch.manual_seed(spec.train_seed)
    np.random.seed(spec.train_seed % 2**32)
    data = _load_data(spec, options)
    method = build_method(spec.method, spec.config, teacher_weights=spec.teacher_weights,
                          device=device, seed=spec.train_seed, dataset=spec.dataset,
                          category=spec.category)
    # One training ...
    observer, fit_s = _train(spec, method, data, options, device)
    # ... every evaluation.
    scores, maps, infer_s = _predict_test(spec, method, data, device)
    keep = data.in_no_overlap
    metrics, reasons = {}, {}
    metrics["no_overlap"], reasons["no_overlap"] = _metrics_or_nan(
        evaluate, scores[keep], data.test_labels[keep], maps[keep], data.test_masks[keep])
    metrics["overlap"], reasons["overlap"] = _metrics_or_nan(
        evaluate, scores, data.test_labels, maps, data.test_masks)
    # The training images, scored by the trained model: how much of the noise it absorbed.
    train_pred = method.predict(data.train_images)
    train_scores = np.asarray(train_pred.scores, dtype=np.float32)
    check_finite(spec.method, train_scores, np.asarray(train_pred.maps), "training")
    train_masks = load_masks(data.split.train, data.preprocess, data.cache)
    metrics["train"], reasons["train"] = _metrics_or_nan(
        evaluate, train_scores, data.injected.astype(np.uint8),
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
        "resolved_config": json_ready(dataclasses.asdict(method.config)),
        "metrics": metrics,
        "split": {
            **data.split.summary(),
            "manifest_sha256": hashlib.sha256(data.manifest).hexdigest(),
        },
        "timings": {
            "fit_s": fit_s,
            "infer_images_per_s": len(data.test) / infer_s if infer_s > 0 else None,
            "peak_mem_mb": peak_mb,
            "peak_mem_kind": peak_kind,
            "total_s": time.time() - started,
        },
        "environment": environment(device),
        "provenance": json_ready(method.describe()),
        "history": history,
        "diagnostics": diagnostics,
        "finished_at": utc_timestamp(),
    }
    undefined = undefined_metrics(metrics, reasons)
    if undefined:
        record["undefined_metrics"] = undefined
    npz = scores_npz(
        test_keys=[s.key for s in data.test], test_scores=scores, test_labels=data.test_labels,
        in_no_overlap=data.in_no_overlap, test_maps=maps, test_masks=data.test_masks,
        test_images=data.test_images.numpy(), train_keys=[s.key for s in data.split.train],
        train_scores=train_scores, train_injected=data.injected,
    )
    return RunResult(record, npz, data.manifest)


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


def failed_record(spec: RunSpec, err: BaseException | None = None, *, sweep: str = "",
                  device: str | None = None, started: float | None = None,
                  error_type: str | None = None, message: str | None = None) -> dict[str, Any]:
    """A record saying the run failed, and why (an exception, a dead worker, ...)."""
    from bench.errors import UserError

    user_error = isinstance(err, UserError)
    if err is not None:
        tb = "".join(traceback.format_exception(type(err), err, err.__traceback__))
        error_type = error_type or type(err).__name__
        message = message or str(err) or type(err).__name__
        if isinstance(err, SystemExit):
            message = f"sys.exit({err.code!r}) was called during the run"
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
        # user_error: a one-line message that says what to do (summaries never cut it).
        "error": {"type": error_type or "Error", "message": message or "", "traceback": tb,
                  "user_error": user_error},
        "sweep": sweep,
        "spec": spec.to_dict(),
        "metrics": None,
        "timings": {"total_s": time.time() - started} if started else {},
        "environment": env,
        "finished_at": utc_timestamp(),
    }


