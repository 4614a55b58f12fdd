"""Memory-bank building blocks of PatchCore and SoftPatch, as pure torch functions.

Everything here runs on the device of its input tensors, in batches, with the large pairwise
distance computations cut into chunks whose size is bounded by ``budget_mb``, so that a VisA
category (~900 images x 784 patches) fits on one GPU and a tiny test fits on two CPU cores.

- :func:`random_projection` - the Johnson-Lindenstrauss projection PatchCore uses before coreset
  selection (same law as an ``nn.Linear`` default initialisation).
- :func:`greedy_coreset` - greedy k-center selection, ``exact`` (first centre from the norms of
  the full distance matrix, computed in closed form) or ``approx`` (first-step distances from a
  few random starting points, PatchCore's ``ApproximateGreedyCoresetSampler``); an optional mask
  excludes patches from selection (SoftPatch's denoising).
- :func:`lof_scores`, :func:`nearest_scores`, :func:`gaussian_scores` - SoftPatch's patch-level
  noise discriminators. Each scores every training image's patch against the patches of all
  training images at the *same* spatial position.
- :func:`noisy_patch_mask` - the patches above the ``1 - ratio`` quantile of the noise scores.
- :func:`nearest_neighbors` - chunked k-nearest-neighbour search of query patches in a bank
  (the bank may be stored in half precision).
- :func:`gaussian_blur` - Gaussian smoothing of anomaly maps, equal to
  ``scipy.ndimage.gaussian_filter(mode="reflect", truncate=4.0)`` applied per map.
"""

from __future__ import annotations

import math
from typing import Literal

import torch
import torch.nn.functional as F

NoiseDiscriminator = Literal["lof", "nearest", "gaussian"]
DEFAULT_BUDGET_MB = 256.0


def rows_per_chunk(bytes_per_row: float, budget_mb: float) -> int:
    """How many rows of ``bytes_per_row`` fit in ``budget_mb`` (at least one)."""
    return max(1, int(budget_mb * 2**20 // max(bytes_per_row, 1.0)))


def random_projection(
    in_dim: int,
    out_dim: int,
    *,
    generator: torch.Generator | None = None,
    device: torch.device | str = "cpu",
    dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """A (in_dim, out_dim) matrix with entries U(-1/sqrt(in_dim), 1/sqrt(in_dim)).

    PatchCore projects features with a freshly initialised bias-free ``nn.Linear``; its default
    (Kaiming-uniform, a=sqrt(5)) initialisation is exactly this uniform law. The matrix is drawn
    on the CPU from ``generator`` so that the same seed gives the same projection on any device.
    """
    bound = 1.0 / math.sqrt(in_dim)
    weight = torch.rand(in_dim, out_dim, generator=generator, dtype=torch.float64)
    return ((weight * 2.0 - 1.0) * bound).to(device=device, dtype=dtype)


def _sq_dist_to(
    features: torch.Tensor, sq_norms: torch.Tensor, centres: torch.Tensor
) -> torch.Tensor:
    """Squared Euclidean distances (M, c) of every row of ``features`` to ``centres`` (c, d)."""
    dots = features @ centres.T
    return (sq_norms[:, None] - 2.0 * dots + (centres * centres).sum(1)[None, :]).clamp_(min=0)


def greedy_coreset(
    features: torch.Tensor,
    n: int,
    *,
    init: Literal["approx", "exact"] = "approx",
    num_starts: int = 10,
    candidates: torch.Tensor | None = None,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Indices (n,) of a greedy k-center coreset of ``features`` (M, d), in selection order.

    Each step picks the point farthest (Euclidean) from the points chosen so far. The distances
    before the first pick decide where it starts: ``exact`` uses the L2 norm of each point's
    row of the full distance matrix (PatchCore's exact sampler; computed here in closed form,
    without the M x M matrix), ``approx`` the mean distance to ``num_starts`` random points
    (PatchCore's approximate sampler; the starting points are not selected themselves).
    ``candidates`` (bool, (M,)) excludes the False points from selection; they can never be
    picked, including at the first step. Memory is O(M); there is no host sync in the loop.
    """
    if features.ndim != 2:
        raise ValueError(f"features must be (M, d), got {tuple(features.shape)}")
    total = features.shape[0]
    n_available = total if candidates is None else int(candidates.sum())
    if not 0 <= n <= n_available:
        raise ValueError(f"cannot select {n} of {n_available} candidate points")
    device = features.device
    sq_norms = (features * features).sum(1)
    if init == "exact":
        # sum_j |x_i - x_j|^2 = M |x_i - mu|^2 + sum_j |x_j - mu|^2 (centred: no cancellation)
        centred = features - features.mean(0, keepdim=True)
        centred_sq = (centred * centred).sum(1)
        min_sq = total * centred_sq + centred_sq.sum()  # the squared row norm
    elif init == "approx":
        n_starts = min(int(num_starts), total)
        starts = torch.randperm(total, generator=generator)[:n_starts].to(device)
        start_dist = _sq_dist_to(features, sq_norms, features.index_select(0, starts)).sqrt_()
        min_sq = start_dist.mean(1).square()
    else:
        raise ValueError(f"unknown coreset init {init!r}")
    # Greedy k-center only compares distances, so the loop runs on squared distances
    # (no square root per step); squaring the first-step distances keeps their order.
    if candidates is not None:
        # Squared distances are >= 0 (up to rounding), so -1 is never the argmax and stays
        # the minimum forever.
        min_sq = torch.where(candidates.to(device), min_sq, min_sq.new_tensor(-1.0))
    selected = torch.empty(n, dtype=torch.long, device=device)
    for step in range(n):
        pick = torch.argmax(min_sq).view(1)
        selected[step : step + 1] = pick
        centre = features.index_select(0, pick)[0]
        # |x - c|^2 = |x|^2 - 2 x.c + |c|^2, one matrix-vector product per step
        dist_sq = torch.addmv(sq_norms, features, centre, alpha=-2.0).add_(sq_norms[pick])
        torch.minimum(min_sq, dist_sq, out=min_sq)
    return selected


def _pairwise_within(x: torch.Tensor) -> torch.Tensor:
    """Euclidean distances (c, N, N) between the N points of each of c groups (c, N, d)."""
    sq = (x * x).sum(-1)
    d2 = sq[:, :, None] + sq[:, None, :] - 2.0 * (x @ x.transpose(1, 2))
    return d2.clamp_(min=0).sqrt_()


def _chunked_over_positions(fn, x: torch.Tensor, bytes_per_position: float, budget_mb: float):
    """Apply ``fn`` to slices of ``x`` (P, N, d) along P and concatenate the (p, N) results."""
    step = rows_per_chunk(bytes_per_position, budget_mb)
    return torch.cat([fn(x[i : i + step]) for i in range(0, x.shape[0], step)], dim=0)


def lof_scores(x: torch.Tensor, k: int, *, budget_mb: float = DEFAULT_BUDGET_MB) -> torch.Tensor:
    """Local Outlier Factor (P, N) of each of N points within each of P groups (P, N, d).

    The estimator of scikit-learn's ``LocalOutlierFactor(n_neighbors=k)`` (the positive LOF,
    ~1 for inliers, larger for outliers): a point is not its own neighbour, reach-dist(a, b) =
    max(k-distance(b), d(a, b)), lrd = 1 / (mean reach-dist + 1e-10), LOF = mean lrd of the
    neighbours / own lrd. ``k`` is capped at N - 1 as scikit-learn does.
    """
    n_points = x.shape[1]
    if n_points < 2:
        raise ValueError("LOF needs at least two points per group")
    k = max(1, min(int(k), n_points - 1))

    def one_chunk(chunk: torch.Tensor) -> torch.Tensor:
        dist = _pairwise_within(chunk)
        dist.diagonal(dim1=1, dim2=2).fill_(float("inf"))
        knn_dist, knn_idx = torch.topk(dist, k, dim=-1, largest=False)  # ascending
        k_distance = knn_dist[..., -1]  # (c, N)
        reach = torch.maximum(knn_dist, torch.gather(k_distance, 1, knn_idx.flatten(1)).view_as(
            knn_idx
        ))
        lrd = 1.0 / (reach.mean(-1) + 1e-10)
        neighbour_lrd = torch.gather(lrd, 1, knn_idx.flatten(1)).view_as(knn_idx)
        return neighbour_lrd.mean(-1) / lrd

    # The N x N distance matrix and its temporaries dominate: ~4 copies per position.
    bytes_per_position = 4.0 * n_points * n_points * x.element_size()
    return _chunked_over_positions(one_chunk, x, bytes_per_position, budget_mb)


def nearest_scores(x: torch.Tensor, *, budget_mb: float = DEFAULT_BUDGET_MB) -> torch.Tensor:
    """Distance (P, N) of each point to its nearest other point in its group, plus one.

    SoftPatch's ``nearest`` discriminator; the +1 keeps the soft weight of a typical patch near
    one, as in the reference code.
    """
    n_points = x.shape[1]
    if n_points < 2:
        raise ValueError("the nearest-neighbour discriminator needs at least two points per group")

    def one_chunk(chunk: torch.Tensor) -> torch.Tensor:
        dist = _pairwise_within(chunk)
        dist.diagonal(dim1=1, dim2=2).fill_(float("inf"))
        return dist.min(-1).values + 1.0

    bytes_per_position = 3.0 * n_points * n_points * x.element_size()
    return _chunked_over_positions(one_chunk, x, bytes_per_position, budget_mb)


def gaussian_scores(
    x: torch.Tensor, *, ridge: float = 0.01, budget_mb: float = DEFAULT_BUDGET_MB
) -> torch.Tensor:
    """Mahalanobis distance (P, N) of each point to its group's Gaussian, plus one.

    SoftPatch's ``gaussian`` discriminator: per group (spatial position) the mean and the
    unbiased covariance of its N points, regularised by ``ridge`` * I as in PaDiM.
    """
    n_points, dim = x.shape[1], x.shape[2]
    if n_points < 2:
        raise ValueError("the Gaussian discriminator needs at least two points per group")
    eye = torch.eye(dim, dtype=x.dtype, device=x.device)

    def one_chunk(chunk: torch.Tensor) -> torch.Tensor:
        delta = chunk - chunk.mean(1, keepdim=True)
        cov = delta.transpose(1, 2) @ delta / (n_points - 1) + ridge * eye
        precision = torch.linalg.inv(cov)
        d2 = ((delta @ precision) * delta).sum(-1)
        return d2.clamp_(min=0).sqrt_() + 1.0

    bytes_per_position = (3.0 * dim * dim + 3.0 * n_points * dim) * x.element_size()
    return _chunked_over_positions(one_chunk, x, bytes_per_position, budget_mb)


def noise_scores(
    kind: NoiseDiscriminator,
    x: torch.Tensor,
    *,
    lof_k: int = 5,
    budget_mb: float = DEFAULT_BUDGET_MB,
) -> torch.Tensor:
    """Outlier score (P, N) of every patch by the discriminator ``kind`` (see the functions)."""
    if kind == "lof":
        return lof_scores(x, lof_k, budget_mb=budget_mb)
    if kind == "nearest":
        return nearest_scores(x, budget_mb=budget_mb)
    if kind == "gaussian":
        return gaussian_scores(x, budget_mb=budget_mb)
    raise ValueError(f"unknown noise discriminator {kind!r}")


def quantile_linear(values: torch.Tensor, q: float) -> torch.Tensor:
    """The q-quantile of all ``values`` with linear interpolation (``torch.quantile``'s default).

    Sorting instead of ``torch.quantile`` removes its input-size limit.
    """
    flat = values.flatten().sort().values
    pos = q * (flat.numel() - 1)
    lo, hi = math.floor(pos), math.ceil(pos)
    return flat[lo] + (flat[hi] - flat[lo]) * (pos - lo)


def noisy_patch_mask(scores: torch.Tensor, ratio: float) -> torch.Tensor:
    """Bool mask of the patches SoftPatch removes: scores above their (1 - ratio) quantile."""
    if ratio <= 0:
        return torch.zeros_like(scores, dtype=torch.bool)
    return scores > quantile_linear(scores, 1.0 - ratio)


def nearest_neighbors(
    queries: torch.Tensor,
    bank: torch.Tensor,
    k: int = 1,
    *,
    squared: bool = True,
    bank_sq_norms: torch.Tensor | None = None,
    budget_mb: float = DEFAULT_BUDGET_MB,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Distances and indices (Q, k) of the k nearest bank rows of each query, nearest first.

    Squared Euclidean distances by default (what a FAISS ``IndexFlatL2`` returns, and so what
    PatchCore and SoftPatch score with). Queries and, for very large banks, the bank itself are
    processed in chunks so that no distance block exceeds ``budget_mb``.

    A bank stored in a lower precision than the queries (a float16 bank, float32 queries) is
    searched in the queries' precision: each bank chunk is converted on the fly, and that copy is
    held to ``budget_mb`` too, so the bank never exists in full in the higher precision.
    """
    n_bank = bank.shape[0]
    k = int(k)
    if not 1 <= k <= n_bank:
        raise ValueError(f"k={k} nearest neighbours requested from a bank of {n_bank}")
    elem = queries.element_size()
    # Two (q, b) blocks live at once (products and distances).
    bank_step = min(n_bank, rows_per_chunk(2.0 * elem, budget_mb))
    convert = bank.dtype != queries.dtype
    if convert:
        bank_step = min(bank_step, rows_per_chunk(bank.shape[1] * elem, budget_mb))
    if bank_sq_norms is None:
        bank_sq_norms = row_sq_norms(bank, queries.dtype, bank_step) if convert else (
            (bank * bank).sum(1))
    query_step = rows_per_chunk(2.0 * elem * bank_step, budget_mb)
    out_dist, out_idx = [], []
    for q0 in range(0, queries.shape[0], query_step):
        q = queries[q0 : q0 + query_step]
        q_sq = (q * q).sum(1, keepdim=True)
        best_d = best_i = None
        for b0 in range(0, n_bank, bank_step):
            b = bank[b0 : b0 + bank_step].to(queries.dtype)  # no copy when the dtypes agree
            d2 = (q_sq - 2.0 * (q @ b.T) + bank_sq_norms[None, b0 : b0 + bank_step]).clamp_(min=0)
            kk = min(k, d2.shape[1])
            d, i = torch.topk(d2, kk, dim=1, largest=False)
            i = i + b0
            if best_d is not None:
                d, order = torch.topk(torch.cat([best_d, d], 1), min(k, best_d.shape[1] + kk),
                                      dim=1, largest=False)
                i = torch.gather(torch.cat([best_i, i], 1), 1, order)
            best_d, best_i = d, i
        out_dist.append(best_d)
        out_idx.append(best_i)
    dist = torch.cat(out_dist)
    return (dist if squared else dist.sqrt()), torch.cat(out_idx)


def row_sq_norms(rows: torch.Tensor, dtype: torch.dtype, step: int) -> torch.Tensor:
    """Squared L2 norm (M,) of every row, computed in ``dtype`` ``step`` rows at a time (a float16
    matrix's norms in float32 without a float32 copy of the whole matrix)."""
    out = torch.empty(rows.shape[0], dtype=dtype, device=rows.device)
    for start in range(0, rows.shape[0], max(1, int(step))):
        chunk = rows[start : start + step].to(dtype)
        out[start : start + chunk.shape[0]] = (chunk * chunk).sum(1)
    return out


def _gaussian_kernel(sigma: float, truncate: float, device, dtype) -> torch.Tensor:
    radius = int(truncate * sigma + 0.5)  # scipy's radius rule
    x = torch.arange(-radius, radius + 1, dtype=torch.float64)
    kernel = torch.exp(-0.5 * (x / sigma) ** 2)
    return (kernel / kernel.sum()).to(device=device, dtype=dtype)


def _reflect_indices(size: int, radius: int, device) -> torch.Tensor:
    """Indices of a 'reflect' (half-sample symmetric, d c b a | a b c d | d c b a) padding."""
    idx = torch.arange(-radius, size + radius, device=device) % (2 * size)
    return torch.where(idx >= size, 2 * size - 1 - idx, idx)


def gaussian_blur(maps: torch.Tensor, sigma: float, truncate: float = 4.0) -> torch.Tensor:
    """Smooth (B, H, W) maps with a Gaussian of ``sigma`` pixels; 0 returns them unchanged.

    Same result as ``scipy.ndimage.gaussian_filter(m, sigma, mode="reflect", truncate=4.0)``
    on each map, computed on the maps' device as two 1-D convolutions.
    """
    if sigma <= 0:
        return maps
    kernel = _gaussian_kernel(sigma, truncate, maps.device, maps.dtype)
    radius = (kernel.numel() - 1) // 2
    _, height, width = maps.shape
    out = maps.index_select(2, _reflect_indices(width, radius, maps.device))
    out = F.conv2d(out[:, None], kernel.view(1, 1, 1, -1))
    out = out.index_select(2, _reflect_indices(height, radius, maps.device))
    out = F.conv2d(out, kernel.view(1, 1, -1, 1))
    return out[:, 0]
