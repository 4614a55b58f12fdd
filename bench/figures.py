"""The report's figures (matplotlib, Agg backend), each written as PNG and PDF.

- Noise-ratio curves as in Fig. 3 / A5: per dataset, the category-averaged I-AUC, P-AUC and PRO
  against the noise ratio, one line per method (RD against CDD, and any other method present),
  both protocols, mean with a ±1 std band over seeds. A point that averages fewer categories
  than the method's curve has elsewhere is drawn hollow and named in the notes.
- Anomaly-score histograms as in Fig. 4 / A7: per category, training images split into normal
  and injected, test images (No-overlap set) into normal and anomalous, one column per method.
- Anomaly-map grids as in Fig. 5 / A6: a few anomalous No-overlap test images, their ground
  truth, and each method's map (min-max scaled per method over the category's test set).
- CDD diagnostics: every per-epoch series of ``record["diagnostics"]`` and
  ``record["history"]``, one thin line per category and their mean.

Figures come from ``scores.npz`` (see :mod:`bench.records`); a figure whose arrays are missing is
skipped with a note in the report instead of failing the report. One seed (the smallest) stands
for a (method, category) in the histograms and map grids.
"""

from __future__ import annotations

import io
import math
import statistics
import warnings
from collections import defaultdict
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from bench.paper import ablation_table_of
from bench.records import write_bytes_atomic

MAX_MAP_SAMPLES = 4
MAX_SERIES = 16
CURVE_METRICS = ("i_auroc", "p_auroc")
PROTOCOL_TITLES = {"no_overlap": "No overlap", "overlap": "Overlap"}


def _plt():
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    return plt


def save_figure(fig, stem: Path) -> None:
    """Write ``stem.png`` and ``stem.pdf`` atomically (rendered in memory, then renamed)."""
    for ext in ("png", "pdf"):
        buf = io.BytesIO()
        # Fixed metadata keeps PDFs byte-stable across runs.
        metadata = {"CreationDate": None} if ext == "pdf" else None
        fig.savefig(buf, format=ext, dpi=110, bbox_inches="tight", metadata=metadata)
        write_bytes_atomic(stem.parent / f"{stem.name}.{ext}", buf.getvalue())
    _plt().close(fig)


def _slug(text: str) -> str:
    out = "".join(c if c.isalnum() or c in "-." else "-" for c in str(text))
    return "-".join(p for p in out.split("-") if p) or "x"


def _order(label: str) -> tuple:
    """The report's column order: each method's ``column_rank``, then the label."""
    from methods.base import method_facts

    return (method_facts(label.split("[", 1)[0]).rank, label)


def load_scores(path: Path) -> dict[str, np.ndarray] | None:
    """The arrays of a ``scores.npz``, or None when the file is absent or unreadable (a
    truncated or damaged zip too: the figures skip that run with a note)."""
    import zipfile
    import zlib

    try:
        with np.load(path, allow_pickle=False) as data:
            return {k: data[k] for k in data.files}
    except (OSError, ValueError, EOFError, KeyError, zipfile.BadZipFile, zlib.error):
        return None


@dataclass
class MethodPoint:
    """One method of one setting and protocol in Fig. 1(b): category averages, their 95 %
    intervals over test images, and the inference speed."""

    title: str
    p_auroc: float | None
    pro: float | None
    p_interval: Any = None  # bench.stats.Interval
    pro_interval: Any = None
    partial: bool = False  # an average over fewer categories than the setting has
    fps: float | None = None  # test images per second, mean over the method's runs


@dataclass
class SettingSummary:
    """What the report computed for one setting that its summary figures draw."""

    setting: Any  # bench.report.Setting (title, slug)
    pro: str
    points: dict[str, list[MethodPoint]] = field(default_factory=dict)  # protocol -> points
    friedman: dict = field(default_factory=dict)  # (protocol, metric) -> comparisons.Friedman
    devices: tuple[str, ...] = ()


def render_figures(runs, out_dir: Path, *, pro: str, scores_path: Callable,
                   summaries: Iterable[SettingSummary] = ()
                   ) -> tuple[list[tuple[str, Path]], list[str]]:
    """Draw every figure the runs allow: ([(title, stem)], [notes on skipped figures])."""
    entries: list[tuple[str, Path]] = []
    notes: list[str] = []
    done = [r for r in runs if r.complete and ablation_table_of(r.method) is None]
    entries += noise_curves(done, out_dir, pro, notes)
    for summary in summaries:
        entries += speed_accuracy(summary, out_dir, notes)
        entries += cd_diagrams(summary, out_dir, notes)
    by_setting = defaultdict(list)
    for run in done:
        by_setting[run.setting].append(run)
    for setting in sorted(by_setting, key=lambda s: s.order):
        sruns = by_setting[setting]
        for category in sorted({r.category for r in sruns}):
            chosen = {}
            for run in sorted((r for r in sruns if r.category == category),
                              key=lambda r: (r.label, r.seed)):
                chosen.setdefault(run.label, run)
            scores = {}
            for label, run in chosen.items():
                data = load_scores(scores_path(run))
                if data is None:
                    notes.append(f"{setting.title} {category} {label}: no scores.npz, so no "
                                 "histogram or map grid for it")
                    continue
                scores[label] = data
            if not scores:
                continue
            entries += score_histograms(setting, category, scores, out_dir, notes)
            entries += map_grid(setting, category, scores, out_dir, notes)
            entries += map_grid(setting, category, scores, out_dir, notes, injected=True)
    entries += diagnostics([r for r in runs if r.complete], out_dir, notes)
    return entries, notes


def noise_curves(runs, out_dir: Path, pro: str, notes: list[str]) -> list[tuple[str, Path]]:
    """Fig. 3 / A5: metric vs noise ratio, per protocol, mean ± std over seeds."""
    plt = _plt()
    metrics = (*CURVE_METRICS, pro)
    groups = defaultdict(list)
    for run in runs:
        s = run.setting
        groups[(s.dataset, s.image_size, s.teacher_weights)].append(run)
    entries = []
    for (dataset, size, weights), gruns in sorted(groups.items()):
        ratios = sorted({r.setting.noise_ratio for r in gruns})
        if len(ratios) < 2:
            continue
        labels = sorted({r.label for r in gruns}, key=_order)
        # A point that averages fewer categories than the curve's others is not comparable
        # with them: it is drawn hollow and named in the notes.
        categories = {label: {r.category for r in gruns if r.label == label} for label in labels}
        partial = set()
        fig, axes = plt.subplots(2, len(metrics), figsize=(4.2 * len(metrics), 6.4),
                                 squeeze=False, layout="constrained")
        for i, protocol in enumerate(("no_overlap", "overlap")):
            for j, metric in enumerate(metrics):
                ax = axes[i][j]
                for label in labels:
                    xs, means, stds, hollow = [], [], [], []
                    for ratio in ratios:
                        point = curve_point([r for r in gruns if r.label == label and
                                             math.isclose(r.setting.noise_ratio, ratio)],
                                            protocol, metric)
                        if point is None:
                            continue
                        mean, std, present = point
                        xs.append(ratio)
                        means.append(mean)
                        stds.append(std)
                        missing = categories[label] - present
                        hollow.append(bool(missing))
                        if missing:
                            partial.add((label, ratio, len(present), len(categories[label]),
                                         ", ".join(sorted(missing))))
                    if not xs:
                        continue
                    xs, means, stds, hollow = map(np.asarray, (xs, means, stds, hollow))
                    (line,) = ax.plot(xs, means, marker="o", label=label)
                    if hollow.any():
                        ax.plot(xs[hollow], means[hollow], linestyle="none", marker="o",
                                markersize=9, markerfacecolor="white",
                                markeredgecolor=line.get_color())
                    ax.fill_between(xs, means - stds, means + stds, alpha=0.2,
                                    color=line.get_color())
                name = {"i_auroc": "I-AUC", "p_auroc": "P-AUC"}.get(metric, f"PRO ({metric})")
                ax.set_title(f"{PROTOCOL_TITLES[protocol]}: {name}", fontsize=9)
                ax.set_xlabel("noise ratio")
                ax.grid(alpha=0.3)
        axes[0][0].legend(fontsize=8)
        title = f"{dataset}: metrics vs noise ratio ({size} px, teacher {weights})"
        fig.suptitle(title + "; category mean, band = ±1 std over seeds", fontsize=10)
        stem = out_dir / f"noise_curves_{_slug(dataset)}_px{size}_{_slug(weights)}"
        save_figure(fig, stem)
        for label, ratio, n, total, missing in sorted(partial):
            notes.append(f"noise curves {dataset} {size} px, {label} at noise ratio {ratio:g}: "
                         f"mean over {n} of {total} categories (hollow point; no result for "
                         f"{missing})")
        entries.append((f"Noise-ratio curves (Fig. 3/A5-like): {dataset}, {size} px, "
                        f"teacher {weights}", stem))
    return entries


def curve_point(runs, protocol: str, metric: str) -> tuple[float, float, set[str]] | None:
    """(category mean averaged over seeds, std over seeds, categories present) of one method at
    one noise ratio; None without any value.

    Values are keyed by seed and category, so one cell counts once even when two records hold
    it (a run and its copy under another name).
    """
    per_seed: dict = defaultdict(lambda: defaultdict(list))
    for run in runs:
        value = run.value(protocol, metric)
        if value is not None:
            per_seed[run.seed][run.category].append(value)
    if not per_seed:
        return None
    seed_means = [statistics.fmean(statistics.fmean(v) for v in cats.values())
                  for cats in per_seed.values()]
    std = statistics.stdev(seed_means) if len(seed_means) > 1 else 0.0
    present = {cat for cats in per_seed.values() for cat in cats}
    return statistics.fmean(seed_means), std, present


def score_histograms(setting, category, scores: dict, out_dir: Path,
                     notes: list[str]) -> list[tuple[str, Path]]:
    """Fig. 4 / A7: train (normal vs injected) and test (normal vs anomalous) scores."""
    usable = {label: d for label, d in sorted(scores.items(), key=lambda kv: _order(kv[0]))
              if {"train_scores", "test_scores", "test_labels"} <= d.keys()}
    if not usable:
        notes.append(f"{setting.title} {category}: scores.npz lacks train_scores/test_scores/"
                     "test_labels, so no score histogram")
        return []
    plt = _plt()
    fig, axes = plt.subplots(2, len(usable), figsize=(4.2 * len(usable), 6), squeeze=False,
                             layout="constrained")
    for j, (label, d) in enumerate(usable.items()):
        train = d["train_scores"].astype(float)
        injected = d.get("train_injected", np.zeros(len(train), bool)).astype(bool)
        test = d["test_scores"].astype(float)
        anomalous = d["test_labels"].astype(bool)
        keep = d.get("in_no_overlap", np.ones(len(test), bool)).astype(bool)
        bins = np.linspace(min(train.min(), test.min()), max(train.max(), test.max()), 31)
        ax = axes[0][j]
        ax.hist(train[~injected], bins=bins, alpha=0.6, label=f"normal ({(~injected).sum()})")
        ax.hist(train[injected], bins=bins, alpha=0.6, color="tab:red",
                label=f"injected ({injected.sum()})")
        ax.set_title(f"{label}: training images", fontsize=9)
        ax.legend(fontsize=7)
        ax = axes[1][j]
        ax.hist(test[keep & ~anomalous], bins=bins, alpha=0.6,
                label=f"normal ({(keep & ~anomalous).sum()})")
        ax.hist(test[keep & anomalous], bins=bins, alpha=0.6, color="tab:red",
                label=f"anomalous ({(keep & anomalous).sum()})")
        ax.set_title(f"{label}: test images (No overlap)", fontsize=9)
        ax.set_xlabel("anomaly score")
        ax.legend(fontsize=7)
    fig.suptitle(f"Anomaly scores, {setting.title}, {category}", fontsize=10)
    stem = out_dir / f"hist_{setting.slug}_{_slug(category)}"
    save_figure(fig, stem)
    return [(f"Score histograms (Fig. 4/A7-like): {setting.title}, {category}", stem)]


def map_grid(setting, category, scores: dict, out_dir: Path, notes: list[str],
             injected: bool = False) -> list[tuple[str, Path]]:
    """Fig. 5 / A6: image, ground truth and each method's anomaly map, for a few anomalous
    No-overlap test images; with ``injected``, Fig. A9 / A10: the injected training images.

    An injected image is a test image the split moved into the training set (``in_no_overlap``
    False): its stored map is the trained model's map of that training image, as the Overlap
    protocol scores it.
    """
    need = {"test_keys", "test_labels", "test_maps", "test_masks", "test_images"}
    usable = {label: d for label, d in sorted(scores.items(), key=lambda kv: _order(kv[0]))
              if need <= d.keys()}
    what = "injected-image" if injected else "anomaly-map"
    if not usable:
        notes.append(f"{setting.title} {category}: scores.npz lacks test_images/test_maps/"
                     f"test_masks, so no {what} grid")
        return []
    first = next(iter(usable.values()))
    keys = [str(k) for k in first["test_keys"]]
    keep = first.get("in_no_overlap", np.ones(len(keys), bool)).astype(bool)
    if injected:
        keep = ~keep
        if not keep.any():
            return []  # a clean training set: nothing was injected
    candidates = [k for k, lab, kp in zip(keys, first["test_labels"], keep) if lab and kp]
    common = [k for k in candidates
              if all(k in set(map(str, d["test_keys"])) for d in usable.values())]
    if not common:
        which = "injected training" if injected else "anomalous No-overlap test"
        notes.append(f"{setting.title} {category}: no {which} image shared by all methods, so "
                     f"no {what} grid")
        return []
    pick = [common[i] for i in np.linspace(0, len(common) - 1,
                                           min(MAX_MAP_SAMPLES, len(common))).astype(int)]
    pick = list(dict.fromkeys(pick))
    plt = _plt()
    ncols = 2 + len(usable)
    fig, axes = plt.subplots(len(pick), ncols, figsize=(1.9 * ncols, 1.9 * len(pick)),
                             squeeze=False, layout="constrained")
    index = {label: {str(k): i for i, k in enumerate(d["test_keys"])}
             for label, d in usable.items()}
    ranges = {}
    for label, d in usable.items():
        maps = d["test_maps"].astype(np.float32)
        ranges[label] = (float(maps.min()), float(maps.max()))
    for r, key in enumerate(pick):
        i0 = index[next(iter(usable))][key]
        image = first["test_images"][i0]
        axes[r][0].imshow(image)
        axes[r][1].imshow(first["test_masks"][i0], cmap="gray", vmin=0, vmax=1)
        for c, (label, d) in enumerate(usable.items()):
            lo, hi = ranges[label]
            amap = (d["test_maps"][index[label][key]].astype(np.float32) - lo) / max(hi - lo,
                                                                                      1e-12)
            ax = axes[r][2 + c]
            ax.imshow(image)
            ax.imshow(amap, cmap="jet", alpha=0.5, vmin=0, vmax=1)
        for ax in axes[r]:
            ax.set_xticks([])
            ax.set_yticks([])
        # The defect folder and file name tell the samples apart (names repeat per defect).
        axes[r][0].set_ylabel("/".join(Path(key).parts[-2:]), fontsize=6)
    for c, title in enumerate(["image", "ground truth", *usable]):
        axes[0][c].set_title(title, fontsize=8)
    if injected:
        fig.suptitle(f"Anomaly maps of injected training images, {setting.title}, {category}",
                     fontsize=9)
        stem = out_dir / f"maps_injected_{setting.slug}_{_slug(category)}"
        save_figure(fig, stem)
        return [(f"Injected training images' maps (Fig. A9/A10-like): {setting.title}, "
                 f"{category}", stem)]
    fig.suptitle(f"Anomaly maps, {setting.title}, {category}", fontsize=9)
    stem = out_dir / f"maps_{setting.slug}_{_slug(category)}"
    save_figure(fig, stem)
    return [(f"Anomaly-map grid (Fig. 5/A6-like): {setting.title}, {category}", stem)]


def diagnostics(runs, out_dir: Path, notes: list[str]) -> list[tuple[str, Path]]:
    """Per-epoch diagnostics and training history, per (setting, method)."""
    groups = defaultdict(list)
    for run in runs:
        series = _series(run.record)
        if series:
            groups[(run.setting, run.label)].append((run, series))
    entries = []
    plt = _plt()
    for (setting, label), items in sorted(groups.items(), key=lambda kv: (kv[0][0].slug,
                                                                         kv[0][1])):
        names = []
        for _, series in items:
            names += [n for n in series if n not in names]
        if len(names) > MAX_SERIES:
            notes.append(f"{setting.title} {label}: {len(names)} per-epoch series, first "
                         f"{MAX_SERIES} drawn")
            names = names[:MAX_SERIES]
        ncols = min(3, len(names))
        nrows = math.ceil(len(names) / ncols)
        fig, axes = plt.subplots(nrows, ncols, figsize=(4.2 * ncols, 3 * nrows), squeeze=False,
                             layout="constrained")
        for ax in axes.flat[len(names):]:
            ax.set_visible(False)
        for index, (ax, name) in enumerate(zip(axes.flat, names)):
            curves = []
            for run, series in sorted(items, key=lambda it: (it[0].category, it[0].seed)):
                if name not in series:
                    continue
                x, values = series[name]
                ax.plot(x, values, lw=0.8, alpha=0.5, marker="." if len(values) < 30 else None,
                        label=f"{run.category} ({_seed_text(run.seed)})")
                curves.append((x, values))
            length = min(len(c[1]) for c in curves)
            if len(curves) > 1 and length:
                with warnings.catch_warnings():  # epochs where every curve is NaN
                    warnings.simplefilter("ignore", RuntimeWarning)
                    mean = np.nanmean(np.stack([c[1][:length] for c in curves]), axis=0)
                ax.plot(curves[0][0][:length], mean, color="black", lw=2, label="mean",
                        marker="." if length < 30 else None)
            if index == 0:  # one legend names the runs' lines for every panel
                ax.legend(fontsize=7)
            ax.set_title(name, fontsize=9)
            ax.set_xlabel("epoch")
            ax.grid(alpha=0.3)
        fig.suptitle(f"Per-epoch diagnostics: {label}, {setting.title} (one line per "
                     "category and seed)", fontsize=10)
        stem = out_dir / f"diagnostics_{setting.slug}_{_slug(label)}"
        save_figure(fig, stem)
        entries.append((f"Diagnostics over epochs: {label}, {setting.title}", stem))
    return entries


def _seed_text(seed) -> str:
    """'seed 0' for a (split, train) pair of equal seeds, else 'split 0, train 1'."""
    if isinstance(seed, tuple) and len(seed) == 2:
        return f"seed {seed[0]}" if seed[0] == seed[1] else f"split {seed[0]}, train {seed[1]}"
    return f"seed {seed}"


def _series(record: dict) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """Numeric per-epoch series of a record as name -> (epochs, values): diagnostics first,
    then history, per-student pick counts last (there are many and they matter least)."""
    out = {}
    for source in ("diagnostics", "history"):
        table = record.get(source) or {}
        epochs = _as_array(table.get("epoch"))
        for name, values in table.items():
            arr = _as_array(values)
            if name == "epoch" or arr is None or not np.isfinite(arr).any():
                continue
            x = epochs if epochs is not None and len(epochs) == len(arr) else np.arange(len(arr))
            out[name if name not in out else f"history/{name}"] = (x, arr)
    return dict(sorted(out.items(), key=lambda kv: "pick_count" in kv[0]))


def _as_array(values) -> np.ndarray | None:
    """A 1-D float array of a JSON list (None -> NaN), or None when it is not one."""
    if not isinstance(values, list) or not values:
        return None
    try:
        arr = np.asarray([np.nan if v is None else v for v in values], dtype=float)
    except (TypeError, ValueError):
        return None  # not a scalar series
    return arr if arr.ndim == 1 else None


# --------------------------------------------------------------------------------------------
# Fig. 1(b): localisation against speed; critical-difference diagrams


MAX_CIRCLE_AREA = 1600.0  # points^2 of the fastest method's circle


def speed_accuracy(summary: SettingSummary, out_dir: Path,
                   notes: list[str]) -> list[tuple[str, Path]]:
    """Fig. 1(b): P-AUC (x) against PRO (y) per method, circle area proportional to inference
    FPS, whiskers = 95 % intervals over test images; one figure per protocol."""
    plt = _plt()
    entries = []
    setting = summary.setting
    for protocol, points in summary.points.items():
        points = [p for p in points if p.p_auroc is not None and p.pro is not None]
        if not points:
            continue
        fps = [p.fps for p in points if p.fps]
        top = max(fps) if fps else None
        fig, ax = plt.subplots(figsize=(6.2, 4.8), layout="constrained")
        colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
        for i, point in enumerate(points):
            color = colors[i % len(colors)]
            xerr = _whisker(point.p_auroc, point.p_interval)
            yerr = _whisker(point.pro, point.pro_interval)
            if xerr is not None or yerr is not None:
                ax.errorbar([point.p_auroc], [point.pro], xerr=xerr, yerr=yerr, fmt="none",
                            ecolor=color, elinewidth=0.8, capsize=2, alpha=0.8)
            if point.fps and top:
                area = MAX_CIRCLE_AREA * point.fps / top
                ax.scatter([point.p_auroc], [point.pro], s=area, color=color, alpha=0.45,
                           edgecolors=color, linewidths=1.5,
                           facecolors="white" if point.partial else color)
            else:
                ax.scatter([point.p_auroc], [point.pro], marker="x", s=60, color=color)
            ax.annotate(point.title, (point.p_auroc, point.pro), xytext=(6, 6),
                        textcoords="offset points", fontsize=8, color=color)
        if top:
            for value in sorted({top, top / 4}):
                ax.scatter([], [], s=MAX_CIRCLE_AREA * value / top, facecolors="none",
                           edgecolors="gray", label=f"{value:.3g} FPS")
            ax.legend(loc="best", fontsize=7, labelspacing=2.2, borderpad=1.2,
                      title="inference speed", title_fontsize=7)
        ax.set_xlabel("P-AUC (category mean)")
        ax.set_ylabel(f"PRO ({summary.pro}, category mean)")
        ax.grid(alpha=0.3)
        ax.margins(0.15)
        ax.set_title(f"{setting.title}, {PROTOCOL_TITLES[protocol]}: localisation vs speed "
                     "(area = FPS, whiskers = 95 % interval over test images)", fontsize=8)
        stem = out_dir / f"speed_accuracy_{setting.slug}_{protocol}"
        save_figure(fig, stem)
        entries.append((f"P-AUC vs PRO vs speed (Fig. 1(b)-like): {setting.title}, "
                        f"{PROTOCOL_TITLES[protocol]}", stem))
        slow = [p.title for p in points if not p.fps]
        if slow:
            notes.append(f"Fig. 1(b) {setting.title} {PROTOCOL_TITLES[protocol]}: no inference "
                         f"speed recorded for {', '.join(slow)} (drawn as x)")
        partial = [p.title for p in points if p.partial]
        if partial:
            notes.append(f"Fig. 1(b) {setting.title} {PROTOCOL_TITLES[protocol]}: "
                         f"{', '.join(partial)} average fewer categories than the setting has "
                         "(hollow circle)")
    if len(summary.devices) > 1 and summary.points:
        notes.append(f"Fig. 1(b) {setting.title}: speeds were measured on different devices "
                     f"({', '.join(summary.devices)}); circle sizes do not compare methods")
    return entries


def _whisker(value: float, ci) -> list[list[float]] | None:
    if ci is None:
        return None
    return [[max(value - ci.low, 0.0)], [max(ci.high - value, 0.0)]]


def cd_diagrams(summary: SettingSummary, out_dir: Path,
                notes: list[str]) -> list[tuple[str, Path]]:
    """Critical-difference diagrams (Demšar 2006): average ranks over categories, methods the
    Nemenyi test cannot tell apart joined by a bar, and the CD; one panel per (protocol,
    metric), drawn by scikit-posthocs."""
    tests = summary.friedman
    if not tests:
        return []
    import pandas as pd
    import scikit_posthocs as sp

    plt = _plt()
    fig, axes = plt.subplots(len(tests), 1, figsize=(7.5, 1.9 * len(tests)), squeeze=False,
                             layout="constrained")
    for ax, ((protocol, metric), test) in zip(axes[:, 0], tests.items()):
        ranks = pd.Series(test.average_ranks, index=list(test.methods))
        sig = pd.DataFrame(test.nemenyi_p(), index=list(test.methods),
                           columns=list(test.methods))
        sp.critical_difference_diagram(ranks, sig, ax=ax)  # joins pairs with p >= 0.05
        k = len(test.methods)
        bottom, _ = ax.get_ylim()
        ax.set_ylim(bottom, 1.5)  # room above the rank axis's labels for the CD bar
        cd = test.critical_difference
        ax.plot([1, 1 + cd], [1.05, 1.05], color="black", lw=2)
        ax.text(1 + cd / 2, 1.12, f"CD = {cd:.2f}", ha="center", va="bottom", fontsize=7)
        lo, hi = ax.get_xlim()
        ax.set_xlim(min(lo, 0.6), max(hi, 1 + cd + 0.1, k + 0.4))
        name = {"i_auroc": "I-AUC", "p_auroc": "P-AUC"}.get(metric, f"PRO ({metric})")
        p = test.p_value
        p_text = "n/a" if not math.isfinite(p) else f"{p:.3g}"
        ax.set_title(f"{PROTOCOL_TITLES[protocol]}: {name}; N = {len(test.categories)} "
                     f"categories, Friedman p = {p_text}", fontsize=8, loc="left")
    fig.suptitle(f"Average ranks over categories (1 = best), {summary.setting.title}",
                 fontsize=9)
    stem = out_dir / f"cd_{summary.setting.slug}"
    save_figure(fig, stem)
    if any(len(t.categories) < 5 for t in tests.values()):
        notes.append(f"critical-difference diagram {summary.setting.title}: fewer than 5 "
                     "categories, so the Friedman test and the CD have little power")
    return [(f"Critical-difference diagram (Friedman/Nemenyi): {summary.setting.title}", stem)]


# --------------------------------------------------------------------------------------------
# Fig. A1: t-SNE of teacher features (needs the teacher and the data, not only records)


TSNE_PREFIX = "tsne_"
TSNE_POINTS = 1000  # points per panel: t-SNE of this many takes seconds
TSNE_ANOMALOUS_SHARE = 0.25  # at most this share of a panel's points are anomalous pixels
PAPER_TSNE_CATEGORIES = ("carpet", "grid", "leather")  # Fig. A1's categories


def teacher_tsne(runs, out_dir: Path, notes: list[str], *, data_root: str | None = None,
                 categories: Iterable[str] | None = None, points: int = TSNE_POINTS,
                 device: str = "cpu", seed: int = 0) -> list[tuple[str, Path]]:
    """Fig. A1: t-SNE of teacher features of one category's test images, normal pixels (green)
    against anomalous pixels (red), one panel per teacher layer.

    The teacher is rebuilt from a record (its ``backbone`` and ``teacher_weights``) and the
    images are read from the record's data root (or ``data_root``) at the record's geometry.
    A feature-map pixel is anomalous when at least half of the image pixels it covers are
    (masks area-averaged to the layer's size), normal when none is, and left out otherwise.
    """
    by_key = {}
    for run in sorted((r for r in runs if r.complete), key=lambda r: _order(r.label)):
        spec = run.record.get("spec") or {}
        cfg = run.record.get("resolved_config") or {}
        backbone = cfg.get("backbone")
        if not backbone:
            continue
        key = (run.setting, run.category, backbone)
        by_key.setdefault(key, (run, spec))
    wanted = set(categories) if categories else None
    if wanted is None:
        present = {c for (_, c, _) in by_key}
        paper = [c for c in PAPER_TSNE_CATEGORIES if c in present]
        wanted = set(paper or sorted(present)[:3])
    entries = []
    unknown = (set(categories) - {c for (_, c, _) in by_key}) if categories else set()
    for category in sorted(unknown):
        notes.append(f"t-SNE: no complete run with a backbone for category {category}")
    for (setting, category, backbone), (_, spec) in sorted(
            by_key.items(), key=lambda kv: (kv[0][0].order, kv[0][1], kv[0][2])):
        if category not in wanted:
            continue
        root = data_root or spec.get("data_root")
        try:
            panels = _tsne_panels(spec, backbone, root, points, device, seed)
        except Exception as err:  # noqa: BLE001 - one category's data must not stop the report
            first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
            notes.append(f"t-SNE {setting.title} {category}: not drawn ({first})")
            continue
        plt = _plt()
        fig, axes = plt.subplots(1, len(panels), figsize=(3.6 * len(panels), 3.6),
                                 squeeze=False, layout="constrained")
        for ax, (layer, xy, anomalous) in zip(axes[0], panels):
            ax.scatter(xy[~anomalous, 0], xy[~anomalous, 1], s=3, color="tab:green",
                       alpha=0.6, label=f"normal ({(~anomalous).sum()})")
            ax.scatter(xy[anomalous, 0], xy[anomalous, 1], s=3, color="tab:red", alpha=0.7,
                       label=f"anomalous ({anomalous.sum()})")
            ax.set_title(layer, fontsize=9)
            ax.set_xticks([])
            ax.set_yticks([])
            ax.legend(fontsize=7, markerscale=3)
        fig.suptitle(f"t-SNE of teacher features ({backbone}, {spec.get('teacher_weights')}), "
                     f"{setting.title}, {category} test pixels", fontsize=9)
        stem = out_dir / f"{TSNE_PREFIX}{setting.slug}_{_slug(category)}"
        save_figure(fig, stem)
        entries.append((f"t-SNE of teacher features (Fig. A1-like): {setting.title}, {category}",
                        stem))
    return entries


def _tsne_panels(spec: dict, backbone: str, root, points: int, device: str, seed: int):
    """[(layer name, (n, 2) embedding, (n,) anomalous flags)] of one category's test set."""
    import torch
    import torch.nn.functional as F
    from sklearn.manifold import TSNE

    from datasets import Preprocess, load_category, load_images, load_masks
    from methods.backbones import build_teacher

    if not root:
        raise ValueError("the record names no data root; pass --data-root")
    data = load_category(spec["dataset"], root, spec["category"])
    preprocess = Preprocess(resize=int(spec["resize_size"]), crop=int(spec["image_size"]))
    images = load_images(data.test, preprocess)
    masks = torch.from_numpy(load_masks(data.test, preprocess)).float()[:, None]
    teacher = build_teacher(backbone, str(spec["teacher_weights"])).to(device).eval()
    rng = np.random.default_rng(seed)
    features: list[list[torch.Tensor]] = []
    with torch.no_grad():
        for start in range(0, images.shape[0], 16):
            feats = teacher(images[start:start + 16].to(device))
            features.append([f.float().cpu() for f in feats])
    panels = []
    for layer in range(len(features[0])):
        feats = torch.cat([batch[layer] for batch in features])  # (N, C, h, w)
        share = F.adaptive_avg_pool2d(masks, feats.shape[-2:])[:, 0].reshape(-1).numpy()
        vectors = feats.permute(0, 2, 3, 1).reshape(-1, feats.shape[1]).numpy()
        anomalous = np.flatnonzero(share >= 0.5)
        normal = np.flatnonzero(share == 0)
        n_anom = min(anomalous.size, int(points * TSNE_ANOMALOUS_SHARE))
        n_norm = min(normal.size, points - n_anom)
        pick = np.r_[rng.choice(normal, n_norm, replace=False),
                     rng.choice(anomalous, n_anom, replace=False)]
        flags = np.r_[np.zeros(n_norm, bool), np.ones(n_anom, bool)]
        if pick.size < 5:
            raise ValueError(f"layer {layer + 1}: only {pick.size} feature pixels")
        perplexity = float(min(30.0, (pick.size - 1) / 3))
        xy = TSNE(n_components=2, perplexity=perplexity, init="pca",
                  random_state=seed).fit_transform(vectors[pick])
        panels.append((f"layer{layer + 1} ({feats.shape[1]} channels, {feats.shape[-1]}x"
                       f"{feats.shape[-2]})", xy, flags))
    return panels
