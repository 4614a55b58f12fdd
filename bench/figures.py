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
from collections.abc import Callable
from pathlib import Path

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


def render_figures(runs, out_dir: Path, *, pro: str,
                   scores_path: Callable) -> tuple[list[tuple[str, Path]], list[str]]:
    """Draw every figure the runs allow: ([(title, stem)], [notes on skipped figures])."""
    entries: list[tuple[str, Path]] = []
    notes: list[str] = []
    done = [r for r in runs if r.complete and ablation_table_of(r.method) is None]
    entries += noise_curves(done, out_dir, pro, notes)
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


def map_grid(setting, category, scores: dict, out_dir: Path,
             notes: list[str]) -> list[tuple[str, Path]]:
    """Fig. 5 / A6: image, ground truth and each method's anomaly map, for a few test images."""
    need = {"test_keys", "test_labels", "test_maps", "test_masks", "test_images"}
    usable = {label: d for label, d in sorted(scores.items(), key=lambda kv: _order(kv[0]))
              if need <= d.keys()}
    if not usable:
        notes.append(f"{setting.title} {category}: scores.npz lacks test_images/test_maps/"
                     "test_masks, so no anomaly-map grid")
        return []
    first = next(iter(usable.values()))
    keys = [str(k) for k in first["test_keys"]]
    keep = first.get("in_no_overlap", np.ones(len(keys), bool)).astype(bool)
    candidates = [k for k, lab, kp in zip(keys, first["test_labels"], keep) if lab and kp]
    common = [k for k in candidates
              if all(k in set(map(str, d["test_keys"])) for d in usable.values())]
    if not common:
        notes.append(f"{setting.title} {category}: no anomalous No-overlap test image shared by "
                     "all methods, so no anomaly-map grid")
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
