"""One prepared GPU check: training and inference speed, precision, a whole-MVTec estimate and
the per-GPU workers, in one command, one JSON file and one printed table.

    benchmarks/gpu_check.sh                 # the full check: WRN50, 224 px, batch 16, <= 8 min
    benchmarks/gpu_check.sh --tiny          # ResNet-18, 64 px, a few steps, CPU (CI runs it)
    benchmarks/gpu_check.sh --tiny --device cuda   # the tiny check on the GPU, as a smoke test

Sections, each under its own hard time budget (an item still running when the budget runs out
is interrupted and listed as timed out; the items after it are listed as skipped):

- ``train``: RD and CDD training images/s (image-epochs per second: every training image once
  per epoch, whatever a CDD epoch does with it), float32 (TF32 convolutions where cuDNN allows
  them) and bf16 autocast (``amp_bf16`` set explicitly in each row), with FLOPs per image-epoch
  counted by ``torch.utils.flop_counter.FlopCounterMode``, achieved FLOP/s, MFU against the
  device's dense peak for that precision, inference images/s and peak memory; beside them the
  re-created official RD4AD loop (``benchmarks/reference_rd.py``) on the same PNG files,
  interleaved with the RD rows.
- ``estimate``: measured seconds per image-epoch x MVTec AD's training images x 200 epochs, for
  the clean training sets and for the paper's noise ratio 0.1 (docs/protocol.md §1 and §2), in minutes.
- ``infer``: inference images/s and peak memory of every registered method
  (``methods.available_methods()``), each built with its ``smoke_overrides`` plus the check's
  backbone, float32; a method that fails is a row with its error.
- ``precision``: the same short RD and CDD training on one synthetic category in float32 and in
  bf16, through the harness's runner, metrics side by side.
- ``executor``: the ``processes`` executor, one worker per visible GPU, on a two-run sweep.

Everything is synthetic (images from ``datasets.generate_synthetic``, random teachers), nothing
is downloaded, and everything is written under ``--out``. See docs/runner.md for how to read it.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import gc
import io
import math
import os
import re
import signal
import statistics
import sys
import threading
import time
import traceback
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.flop_counter import FlopCounterMode

HERE = Path(__file__).resolve().parent
REPO_ROOT = HERE.parent
for _path in (REPO_ROOT, HERE):
    if str(_path) not in sys.path:
        sys.path.insert(0, str(_path))

import reference_rd  # noqa: E402

from bench.errors import UserError  # noqa: E402
from bench.records import METRIC_NAMES, write_json_atomic  # noqa: E402
from bench.worker import peak_memory_mb, reset_peak_memory  # noqa: E402

SCHEMA = "fuad-bench-gpu-check/1"
JSON_FILE = "gpu_check.json"
TABLE_FILE = "gpu_check.md"
CATEGORY = reference_rd.SYNTHETIC_CATEGORY
PAPER_EPOCHS = 200  # RD4AD main.py and CDD paper §5: 200 epochs
PAPER_NOISE_RATIO = 0.1  # CDD paper Tables 1, 2 (MVTec AD)

# --------------------------------------------------------------------------------------------
# Peak FLOP/s by device name: dense tensor-core peaks (no 2:4 sparsity) and the plain FP32 peak,
# in TFLOP/s, from NVIDIA's datasheets (H100, H200, A100) and architecture whitepapers (GA102 for
# the RTX 3090, AD102 for the RTX 4090; bf16 with float32 accumulation, which is what PyTorch
# uses). The first pattern that matches torch.cuda.get_device_name() wins, so the PCIe and NVL
# variants come before the SXM parts that share their number; "GH200" does not match r"\bH200".

PEAK_TFLOPS: tuple[tuple[str, str, dict[str, float]], ...] = (
    (r"\bH200 NVL\b", "H200 NVL", {"bf16": 835.5, "tf32": 417.5, "fp32": 60.0}),
    (r"\bH200\b", "H200 SXM", {"bf16": 989.4, "tf32": 494.7, "fp32": 66.9}),
    (r"\bH100 NVL\b", "H100 NVL", {"bf16": 835.5, "tf32": 417.5, "fp32": 60.0}),
    (r"\bH100 PCIe\b", "H100 PCIe", {"bf16": 756.5, "tf32": 378.0, "fp32": 51.2}),
    (r"\bH100\b", "H100 SXM", {"bf16": 989.4, "tf32": 494.7, "fp32": 66.9}),
    (r"\bA100\b", "A100", {"bf16": 312.0, "tf32": 156.0, "fp32": 19.5}),
    (r"\bRTX 3090(?! Ti)\b", "GeForce RTX 3090", {"bf16": 71.0, "tf32": 35.6, "fp32": 35.6}),
    (r"\bRTX 4090(?! D)\b", "GeForce RTX 4090", {"bf16": 165.2, "tf32": 82.6, "fp32": 82.6}),
)


def device_peaks(device_name: str) -> dict[str, Any]:
    """``{"label", "bf16", "tf32", "fp32"}`` (FLOP/s) for a known device, else label "unknown"."""
    for pattern, label, peaks in PEAK_TFLOPS:
        if re.search(pattern, device_name or ""):
            return {"label": label, **{k: v * 1e12 for k, v in peaks.items()}}
    return {"label": "unknown"}


def peak_for(peaks: dict[str, Any], precision: str, device: torch.device) -> tuple[str, float | None]:
    """(peak kind, FLOP/s) that a row of ``precision`` ("float32" or "bf16") is measured
    against: bf16 rows against the bf16 peak; float32 rows against TF32 when cuDNN may use it
    for convolutions (PyTorch's default), else plain FP32. None where unknown (CPUs too)."""
    if device.type != "cuda":
        return "unknown", None
    if precision == "bf16":
        kind = "bf16"
    else:
        kind = "tf32" if torch.backends.cudnn.allow_tf32 else "fp32"
    return kind, peaks.get(kind)


def mfu(flops_per_s: float | None, peak: float | None) -> float | None:
    """Model FLOPs utilisation: achieved / peak; None when either is unknown."""
    if flops_per_s is None or not peak:
        return None
    return flops_per_s / peak


# --------------------------------------------------------------------------------------------
# What the check runs: the full plan for one H200-class GPU, the tiny one for CPUs and CI.


@dataclass(frozen=True)
class Plan:
    name: str
    device: str
    backbone: str
    size: int  # crop
    resize: int
    batch: int
    train_images: int  # synthetic training images (and the category's training set)
    test_good: int
    test_anomalous: int
    rd_epochs: int  # training-speed fits (the first epoch is warm-up)
    cdd_epochs: int
    repeats: int  # interleaved reference / RD repeats
    infer_images: int  # images per timed predict
    infer_train: int  # training images of the inference section's fits
    mvtec_png: int | None  # side of MVTec-sized PNGs for a second reference row (None: skip)
    mvtec_png_images: int
    precision_rd_epochs: int
    precision_cdd_epochs: int
    noise_ratio: float
    # CDD overrides on top of the budget (tiny: one step per stage, a smoke run of the code)
    cdd_extra: dict[str, Any] = field(default_factory=dict)
    # torch CPU threads (None: torch's default). The tiny check times nothing, and on a shared
    # CPU two threads per process can be many times slower than one.
    threads: int | None = None
    budgets: dict[str, float] = field(default_factory=dict)  # seconds per section
    total_budget: float = 0.0
    item_fraction: float = 0.5  # one item may use at most this share of its section's budget


FULL = Plan(
    name="full", device="cuda", backbone="wide_resnet50_2", size=224, resize=256, batch=16,
    train_images=64, test_good=10, test_anomalous=25, rd_epochs=4,
    # 5 CDD epochs: epochs 1-4 visit each stage of the {2,3,3,2} K schedule once.
    cdd_epochs=5, repeats=3, infer_images=32, infer_train=16, mvtec_png=1024,
    mvtec_png_images=32, precision_rd_epochs=16, precision_cdd_epochs=8,
    noise_ratio=PAPER_NOISE_RATIO,
    budgets={"train": 190.0, "infer": 85.0, "precision": 80.0, "executor": 70.0},
    total_budget=450.0,
)
TINY = Plan(
    name="tiny", device="cpu", backbone="resnet18", size=64, resize=73, batch=4,
    train_images=8, test_good=3, test_anomalous=5, rd_epochs=2, cdd_epochs=2, repeats=1,
    infer_images=8, infer_train=8, mvtec_png=None, mvtec_png_images=0,
    precision_rd_epochs=2, precision_cdd_epochs=2, noise_ratio=0.25,
    cdd_extra={"max_steps_per_stage": 1}, threads=1,
    # Caps, generous for a loaded 2-core machine; an idle one needs about a minute in all.
    budgets={"train": 90.0, "infer": 60.0, "precision": 60.0, "executor": 90.0},
    total_budget=300.0, item_fraction=0.75,
)
SECTIONS = ("train", "infer", "precision", "executor")  # "estimate" is derived from "train"


# --------------------------------------------------------------------------------------------
# Hard time budgets: SIGALRM interrupts an item that overruns (between two Python bytecodes, so
# within one torch operation of the limit). BaseException, so that the harness's own
# ``except Exception`` (a run's failure becomes a record) lets it through.


class BudgetExceeded(BaseException):
    """Raised inside an item when its time is up."""


@contextlib.contextmanager
def time_limit(seconds: float) -> Iterator[bool]:
    """Interrupt the body after ``seconds`` with :class:`BudgetExceeded`; yields whether the
    limit is enforced (SIGALRM exists only on POSIX and in the main thread)."""
    usable = hasattr(signal, "setitimer") and threading.current_thread() is threading.main_thread()
    if not usable:
        yield False
        return

    def expire(signum, frame):
        raise BudgetExceeded(f"time budget of {seconds:.0f} s spent")

    previous = signal.signal(signal.SIGALRM, expire)
    signal.setitimer(signal.ITIMER_REAL, max(seconds, 1e-3))
    try:
        yield True
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


def release_memory() -> None:
    """Drop what the last item left behind, so the next one's peak memory is its own."""
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def first_line(err: BaseException) -> str:
    text = str(err).strip().splitlines()
    return f"{type(err).__name__}: {text[0] if text else ''}"[:300]


class Section:
    """Runs a section's items under its budget and records what ran, failed, timed out or was
    skipped. ``deadline``: the whole check's end (perf_counter seconds)."""

    def __init__(self, name: str, budget_s: float, deadline: float, item_fraction: float = 0.5,
                 clock: Callable[[], float] = time.perf_counter):
        self.name = name
        self.clock = clock
        self.started = clock()
        self.budget_s = budget_s
        self.end = min(self.started + budget_s, deadline)
        self.item_cap = budget_s * item_fraction
        self.items: list[dict[str, Any]] = []
        self.notes: list[str] = []

    def remaining(self) -> float:
        return self.end - self.clock()

    def run(self, label: str, fn: Callable[[], Any], min_s: float = 0.5) -> Any:
        """``fn()``, or None when it failed, timed out or had no time left (all recorded)."""
        left = self.remaining()
        if left < min_s:
            self.items.append({"item": label, "status": "skipped",
                               "reason": f"{self.name} budget spent ({self.budget_s:.0f} s)"})
            return None
        limit = min(left, self.item_cap)
        t0 = self.clock()
        entry: dict[str, Any] = {"item": label}
        try:
            with time_limit(limit):
                value = fn()
        except BudgetExceeded:
            entry.update(status="timed_out", seconds=self.clock() - t0,
                         reason=f"interrupted after {limit:.0f} s (item limit: the smaller of "
                                f"the section's time left and {self.item_cap:.0f} s)")
            self.items.append(entry)
            return None
        except Exception as err:  # noqa: BLE001 - a failing item is a row, not a crash
            entry.update(status="error", seconds=self.clock() - t0, error=first_line(err),
                         traceback=traceback.format_exc(limit=8))
            self.items.append(entry)
            return None
        else:
            entry.update(status="ok", seconds=self.clock() - t0)
            self.items.append(entry)
            return value
        finally:
            release_memory()

    def as_dict(self, **payload: Any) -> dict[str, Any]:
        return {"budget_s": self.budget_s, "elapsed_s": self.clock() - self.started,
                "items": self.items, "notes": self.notes, **payload}


# --------------------------------------------------------------------------------------------
# Data and measurements


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def synthetic_tree(out: Path, plan: Plan, size: int | None = None,
                   n_train: int | None = None) -> Path:
    """The check's synthetic category (train PNGs, test images with masks); its folder.

    With ``size``: an extra tree of ``n_train`` training PNGs of that side for the reference
    loop alone (one test image of each kind, the fewest the generator writes)."""
    from datasets import generate_synthetic

    if size is None:
        root = generate_synthetic(out / "data", seed=0, size=plan.resize,
                                  n_train=plan.train_images, n_test_good=plan.test_good,
                                  n_test_anomalous=plan.test_anomalous, categories=[CATEGORY])
    else:
        root = generate_synthetic(out / f"data-{size}px", seed=0, size=size,
                                  n_train=n_train or plan.train_images, n_test_good=1,
                                  n_test_anomalous=1, categories=[CATEGORY])
    return root / CATEGORY


def decoded_train_images(category_root: Path, plan: Plan) -> torch.Tensor:
    """uint8 (N, 3, crop, crop) training images through the harness's pipeline."""
    from datasets import Preprocess, load_category, load_images

    data = load_category("mvtec", category_root.parent, category_root.name)
    return load_images(data.train, Preprocess(resize=plan.resize, crop=plan.size))


def train_overrides(plan: Plan, method: str, amp_bf16: bool) -> dict[str, Any]:
    """Config overrides of a training row; the precision is always set explicitly."""
    epochs = plan.rd_epochs if method == "rd" else plan.cdd_epochs
    extra = plan.cdd_extra if method == "cdd" else {}
    return {"backbone": plan.backbone, "batch_size": plan.batch, "epochs": epochs,
            "amp_bf16": amp_bf16, **extra}


def _names(n: int) -> tuple[str, ...]:
    return tuple(f"train-{i:05d}" for i in range(n))


def measure_training(method_name: str, overrides: dict[str, Any], images: torch.Tensor,
                     device: torch.device, infer_images: int) -> dict[str, Any]:
    """One timed fit: steady images/s (epochs after the first), peak memory of the fit, then
    inference images/s on ``infer_images`` of the images after an 8-image warm-up."""
    from methods import TrainSet, build_method

    method = build_method(method_name, overrides, teacher_weights="random", device=device, seed=0)
    n = int(images.shape[0])
    stamps: list[float] = []

    def observer(epoch, scalars, per_sample=None):
        sync(device)
        stamps.append(time.perf_counter())

    reset = reset_peak_memory(device)
    sync(device)
    start = time.perf_counter()
    method.fit(TrainSet(images, _names(n)), observer)
    peak_mb, peak_kind = peak_memory_mb(device, reset)
    test = images[:infer_images]
    method.predict(test[:8])
    sync(device)
    t0 = time.perf_counter()
    method.predict(test)
    sync(device)
    infer_s = time.perf_counter() - t0
    stamps = [start, *stamps]
    return {
        "steady_images_per_s": reference_rd.steady_rate(n, stamps),
        "epoch_s": [b - a for a, b in zip(stamps, stamps[1:])],
        "infer_images_per_s": len(test) / infer_s if infer_s > 0 else None,
        "peak_mem_mb": peak_mb, "peak_mem_kind": peak_kind,
        "config": dataclasses.asdict(method.config),
    }


def count_training_flops(method_name: str, overrides: dict[str, Any], images: torch.Tensor,
                         device: torch.device) -> dict[str, Any]:
    """FLOPs per epoch of one fit (FlopCounterMode; forward and backward, optimiser excluded)
    and the steady FLOPs per image-epoch (epochs after the first, as the timings)."""
    from methods import TrainSet, build_method

    method = build_method(method_name, overrides, teacher_weights="random", device=device, seed=0)
    n = int(images.shape[0])
    counter = FlopCounterMode(display=False)
    marks: list[float] = []
    with counter:
        method.fit(TrainSet(images, _names(n)),
                   lambda epoch, scalars, per_sample=None: marks.append(
                       float(counter.get_total_flops())))
    per_epoch = np.diff([0.0, *marks]).tolist()
    steady = per_epoch[1:]
    return {"flops_per_epoch": per_epoch,
            "flops_per_image_epoch": sum(steady) / (n * len(steady)) if steady else None}


def count_reference_flops(image_root: Path, plan: Plan, device: torch.device) -> dict[str, Any]:
    """FLOPs of one epoch of the reference loop, per image (every epoch does the same work)."""
    with reference_rd.reference_cudnn():
        loop = reference_rd.ReferenceLoop(image_root, backbone=plan.backbone, crop=plan.size,
                                          resize=plan.resize, batch_size=plan.batch,
                                          device=device)
        counter = FlopCounterMode(display=False)
        with counter:
            loop.train_epoch()
    return {"flops_per_image_epoch": counter.get_total_flops() / len(loop.dataset)}


# --------------------------------------------------------------------------------------------
# Sections


def precision_label(precision: str, device: torch.device) -> str:
    """How a row's arithmetic actually ran."""
    if device.type != "cuda":
        return "float32" if precision == "float32" else "bf16 requested (CPU: autocast off, float32)"
    if precision == "float32":
        return "float32/TF32" if torch.backends.cudnn.allow_tf32 else "float32"
    return "bf16 autocast"


def train_section(section: Section, plan: Plan, out: Path, device: torch.device,
                  peaks: dict[str, Any]) -> dict[str, Any]:
    category = section.run("synthetic data", lambda: synthetic_tree(out, plan))
    if category is None:
        return section.as_dict(rows=[])
    images = section.run("decode", lambda: decoded_train_images(category, plan))
    if images is None:
        return section.as_dict(rows=[])
    samples: dict[str, list[dict]] = {}
    flops: dict[str, float | None] = {}

    def harness(method: str, precision: str) -> None:
        key = f"{method} {precision}"
        if precision == "bf16" and device.type != "cuda":
            return  # autocast is CUDA-only: on CPU the row would repeat float32 (noted below)
        result = section.run(f"time {key}", lambda: measure_training(
            method, train_overrides(plan, method, precision == "bf16"), images, device,
            plan.infer_images))
        if result is not None:
            samples.setdefault(key, []).append(result)

    def reference(png: str = "", root: Path | None = None) -> None:
        key = f"reference{png}"

        def timed() -> dict:
            reset = reset_peak_memory(device)
            result = reference_rd.time_reference(
                (root or category) / "train", backbone=plan.backbone, crop=plan.size,
                resize=plan.resize, epochs=plan.rd_epochs, batch_size=plan.batch, device=device)
            result["peak_mem_mb"], result["peak_mem_kind"] = peak_memory_mb(device, reset)
            return result

        result = section.run(f"time {key}", timed)
        if result is not None:
            samples.setdefault(key, []).append(result)

    def count(method: str) -> None:
        result = section.run(f"flops {method}", lambda: count_training_flops(
            method, train_overrides(plan, method, False), images, device))
        if result is not None:
            flops[method] = result["flops_per_image_epoch"]

    # The first round gives every row one measurement; later rounds repeat the reference and
    # RD rows, alternating them (ABAB...), for the yardstick ratio.
    harness("rd", "float32")
    harness("rd", "bf16")
    reference()
    harness("cdd", "float32")
    harness("cdd", "bf16")
    count("rd")
    count("cdd")
    for _ in range(plan.repeats - 1):
        reference()
        harness("rd", "float32")
        harness("rd", "bf16")
    ref_flops = section.run("flops reference", lambda: count_reference_flops(
        category / "train", plan, device))
    if ref_flops is not None:
        flops["reference"] = ref_flops["flops_per_image_epoch"]
    if device.type != "cuda":
        section.notes.append("no bf16 training rows on CPU: bf16 autocast applies on CUDA only")
    if plan.mvtec_png:
        big = section.run(f"synthetic data at {plan.mvtec_png} px", lambda: synthetic_tree(
            out, plan, size=plan.mvtec_png, n_train=plan.mvtec_png_images))
        if big is not None:
            reference(f" ({plan.mvtec_png} px PNGs)", big)
    else:
        section.notes.append("no reference row with MVTec-sized PNGs in this mode")
    section.notes.append("FLOPs are counted once per method with the float32 config; bf16 "
                         "autocast runs the same operations. The optimiser step is not counted.")
    rows = summarise_training(samples, flops, peaks, device)
    return section.as_dict(rows=rows, samples=samples, flops_per_image_epoch=flops)


def summarise_training(samples: dict[str, list[dict]], flops: dict[str, float | None],
                       peaks: dict[str, Any], device: torch.device) -> list[dict[str, Any]]:
    """One row per arm: medians over repeats, FLOP/s, MFU and the ratio to the reference."""
    reference = samples.get("reference")
    ref_rate = _median(reference, "steady_images_per_s") if reference else None
    rows = []
    for key, results in samples.items():
        method, _, precision = key.partition(" ")
        is_reference = method == "reference"
        precision = "float32" if is_reference else precision
        rate = _median(results, "steady_images_per_s")
        per_image = flops.get("reference" if is_reference else method)
        achieved = rate * per_image if rate and per_image else None
        kind, peak = peak_for(peaks, precision, device)
        rows.append({
            "row": key, "method": "reference RD4AD loop" if is_reference else method,
            "precision": precision_label(precision, device), "samples": len(results),
            "train_images_per_s": rate,
            "infer_images_per_s": _median(results, "infer_images_per_s"),
            "flops_per_image_epoch": per_image, "achieved_flops_per_s": achieved,
            "peak_kind": kind, "peak_flops_per_s": peak, "mfu": mfu(achieved, peak),
            "peak_mem_mb": max((r["peak_mem_mb"] for r in results if "peak_mem_mb" in r),
                               default=None),
            "vs_reference": rate / ref_rate if rate and ref_rate else None,
        })
    return rows


def _median(results: Sequence[dict] | None, key: str) -> float | None:
    values = [r[key] for r in results or () if r.get(key) is not None]
    return statistics.median(values) if values else None


def mvtec_train_counts(noise_ratio: float) -> int:
    """MVTec AD training images over the 15 categories at ``noise_ratio`` (normal images plus
    floor(ratio x normal) injected anomalies per category, the split rule of docs/protocol.md §2)."""
    from datasets.mvtec import MVTEC_COUNTS
    from datasets.splits import requested_count

    return sum(n + requested_count(noise_ratio, n) for n, _, _ in MVTEC_COUNTS.values())


def estimate_section(train: dict[str, Any], epochs: int = PAPER_EPOCHS) -> dict[str, Any]:
    """Minutes for the paper's MVTec AD training (all categories, ``epochs`` epochs) from the
    training section's steady images/s."""
    counts = {"clean": mvtec_train_counts(0.0), "noise_0.1": mvtec_train_counts(PAPER_NOISE_RATIO)}
    rows = []
    for row in train.get("rows", []):
        rate = row.get("train_images_per_s")
        if not rate:
            continue
        seconds = 1.0 / rate
        rows.append({"row": row["row"], "method": row["method"], "precision": row["precision"],
                     "seconds_per_image_epoch": seconds,
                     **{f"minutes_{name}": seconds * n * epochs / 60 for name, n in counts.items()}})
    notes = [f"MVTec AD training images: {counts['clean']} clean, {counts['noise_0.1']} at noise "
             f"ratio 0.1; {epochs} epochs; training only (no evaluation, no model building)."]
    if not rows:
        notes.append("skipped: the train section produced no measurement")
    return {"images": counts, "epochs": epochs, "rows": rows, "notes": notes}


def infer_overrides(cls, plan: Plan) -> dict[str, Any]:
    """A method's smoke overrides plus what the check's size needs: its backbone, float32."""
    fields = {f.name for f in dataclasses.fields(cls.Config)}
    overrides = dict(cls.smoke_overrides)
    if "backbone" in fields:
        overrides["backbone"] = plan.backbone
    if "amp_bf16" in fields:
        overrides["amp_bf16"] = False
    return overrides


def measure_inference(name: str, plan: Plan, images: torch.Tensor,
                      device: torch.device) -> dict[str, Any]:
    """Fit ``name`` on ``plan.infer_train`` images, then time predict on ``plan.infer_images``."""
    from methods import TrainSet, build_method, get_method_class

    overrides = infer_overrides(get_method_class(name), plan)
    method = build_method(name, overrides, teacher_weights="random", device=device, seed=0)
    train = images[:plan.infer_train]
    test = images[:plan.infer_images]
    reset = reset_peak_memory(device)
    sync(device)
    t0 = time.perf_counter()
    method.fit(TrainSet(train, _names(len(train))))
    sync(device)
    fit_s = time.perf_counter() - t0
    fit_peak, kind = peak_memory_mb(device, reset)
    method.predict(test[:8])
    reset = reset_peak_memory(device)
    sync(device)
    t0 = time.perf_counter()
    prediction = method.predict(test)
    sync(device)
    infer_s = time.perf_counter() - t0
    infer_peak, _ = peak_memory_mb(device, reset)
    if np.asarray(prediction.maps).shape != (len(test), plan.size, plan.size):
        raise ValueError(f"{name}.predict returned maps of shape "
                         f"{np.asarray(prediction.maps).shape}")
    return {"method": name, "status": "ok", "overrides": overrides, "fit_s": fit_s,
            "infer_images_per_s": len(test) / infer_s if infer_s > 0 else None,
            "peak_fit_mb": fit_peak, "peak_infer_mb": infer_peak, "peak_mem_kind": kind}


def infer_section(section: Section, plan: Plan, out: Path, device: torch.device,
                  names: Sequence[str] | None = None) -> dict[str, Any]:
    from methods import available_methods

    names = list(available_methods() if names is None else names)
    category = section.run("synthetic data", lambda: synthetic_tree(out, plan))
    images = None if category is None else section.run(
        "decode", lambda: decoded_train_images(category, plan))
    rows = []
    for i, name in enumerate(names):
        before = len(section.items)
        # Each method gets at most twice its fair share of what is left.
        share = section.remaining() / (len(names) - i) * 2
        section.item_cap = min(section.budget_s * 0.5, max(share, 1.0))
        row = None if images is None else section.run(
            name, lambda name=name: measure_inference(name, plan, images, device))
        if row is None:
            entry = section.items[-1] if len(section.items) > before else {}
            reason = entry.get("error") or entry.get("reason") or "no images to run on"
            row = {"method": name, "status": entry.get("status", "skipped"), "error": reason}
        rows.append(row)
    return section.as_dict(rows=rows)


def precision_specs(plan: Plan, data_root: Path) -> list[tuple[str, str, Any]]:
    """(method, precision, RunSpec) of the bf16-vs-float32 comparison."""
    from bench.spec import RunSpec

    specs = []
    for method, epochs in (("rd", plan.precision_rd_epochs), ("cdd", plan.precision_cdd_epochs)):
        for precision in ("float32", "bf16"):
            config = {"backbone": plan.backbone, "epochs": epochs, "batch_size": plan.batch,
                      "amp_bf16": precision == "bf16", **(plan.cdd_extra if method == "cdd"
                                                          else {})}
            specs.append((method, precision, RunSpec(
                method=method, config=config, dataset="synthetic", data_root=str(data_root),
                category=CATEGORY, noise_ratio=plan.noise_ratio, split_seed=0, train_seed=0,
                image_size=plan.size, resize_size=plan.resize, teacher_weights="random")))
    return specs


def run_and_store(spec, device: torch.device, results: Path, sweep: str) -> dict[str, Any]:
    """``bench.worker.run_one`` in this process; the record is written under ``results``."""
    from bench.driver import write_result
    from bench.worker import JobOptions, run_one

    result = run_one(spec, JobOptions(device=str(device), sweep=sweep))
    write_result(results, result)
    record = result.record
    if record["status"] != "ok":
        raise RuntimeError((record.get("error") or {}).get("message", "run failed"))
    scores = np.load(io.BytesIO(result.scores))["test_scores"] if result.scores else None
    return {"record": record, "test_scores": scores}


def precision_section(section: Section, plan: Plan, out: Path,
                      device: torch.device) -> dict[str, Any]:
    from scipy.stats import spearmanr

    category = section.run("synthetic data", lambda: synthetic_tree(out, plan))
    if category is None:
        return section.as_dict(rows=[], comparison=[])
    runs: dict[tuple[str, str], dict] = {}
    for method, precision, spec in precision_specs(plan, category.parent):
        result = section.run(f"{method} {precision}", lambda spec=spec: run_and_store(
            spec, device, out / "precision", "gpu-check-precision"))
        if result is not None:
            runs[(method, precision)] = result
    rows, comparison = [], []
    for (method, precision), result in runs.items():
        record = result["record"]
        rows.append({"method": method, "precision": precision_label(precision, device),
                     "fingerprint": record["fingerprint"], "fit_s": record["timings"]["fit_s"],
                     "infer_images_per_s": record["timings"]["infer_images_per_s"],
                     "no_overlap": record["metrics"]["no_overlap"]})
    for method in ("rd", "cdd"):
        a, b = runs.get((method, "float32")), runs.get((method, "bf16"))
        if a is None or b is None:
            continue
        ma, mb = a["record"]["metrics"]["no_overlap"], b["record"]["metrics"]["no_overlap"]
        for metric in METRIC_NAMES:
            va, vb = ma.get(metric), mb.get(metric)
            delta = vb - va if va is not None and vb is not None else None
            comparison.append({"method": method, "metric": metric, "float32": va, "bf16": vb,
                               "delta": delta})
        fa, fb = a["record"]["timings"]["fit_s"], b["record"]["timings"]["fit_s"]
        comparison.append({"method": method, "metric": "fit s", "float32": fa, "bf16": fb,
                           "delta": fb - fa})
        sa, sb = a["test_scores"], b["test_scores"]
        rho = float(spearmanr(sa, sb).statistic) if sa is not None and len(sa) > 1 else None
        comparison.append({"method": method, "metric": "test-score Spearman rho",
                           "float32": 1.0, "bf16": rho, "delta": None})
    if device.type != "cuda":
        section.notes.append("bf16 autocast applies on CUDA only: on this device both rows run "
                             "float32 and must agree")
    section.notes.append(f"synthetic {CATEGORY}, noise ratio {plan.noise_ratio}, random "
                         f"teacher, No-overlap protocol; records under precision/")
    return section.as_dict(rows=rows, comparison=comparison)


def executor_section(section: Section, plan: Plan, out: Path,
                     device: torch.device) -> dict[str, Any]:
    from bench.driver import run_sweep
    from bench.executors import make_executor
    from bench.records import load_record, run_dir
    from bench.spec import RunSpec
    from bench.worker import JobOptions
    from methods import get_method_class

    category = section.run("synthetic data", lambda: synthetic_tree(out, plan))
    if category is None:
        return section.as_dict(rows=[])
    executor = make_executor("processes", None, device.type)
    specs = []
    for method in ("rd", "cdd"):
        config = {**get_method_class(method).smoke_overrides, "backbone": plan.backbone,
                  "amp_bf16": False}
        specs.append(RunSpec(method=method, config=config, dataset="synthetic",
                             data_root=str(category.parent), category=CATEGORY,
                             noise_ratio=plan.noise_ratio, image_size=plan.size,
                             resize_size=plan.resize, teacher_weights="random"))
    results = out / "sweep"
    log: list[str] = []
    t0 = time.perf_counter()
    summary = section.run("two-run sweep", lambda: run_sweep(
        # CPU workers get this process's thread count (the executor's default splits the
        # cores between workers); GPU workers keep torch's default.
        specs, results, executor=executor, options=JobOptions(
            device=device.type, sweep="gpu-check",
            threads=torch.get_num_threads() if device.type == "cpu" else None),
        force=True, progress=False, reuse=False, log=log.append))
    wall = time.perf_counter() - t0
    rows = []
    for spec in specs:
        record = load_record(run_dir(results, spec.fingerprint) / "record.json") or {}
        env = record.get("environment", {})
        rows.append({"method": spec.method, "status": record.get("status", "missing"),
                     "error": (record.get("error") or {}).get("message"),
                     "device": env.get("device"), "device_name": env.get("device_name"),
                     "host": env.get("host"),
                     "fit_s": record.get("timings", {}).get("fit_s"),
                     "total_s": record.get("timings", {}).get("total_s")})
    return section.as_dict(
        rows=rows, workers=executor.workers, gpus=list(executor.gpus), wall_s=wall,
        ok=None if summary is None else len(summary.ok), log=log)


# --------------------------------------------------------------------------------------------
# Report


def _fmt(value: Any, digits: int = 1, scale: float = 1.0, pct: bool = False) -> str:
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return "-"
    if isinstance(value, str):
        return value
    if pct:
        return f"{100 * value:.{digits}f}%"
    return f"{value / scale:,.{digits}f}"


def md_table(headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> list[str]:
    lines = ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return lines


def render(report: dict[str, Any]) -> str:
    """The printed table (Markdown): one block per section, then what did not run."""
    env, plan, sections = report["environment"], report["plan"], report["sections"]
    out = [f"# GPU check ({report['mode']}): {env.get('device_name')} "
           f"(peaks: {env['peaks']['label']}), torch {env['packages'].get('torch')}, "
           f"{report['elapsed_s']:.0f} s of a {report['budget_s']:.0f} s budget",
           "",
           f"{plan['backbone']}, crop {plan['size']} (resize {plan['resize']}), batch "
           f"{plan['batch']}, {plan['train_images']} synthetic training images, random "
           f"teacher; cudnn.allow_tf32={env['tf32']['cudnn']}, "
           f"matmul.allow_tf32={env['tf32']['matmul']}"]
    train = sections.get("train")
    if train:
        out += ["", "## Training (image-epochs/s; epochs after the first)", ""]
        out += md_table(
            ["row", "precision", "train img/s", "x reference", "infer img/s",
             "GFLOP/img-epoch", "TFLOP/s", "MFU", "peak MB", "n"],
            [[r["row"], r["precision"], _fmt(r["train_images_per_s"]),
              _fmt(r["vs_reference"], 2), _fmt(r["infer_images_per_s"]),
              _fmt(r["flops_per_image_epoch"], 2, 1e9),
              _fmt(r["achieved_flops_per_s"], 2, 1e12),
              _fmt(r["mfu"], 1, pct=True) if r["mfu"] is not None else f"- ({r['peak_kind']})",
              _fmt(r["peak_mem_mb"], 0), r["samples"]] for r in train["rows"]])
    estimate = sections.get("estimate")
    if estimate:
        out += ["", f"## Whole-MVTec estimate ({estimate['epochs']} epochs, training only)", ""]
        out += md_table(
            ["row", "precision", "ms/img-epoch",
             f"min, clean ({estimate['images']['clean']} img)",
             f"min, noise 0.1 ({estimate['images']['noise_0.1']} img)"],
            [[r["row"], r["precision"], _fmt(r["seconds_per_image_epoch"], 2, 1e-3),
              _fmt(r["minutes_clean"]), _fmt(r["minutes_noise_0.1"])] for r in estimate["rows"]])
    infer = sections.get("infer")
    if infer:
        kinds = sorted({r["peak_mem_kind"] for r in infer["rows"] if r.get("peak_mem_kind")})
        out += ["", "## Inference, every registered method (float32, smoke budgets; peak "
                    f"memory: {', '.join(kinds) or '-'})", ""]
        out += md_table(
            ["method", "status", "infer img/s", "fit s", "peak fit MB", "peak infer MB"],
            [[r["method"], r["status"] if r["status"] == "ok" else
              f"{r['status']}: {r.get('error', '')}", _fmt(r.get("infer_images_per_s")),
              _fmt(r.get("fit_s"), 2), _fmt(r.get("peak_fit_mb"), 0),
              _fmt(r.get("peak_infer_mb"), 0)] for r in infer["rows"]])
    precision = sections.get("precision")
    if precision:
        out += ["", "## bf16 against float32 (No overlap)", ""]
        out += md_table(["method", "metric", "float32", "bf16", "delta"],
                        [[c["method"], c["metric"], _fmt(c["float32"], 4), _fmt(c["bf16"], 4),
                          _fmt(c["delta"], 4)] for c in precision["comparison"]])
    executor = sections.get("executor")
    if executor:
        gpus = ",".join(executor.get("gpus", [])) or "none"
        out += ["", f"## processes executor: {executor.get('workers')} worker(s), GPUs "
                    f"visible: {gpus}, wall {_fmt(executor.get('wall_s'))} s", ""]
        out += md_table(["run", "status", "device", "device name", "fit s"],
                        [[r["method"], r["status"] if not r.get("error") else
                          f"{r['status']}: {r['error']}", r["device"], r["device_name"],
                          _fmt(r["fit_s"], 2)] for r in executor["rows"]])
    missing = [(name, item) for name, s in sections.items() for item in s.get("items", [])
               if item["status"] != "ok"]
    out += ["", "## Not measured", ""]
    if missing:
        out += [f"- {name} / {item['item']}: {item['status']}: "
                f"{item.get('error') or item.get('reason')}" for name, item in missing]
    else:
        out.append("- nothing: every item ran")
    for name, s in sections.items():
        out += [f"- note ({name}): {note}" for note in s.get("notes", [])]
    return "\n".join(out) + "\n"


# --------------------------------------------------------------------------------------------
# Driver


def environment_block(device: torch.device) -> dict[str, Any]:
    from bench.environment import environment

    env = environment(device)
    env["peaks"] = device_peaks(env["device_name"]) if device.type == "cuda" else {
        "label": "unknown"}
    env["tf32"] = {"cudnn": bool(torch.backends.cudnn.allow_tf32),
                   "matmul": bool(torch.backends.cuda.matmul.allow_tf32)}
    env["cudnn_benchmark"] = bool(torch.backends.cudnn.benchmark)
    env["cuda_visible_devices"] = os.environ.get("CUDA_VISIBLE_DEVICES")
    if device.type == "cuda":
        env["gpu_count"] = torch.cuda.device_count()
        env["gpu_memory_mb"] = torch.cuda.get_device_properties(device).total_memory / 2**20
    return env


def run_check(plan: Plan, out: Path, sections: Sequence[str] = SECTIONS, argv=None,
              log: Callable[[str], None] = print) -> dict[str, Any]:
    """Run the sections of ``plan`` in order; write the JSON after each; return the report."""
    device = torch.device(plan.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UserError("gpu check: --device cuda asked for, but no CUDA GPU is visible; use "
                        "--tiny (CPU) or --device cpu")
    if out.exists() and not out.is_dir():
        raise UserError(f"gpu check: --out {out} is a file; give a folder")
    out.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    deadline = started + plan.total_budget
    report: dict[str, Any] = {
        "schema": SCHEMA, "mode": plan.name, "argv": list(argv or []),
        "started_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "budget_s": plan.total_budget, "plan": dataclasses.asdict(plan),
        "environment": environment_block(device), "sections": {}, "elapsed_s": 0.0,
    }

    def save() -> None:
        report["elapsed_s"] = time.perf_counter() - started
        write_json_atomic(out / JSON_FILE, report)

    save()
    runners = {
        "train": lambda s: train_section(s, plan, out, device, report["environment"]["peaks"]),
        "infer": lambda s: infer_section(s, plan, out, device),
        "precision": lambda s: precision_section(s, plan, out, device),
        "executor": lambda s: executor_section(s, plan, out, device),
    }
    for name in sections:
        section = Section(name, plan.budgets[name], deadline, plan.item_fraction)
        log(f"gpu check: {name} (budget {section.end - section.started:.0f} s)")
        report["sections"][name] = runners[name](section)
        if name == "train":
            report["sections"]["estimate"] = estimate_section(report["sections"]["train"])
        save()
    report["finished_at"] = datetime.now(timezone.utc).isoformat(timespec="seconds")
    save()
    return report


def failures(report: dict[str, Any]) -> list[str]:
    """Items that raised or ran out of time (skips for lack of budget are not failures)."""
    bad = []
    for name, section in report["sections"].items():
        for item in section.get("items", []):
            if item["status"] in ("error", "timed_out"):
                bad.append(f"{name}/{item['item']}")
    return bad


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tiny", action="store_true",
                        help="ResNet-18, 64 px, a few steps, CPU: the CI check of this script")
    parser.add_argument("--out", default=None,
                        help="output folder (default: runs/gpu-check-<mode>-<UTC time>)")
    parser.add_argument("--device", default=None,
                        help="cuda (full default) or cpu (--tiny default)")
    parser.add_argument("--sections", default=",".join(SECTIONS),
                        help=f"comma-separated subset of {','.join(SECTIONS)} (estimate comes "
                             f"with train)")
    parser.add_argument("--budget-scale", type=float, default=1.0,
                        help="multiply every time budget (e.g. 0.5 when less GPU time is left)")
    parser.add_argument("--threads", type=int, default=None,
                        help="torch CPU threads (default: 1 with --tiny, else torch's)")
    args = parser.parse_args(argv)
    try:
        plan = TINY if args.tiny else FULL
        if not (math.isfinite(args.budget_scale) and 0 < args.budget_scale <= 10):
            raise UserError(f"--budget-scale {args.budget_scale} must be in (0, 10]")
        chosen = [s.strip() for s in args.sections.split(",") if s.strip()]
        unknown = [s for s in chosen if s not in SECTIONS]
        if unknown or not chosen:
            raise UserError(f"--sections {args.sections!r}: choose from {', '.join(SECTIONS)}")
        plan = dataclasses.replace(
            plan, device=args.device or plan.device,
            budgets={k: v * args.budget_scale for k, v in plan.budgets.items()},
            total_budget=plan.total_budget * args.budget_scale)
        if args.threads is not None and args.threads < 1:
            raise UserError(f"--threads {args.threads} must be at least 1")
        threads = args.threads or plan.threads
        if threads:
            torch.set_num_threads(threads)
        stamp = datetime.now(timezone.utc).strftime("%Y%m%d-%H%M%S")
        out = Path(args.out or REPO_ROOT / "runs" / f"gpu-check-{plan.name}-{stamp}")
        report = run_check(plan, out, chosen, argv=sys.argv[1:] if argv is None else argv,
                           log=lambda line: print(line, file=sys.stderr, flush=True))
    except UserError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    table = render(report)
    (out / TABLE_FILE).write_text(table, encoding="utf-8")
    print(table)
    print(f"wrote {out / JSON_FILE} and {out / TABLE_FILE}", file=sys.stderr)
    bad = failures(report)
    if bad:
        print(f"gpu check: {len(bad)} item(s) failed or timed out: {', '.join(bad)}",
              file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
