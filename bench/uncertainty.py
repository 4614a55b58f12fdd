"""Bootstrap intervals over test images, from a run's stored arrays (no retraining).

For one run and one protocol, a bootstrap replicate resamples the protocol's test images with
replacement, **stratified by label** (as many normal and anomalous images as the set has), and
recomputes the metric on the resample. A pixel or a region travels with its image, so PRO's
regions are resampled with the image that holds them. Every replicate is a *weighted* metric,
image i counted ``w_i`` times, and each metric is a closed form in per-image statistics:

I-AUC
    Mann-Whitney over images: sum_ij w_i w_j H_ij / (n_anomalous * n_normal), with
    H_ij = [s_i > s_j] + 1/2 [s_i = s_j] for an anomalous i and a normal j (stratification
    keeps both class sizes fixed).
P-AUC
    The same over pixels: C_ij = sum over anomalous pixels p of image i and normal pixels q of
    image j of [m_p > m_q] + 1/2 [m_p = m_q]; the replicate is w^T C w / ((w . P)(w . Q)) with
    P, Q the anomalous and normal pixel counts per image. Exact: a resample that holds image i
    twice pairs each copy's pixels with each other copy's.
PRO (``pro_rd4ad``)
    RD4AD's PRO is the mean of a per-image value over anomalous images, so a replicate is the
    weighted mean of the per-image values. Exact.
AUPRO (``aupro``, official)
    Not a sum of per-image terms. Per image, the normal pixels at or above each threshold of a
    fixed grid (``AUPRO_GRID`` thresholds at evenly spaced FPR levels of the test set up to
    ``AUPRO_GRID_FPR``), per region the fraction at or above it; a replicate's FPR and PRO
    curves are weighted sums of those, integrated to 0.3 as the official metric is. The grid
    makes it an approximation: the sampled points lie on the exact curve and the straight lines
    between them cut the staircase's corners (at most ``AUPRO_GRID_FPR / AUPRO_GRID / 2 / 0.3``
    of normalised area; the tests hold it to 1e-3 of the exact value).

All replicates of a run come from matrix products over one ``(B, N)`` weight matrix, so the
cost is a few small BLAS calls per run, not B metric evaluations (see docs/report.md for the
measured time). The draws are a function of the test set (its sorted keys and labels) and the
seed, never of the method: runs that share a test set share their resamples, so a difference
between two methods (or two seeds) is bootstrapped *paired*.

Stored maps are downsampled (``scores.npz`` keeps 64 x 64 float16 maps; :mod:`bench.worker`), so
pixel metrics computed from them differ from the record's full-resolution values. Where
``scores.npz`` holds the full-resolution per-image statistics (:func:`pixel_statistics`, arrays
:data:`FULL_RES_ARRAYS`), P-AUC and PRO use those and match the record; otherwise the stored
maps stand in, and :func:`interval` translates the percentile interval to the record's value
(the spread comes from the stored maps, the centre from the record).
"""

from __future__ import annotations

import hashlib
import math
import warnings
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field

import numpy as np

from bench.stats import Interval

DEFAULT_REPLICATES = 1000
LEVEL = 0.95
BOOTSTRAP_METRICS = ("i_auroc", "p_auroc", "pro_rd4ad", "aupro")
AUPRO_LIMIT = 0.3
AUPRO_GRID = 2000  # thresholds of the AUPRO grid
AUPRO_GRID_FPR = 0.6  # the grid's largest FPR level on the whole test set
# Full-resolution per-image statistics a worker may store beside the maps (pixel_statistics).
FULL_RES_ARRAYS = ("test_pixel_pairs", "test_anomalous_pixels", "test_normal_pixels",
                   "test_pro_rd4ad")
_STRUCTURE_8 = np.zeros((3, 3, 3), dtype=bool)  # 8-connected within an image, none across
_STRUCTURE_8[1] = True


# --------------------------------------------------------------------------------------------
# Per-image statistics


def pixel_pairs(maps: np.ndarray, masks: np.ndarray) -> tuple[np.ndarray, np.ndarray,
                                                               np.ndarray]:
    """(2C, P, Q): twice the pixel pair counts C (N, N) of the P-AUC (ties count one, so the
    matrix holds integers and every weighted sum of it is exact in float64), and the anomalous
    (P) and normal (Q) pixel counts per image. One sorted search of all anomalous pixels per
    image (a histogram formulation over all images at once measured no faster)."""
    maps = np.asarray(maps)
    maps = maps.astype(np.float32) if maps.dtype == np.float16 else maps
    masks = np.asarray(masks).astype(bool)
    n = maps.shape[0]
    flat = maps.reshape(n, -1)
    flat_masks = masks.reshape(n, -1)
    pos_values = flat[flat_masks]
    pos_owner = np.repeat(np.arange(n), flat_masks.sum(axis=1))
    order = np.argsort(pos_values, kind="stable")  # sorted needles search several times faster
    pos_values, pos_owner = pos_values[order], pos_owner[order]
    doubled = np.zeros((n, n), dtype=np.float64)
    if pos_values.size:
        for j in range(n):
            neg = np.sort(flat[j][~flat_masks[j]])
            if neg.size == 0:
                continue
            below = np.searchsorted(neg, pos_values, side="left")
            at_or_below = np.searchsorted(neg, pos_values, side="right")
            doubled[:, j] = np.bincount(pos_owner, weights=(below + at_or_below), minlength=n)
    anomalous = flat_masks.sum(axis=1).astype(np.float64)
    return doubled, anomalous, flat_masks.shape[1] - anomalous


def pro_per_image(maps: np.ndarray, masks: np.ndarray) -> np.ndarray:
    """RD4AD's PRO of each image (NaN for an image without anomalous pixel or without normal
    pixel, which RD4AD's mean leaves out): the mean of these is ``bench.metrics.pro_rd4ad``."""
    from bench.metrics import MetricWarning, pro_rd4ad

    masks = np.asarray(masks).astype(bool)
    out = np.full(masks.shape[0], np.nan)
    for i in np.flatnonzero(masks.reshape(masks.shape[0], -1).any(axis=1)):
        if masks[i].all():
            continue
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", MetricWarning)
            out[i] = pro_rd4ad(maps[i:i + 1], masks[i:i + 1])
    return out


def pixel_statistics(maps, masks) -> dict[str, np.ndarray]:
    """The full-resolution per-image statistics under their ``scores.npz`` names
    (:data:`FULL_RES_ARRAYS`): with them stored, P-AUC and PRO intervals reproduce the record's
    values exactly. ``maps`` (N, H, W) real, ``masks`` (N, H, W) binary, the arrays the record's
    metrics were computed from."""
    maps = np.asarray(maps)
    masks = np.asarray(masks).astype(bool)
    doubled, anomalous, normal = pixel_pairs(maps, masks)
    return {"test_pixel_pairs": doubled, "test_anomalous_pixels": anomalous,
            "test_normal_pixels": normal, "test_pro_rd4ad": pro_per_image(maps, masks)}


@dataclass
class AuproGrid:
    """What a weighted AUPRO needs, on a fixed threshold grid (falling thresholds)."""

    normal_at_or_above: np.ndarray  # (N, T) normal pixels of image i scoring >= t_k
    normal_pixels: np.ndarray  # (N,)
    region_image: np.ndarray  # (R,) the image holding region r
    region_at_or_above: np.ndarray  # (R, T) fraction of region r scoring >= t_k

    @classmethod
    def of(cls, maps: np.ndarray, masks: np.ndarray, size: int = AUPRO_GRID,
           top_fpr: float = AUPRO_GRID_FPR) -> AuproGrid | None:
        from scipy import ndimage

        maps = np.asarray(maps, dtype=np.float64)
        masks = np.asarray(masks).astype(bool)
        labels, count = ndimage.label(masks, structure=_STRUCTURE_8)
        negatives = np.sort(maps[~masks])
        if count == 0 or negatives.size == 0:
            return None
        # Thresholds at evenly spaced FPR levels of the whole test set, highest first, then
        # -inf (every pixel positive: the curve's end at (1, 1)); the start (0, 0) is implicit.
        ranks = np.round(np.linspace(0.0, top_fpr, size) * (negatives.size - 1)).astype(int)
        grid = np.unique(negatives[::-1][ranks])[::-1]
        # Just above the largest normal score: FPR 0 with the PRO reached there (the curve's
        # vertical start), and -inf: every pixel positive, the curve's end at (1, 1).
        grid = np.r_[np.nextafter(grid[0], np.inf), grid, -np.inf]
        n = maps.shape[0]
        normal_ge = np.empty((n, grid.size))
        for i in range(n):
            neg = np.sort(maps[i][~masks[i]])
            normal_ge[i] = neg.size - np.searchsorted(neg, grid, side="left")
        region_image = np.empty(count, dtype=np.int64)
        region_ge = np.empty((count, grid.size))
        flat = labels.reshape(-1)
        order = np.argsort(flat, kind="stable")
        bounds = np.searchsorted(flat[order], np.arange(1, count + 2))
        values = maps.reshape(-1)
        pixels_per_image = masks[0].size
        for r in range(count):
            members = order[bounds[r]:bounds[r + 1]]
            region_image[r] = members[0] // pixels_per_image
            inside = np.sort(values[members])
            region_ge[r] = (inside.size - np.searchsorted(inside, grid, side="left")) / inside.size
        return cls(normal_ge, (~masks).reshape(n, -1).sum(axis=1).astype(np.float64),
                   region_image, region_ge)

    def subset(self, keep: np.ndarray) -> AuproGrid | None:
        """The grid of the images ``keep`` (bool (N,)), renumbered."""
        new_index = np.cumsum(keep) - 1
        regions = keep[self.region_image]
        if not regions.any():
            return None
        return AuproGrid(self.normal_at_or_above[keep], self.normal_pixels[keep],
                         new_index[self.region_image[regions]], self.region_at_or_above[regions])

    def weighted(self, weights: np.ndarray) -> np.ndarray:
        """AUPRO (up to FPR 0.3, normalised) for each row of ``weights`` (B, N)."""
        weights = np.asarray(weights, dtype=np.float64)
        fpr = (weights @ self.normal_at_or_above) / (weights @ self.normal_pixels)[:, None]
        region_weights = weights[:, self.region_image]
        pro = (region_weights @ self.region_at_or_above) / region_weights.sum(axis=1)[:, None]
        zeros = np.zeros((weights.shape[0], 1))
        return area_to_limit(np.hstack([zeros, fpr]), np.hstack([zeros, pro]),
                             AUPRO_LIMIT) / AUPRO_LIMIT


def area_to_limit(x: np.ndarray, y: np.ndarray, limit: float) -> np.ndarray:
    """Trapezoid area of each row's polyline (x non-decreasing) over [x[0], limit], the point at
    the limit linearly interpolated (the official AUPRO rule), for (B, T) arrays."""
    x0, x1, y0, y1 = x[:, :-1], x[:, 1:], y[:, :-1], y[:, 1:]
    start = np.minimum(x0, limit)
    end = np.minimum(x1, limit)
    with np.errstate(invalid="ignore", divide="ignore"):
        t = np.where(x1 > x0, (end - x0) / (x1 - x0), 1.0)
    y_end = y0 + t * (y1 - y0)
    return np.sum((end - start) * (y0 + y_end) * 0.5, axis=1)


@dataclass
class RunStatistics:
    """Per-image statistics of one run's test set (every metric of a resample follows)."""

    keys: np.ndarray  # (N,) str
    labels: np.ndarray  # (N,) bool, True = anomalous
    in_no_overlap: np.ndarray  # (N,) bool
    scores: np.ndarray  # (N,) float64
    pixel_pairs: np.ndarray | None = None  # (N, N) twice C (see pixel_pairs)
    anomalous_pixels: np.ndarray | None = None  # (N,)
    normal_pixels: np.ndarray | None = None  # (N,)
    pro: np.ndarray | None = None  # (N,) RD4AD PRO per image, NaN where undefined
    aupro: AuproGrid | None = None
    full_resolution: bool = False  # pixel statistics from the record's own maps
    missing: list[str] = field(default_factory=list)  # what could not be bootstrapped, why

    @property
    def protocols(self) -> dict[str, np.ndarray]:
        return {"no_overlap": self.in_no_overlap, "overlap": np.ones_like(self.in_no_overlap)}


def run_statistics(arrays: Mapping[str, np.ndarray],
                    metrics: Iterable[str] = BOOTSTRAP_METRICS) -> RunStatistics | None:
    """The statistics of a ``scores.npz`` (see :mod:`bench.records`), or None without image
    scores. Pixel metrics use the full-resolution arrays when stored, else the stored maps."""
    metrics = set(metrics)
    if not {"test_keys", "test_scores", "test_labels"} <= arrays.keys():
        return None
    keys = np.asarray(arrays["test_keys"]).astype(str)
    stats = RunStatistics(
        keys=keys, labels=np.asarray(arrays["test_labels"]).astype(bool),
        in_no_overlap=np.asarray(arrays.get("in_no_overlap", np.ones(keys.size, bool)), bool),
        scores=np.asarray(arrays["test_scores"], dtype=np.float64))
    pixel = metrics & {"p_auroc", "pro_rd4ad", "aupro"}
    if not pixel:
        return stats
    if all(name in arrays for name in FULL_RES_ARRAYS):
        stats.pixel_pairs = np.asarray(arrays["test_pixel_pairs"], dtype=np.float64)
        stats.anomalous_pixels = np.asarray(arrays["test_anomalous_pixels"], dtype=np.float64)
        stats.normal_pixels = np.asarray(arrays["test_normal_pixels"], dtype=np.float64)
        stats.pro = np.asarray(arrays["test_pro_rd4ad"], dtype=np.float64)
        stats.full_resolution = True
    maps_there = {"test_maps", "test_masks"} <= arrays.keys()
    if not maps_there:
        if not stats.full_resolution:
            stats.missing.append("pixel metrics: scores.npz has no test_maps/test_masks")
        if "aupro" in metrics:
            stats.missing.append("aupro: scores.npz has no test_maps/test_masks")
        return stats
    maps = np.asarray(arrays["test_maps"]).astype(np.float32)
    masks = np.asarray(arrays["test_masks"]).astype(bool)
    if not stats.full_resolution and metrics & {"p_auroc", "pro_rd4ad"}:
        stats.pixel_pairs, stats.anomalous_pixels, stats.normal_pixels = pixel_pairs(maps, masks)
        if "pro_rd4ad" in metrics:
            stats.pro = pro_per_image(maps, masks)
    if "aupro" in metrics:
        stats.aupro = AuproGrid.of(maps, masks)
    return stats


# --------------------------------------------------------------------------------------------
# Resampling


def _seed_of(keys: np.ndarray, labels: np.ndarray, seed: int) -> int:
    digest = hashlib.sha256(f"bootstrap|{int(seed)}|".encode())
    for key, label in zip(keys, labels):
        digest.update(f"{key}\x00{int(label)}\n".encode())
    return int.from_bytes(digest.digest()[:8], "little")


def resample_indices(keys, labels, n_boot: int, seed: int = 0) -> np.ndarray:
    """(B, N) image indices of ``n_boot`` stratified resamples: each row holds as many normal
    and as many anomalous images as the set, drawn with replacement within their class.

    The draw depends on the set (sorted keys and labels) and ``seed`` only, so two runs scored
    on the same test images get the same resamples, whatever order their arrays are in.
    """
    keys = np.asarray(keys).astype(str)
    labels = np.asarray(labels).astype(bool)
    order = np.argsort(keys, kind="stable")
    rng = np.random.default_rng(_seed_of(keys[order], labels[order], seed))
    columns = []
    for cls in (False, True):
        members = order[labels[order] == cls]
        if members.size:
            columns.append(members[rng.integers(0, members.size, (n_boot, members.size))])
    return np.hstack(columns) if columns else np.zeros((n_boot, 0), dtype=np.int64)


def counts_of(indices: np.ndarray, n: int) -> np.ndarray:
    """(B, n) how often each image occurs in each resample of ``indices`` (B, m)."""
    b = indices.shape[0]
    flat = (indices + n * np.arange(b)[:, None]).reshape(-1)
    return np.bincount(flat, minlength=b * n).reshape(b, n).astype(np.float64)


# --------------------------------------------------------------------------------------------
# Weighted metrics: one value per row of a (B, N) weight matrix (a row of ones: the metric)


def weighted_image_auroc(scores: np.ndarray, labels: np.ndarray,
                         weights: np.ndarray) -> np.ndarray:
    pos, neg = labels, ~labels
    s_pos, s_neg = scores[pos][:, None], scores[neg][None, :]
    doubled = 2.0 * (s_pos > s_neg) + (s_pos == s_neg)  # integers: exact sums
    w_pos, w_neg = weights[:, pos], weights[:, neg]
    numerator = np.einsum("bi,bi->b", w_pos @ doubled, w_neg)
    return numerator / (2.0 * w_pos.sum(axis=1) * w_neg.sum(axis=1))


def weighted_pixel_auroc(doubled_pairs: np.ndarray, anomalous: np.ndarray, normal: np.ndarray,
                         weights: np.ndarray) -> np.ndarray:
    numerator = np.einsum("bi,bi->b", weights @ doubled_pairs, weights)
    with np.errstate(invalid="ignore", divide="ignore"):
        return numerator / (2.0 * (weights @ anomalous) * (weights @ normal))


def weighted_mean(values: np.ndarray, weights: np.ndarray) -> np.ndarray:
    """Weighted mean of the finite ``values`` (NaN ones left out, as RD4AD's mean does)."""
    defined = np.isfinite(values)
    w = weights[:, defined]
    with np.errstate(invalid="ignore", divide="ignore"):
        return (w @ values[defined]) / w.sum(axis=1)


def weighted_metric(stats: RunStatistics, keep: np.ndarray, metric: str,
                    weights: np.ndarray) -> np.ndarray | None:
    """``metric`` on the images ``keep`` for each row of ``weights`` (B, keep.sum()); None when
    the statistics do not allow it."""
    labels = stats.labels[keep]
    if labels.all() or not labels.any():
        return None  # one class only: undefined
    if metric == "i_auroc":
        return weighted_image_auroc(stats.scores[keep], labels, weights)
    if metric == "p_auroc" and stats.pixel_pairs is not None:
        pairs = stats.pixel_pairs[np.ix_(keep, keep)]
        if not (pairs.any() and stats.normal_pixels[keep].any()):
            return None
        return weighted_pixel_auroc(pairs, stats.anomalous_pixels[keep],
                                    stats.normal_pixels[keep], weights)
    if metric == "pro_rd4ad" and stats.pro is not None:
        values = stats.pro[keep]
        return weighted_mean(values, weights) if np.isfinite(values).any() else None
    if metric == "aupro" and stats.aupro is not None:
        grid = stats.aupro.subset(keep)
        return None if grid is None else grid.weighted(weights)
    return None


@dataclass(frozen=True)
class Replicates:
    """One metric of one run and protocol: the value on the stored arrays and its bootstrap
    replicates (``deviations`` = replicates - value)."""

    value: float
    replicates: np.ndarray  # (B,)

    @property
    def deviations(self) -> np.ndarray:
        return self.replicates - self.value


def bootstrap_run(stats: RunStatistics, metrics: Iterable[str], n_boot: int = DEFAULT_REPLICATES,
                  seed: int = 0) -> dict[tuple[str, str], Replicates]:
    """Every (protocol, metric) the statistics allow: value and ``n_boot`` replicates."""
    out: dict[tuple[str, str], Replicates] = {}
    metrics = list(metrics)
    for protocol, keep in stats.protocols.items():
        keep = np.asarray(keep, bool)
        if not keep.any():
            continue
        indices = resample_indices(stats.keys[keep], stats.labels[keep], n_boot, seed)
        weights = counts_of(indices, int(keep.sum()))
        ones = np.ones((1, int(keep.sum())))
        for metric in metrics:
            replicates = weighted_metric(stats, keep, metric, weights)
            if replicates is None:
                continue
            value = float(weighted_metric(stats, keep, metric, ones)[0])
            if math.isfinite(value):
                out[(protocol, metric)] = Replicates(value, replicates)
    return out


# --------------------------------------------------------------------------------------------
# Intervals


def interval(value: float, deviations: np.ndarray, level: float = LEVEL,
             bounds: tuple[float, float] = (0.0, 1.0)) -> Interval | None:
    """The percentile interval of ``value + deviations`` at ``level`` (clipped to ``bounds``).

    With deviations from the same arrays as ``value`` this is the plain percentile interval;
    with ``value`` from the record and deviations from the stored maps, it is that interval
    translated to the record's value.
    """
    deviations = np.asarray(deviations, dtype=np.float64)
    finite = deviations[np.isfinite(deviations)]
    if finite.size < max(10, deviations.size // 2) or not math.isfinite(value):
        return None
    alpha = (1.0 - level) / 2.0
    low, high = np.quantile(finite, [alpha, 1.0 - alpha])
    lo, hi = bounds
    return Interval(low=float(min(max(value + low, lo), hi)),
                    high=float(min(max(value + high, lo), hi)), level=level,
                    replicates=int(finite.size))


def mean_deviations(parts: Iterable[np.ndarray | None]) -> np.ndarray | None:
    """The deviations of a mean of several quantities (seeds, categories, metrics): the mean of
    their deviations, replicate by replicate; None when any part has none."""
    parts = list(parts)
    if not parts or any(p is None for p in parts):
        return None
    return np.mean(np.stack(parts), axis=0)
