"""bench.metrics against scikit-learn and against straightforward threshold-loop implementations.

The references below are written independently of the module: they loop over thresholds, label
regions with scikit-image (not scipy) and integrate segment by segment.
"""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch
from skimage import measure
from sklearn.metrics import auc, average_precision_score, precision_recall_curve, roc_auc_score

from bench import metrics as M
from bench.records import METRIC_NAMES

# --------------------------------------------------------------------------------------------
# Straightforward references
# --------------------------------------------------------------------------------------------


def _regions(mask: np.ndarray) -> list[np.ndarray]:
    """Pixel coordinates of each 8-connected region of one 2-D mask."""
    return [r.coords for r in measure.regionprops(measure.label(mask, connectivity=2))]


def ref_aupro(maps, masks, limit=0.3):
    """Official AUPRO: every distinct score a threshold (score >= t), clipped trapezoid."""
    regions = [(i, c) for i in range(len(masks)) for c in _regions(masks[i])]
    normal = masks == 0
    fprs, pros = [0.0], [0.0]
    for t in np.unique(maps)[::-1]:
        binary = maps >= t
        fprs.append((binary & normal).sum() / normal.sum())
        pros.append(np.mean([binary[i][c[:, 0], c[:, 1]].mean() for i, c in regions]))
    fprs.append(1.0)
    pros.append(1.0)
    area = 0.0
    for x0, x1, y0, y1 in zip(fprs[:-1], fprs[1:], pros[:-1], pros[1:]):
        if x0 >= limit or x1 == x0:
            continue
        xe = min(x1, limit)
        ye = y0 + (y1 - y0) * (xe - x0) / (x1 - x0)
        area += (xe - x0) * (y0 + ye) / 2
    return area / limit


def ref_compute_pro_one(mask, amap, num_th=200):
    """RD4AD's compute_pro for one image, as in its test.py (pandas replaced by lists)."""
    rows = []
    for th in np.arange(amap.min(), amap.max(), (amap.max() - amap.min()) / num_th):
        binary = amap > th
        pros = [binary[c[:, 0], c[:, 1]].sum() / len(c) for c in _regions(mask)]
        inverse = 1 - mask
        fpr = np.logical_and(inverse, binary).sum() / inverse.sum()
        rows.append((np.mean(pros), fpr))
    pro = np.array([r[0] for r in rows])
    fpr = np.array([r[1] for r in rows])
    keep = fpr < 0.3
    return auc(fpr[keep] / fpr[keep].max(), pro[keep])


def ref_pro_rd4ad(maps, masks):
    return float(np.mean([ref_compute_pro_one(masks[i].astype(int), maps[i])
                          for i in range(len(maps)) if masks[i].any()]))


def ref_f1max(scores, labels):
    p, r, _ = precision_recall_curve(labels, scores)
    with np.errstate(invalid="ignore", divide="ignore"):
        f1 = np.where(p + r > 0, 2 * p * r / (p + r), 0.0)
    return f1.max()


def random_case(seed, n=5, size=24, ties=False, dtype=np.float64):
    """Maps with blob-shaped anomalies, some normal images, optional heavy score ties."""
    rng = np.random.default_rng(seed)
    masks = np.zeros((n, size, size), dtype=np.uint8)
    for i in range(1, n):
        if i == 2:
            continue  # an anomaly-free image mixed in
        for _ in range(rng.integers(1, 4)):
            y, x = rng.integers(0, size - 6, 2)
            h, w = rng.integers(1, 6, 2)
            masks[i, y:y + h, x:x + w] = 1
        masks[i, rng.integers(0, size), rng.integers(0, size)] = 1  # single-pixel regions
    maps = rng.normal(size=masks.shape) + 1.2 * masks * rng.random(masks.shape)
    if ties:
        maps = np.round(maps, 1)
    return maps.astype(dtype), masks


# --------------------------------------------------------------------------------------------
# AUROC / AP / F1-max against scikit-learn
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("ties", [False, True])
@pytest.mark.parametrize("dtype", [np.float64, np.float32, np.float16])
def test_pixel_and_image_metrics_match_sklearn(ties, dtype):
    maps, masks = random_case(1, ties=ties, dtype=dtype)
    scores = maps.reshape(len(maps), -1).max(axis=1)
    labels = masks.reshape(len(masks), -1).max(axis=1)
    assert M.pixel_auroc(maps, masks) == pytest.approx(
        roc_auc_score(masks.ravel(), maps.ravel()), abs=1e-12)
    assert M.pixel_ap(maps, masks) == pytest.approx(
        average_precision_score(masks.ravel(), maps.ravel()), abs=1e-12)
    assert M.image_auroc(scores, labels) == pytest.approx(roc_auc_score(labels, scores), abs=1e-12)
    assert M.image_ap(scores, labels) == pytest.approx(
        average_precision_score(labels, scores), abs=1e-12)
    assert M.image_f1max(scores, labels) == pytest.approx(ref_f1max(scores, labels), abs=1e-12)


def test_image_metrics_with_ties_and_integers():
    rng = np.random.default_rng(3)
    for _ in range(20):
        scores = rng.integers(0, 4, size=30)  # integers: many ties
        labels = rng.integers(0, 2, size=30)
        if labels.min() == labels.max():
            continue
        assert M.image_auroc(scores, labels) == pytest.approx(roc_auc_score(labels, scores))
        assert M.image_ap(scores, labels) == pytest.approx(average_precision_score(labels, scores))
        assert M.image_f1max(scores, labels) == pytest.approx(ref_f1max(scores, labels))


def test_known_values():
    assert M.image_auroc([0.1, 0.2, 0.3, 0.4], [0, 0, 1, 1]) == 1.0
    assert M.image_auroc([0.4, 0.3, 0.2, 0.1], [0, 0, 1, 1]) == 0.0
    assert M.image_auroc([1, 1, 1, 1], [0, 1, 0, 1]) == 0.5
    # Positives at 0.9 and 0.5, a negative at 0.7: precision 1 at recall 1/2, 2/3 at recall 1.
    assert M.image_ap([0.9, 0.7, 0.5], [1, 0, 1]) == pytest.approx(0.5 + 0.5 * 2 / 3)
    assert M.image_f1max([0.9, 0.7, 0.5], [1, 0, 1]) == pytest.approx(0.8)


# --------------------------------------------------------------------------------------------
# Official AUPRO
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("seed,ties", [(0, False), (1, True), (2, False), (5, True)])
def test_aupro_matches_threshold_loop(seed, ties):
    maps, masks = random_case(seed, ties=ties)
    for limit in (0.3, 0.05, 1.0):
        assert M.aupro(maps, masks, fpr_limit=limit) == pytest.approx(
            ref_aupro(maps, masks, limit), abs=1e-10)


def test_aupro_hand_computed_one_region():
    # Region of 2 pixels scoring 0.4 and 0.9; normals 0.1, 0.5, 0.2.
    # Curve: (0,0) (0,.5) (1/3,.5) (1/3,1) ... (1,1).
    maps = np.array([[[0.1, 0.5, 0.4, 0.9, 0.2]]])
    masks = np.array([[[0, 0, 1, 1, 0]]])
    assert M.aupro(maps, masks) == pytest.approx(0.5)
    assert M.aupro(maps, masks, fpr_limit=0.5) == pytest.approx(2 / 3)


def test_aupro_averages_regions_not_pixels():
    # Region A = {0} (area 1, score .9), region B = {2,3,4} (scores .8,.1,.1); normals .5 .3 .2.
    # PRO is 2/3 over all of FPR [0, 1/3]: the mean of 1 and 1/3, not 2/4 of the pixels.
    maps = np.array([[[0.9, 0.5, 0.8, 0.1, 0.1, 0.3, 0.2]]])
    masks = np.array([[[1, 0, 1, 1, 1, 0, 0]]])
    assert M.aupro(maps, masks) == pytest.approx(2 / 3)


def test_regions_are_8_connected():
    # (0,0) touches (1,1) diagonally: one region of 3 pixels, only (0,0) above the normals.
    # 8-connectivity gives PRO 1/3; 4-connectivity would give (1 + 0) / 2.
    masks = np.zeros((1, 3, 3), dtype=np.uint8)
    masks[0, 0, 0] = masks[0, 1, 1] = masks[0, 1, 2] = 1
    maps = np.full((1, 3, 3), 0.5)
    maps[0, 0, 0] = 0.9
    maps[0, 1, 1] = maps[0, 1, 2] = 0.1
    assert M.aupro(maps, masks) == pytest.approx(1 / 3)
    # Regions never join across images: the same pixel set in two images is two regions.
    assert M.aupro(np.concatenate([maps, maps]), np.concatenate([masks, masks])) == \
        pytest.approx(1 / 3)


def test_aupro_perfect_inverted_and_constant_maps():
    _, masks = random_case(4)
    perfect = masks.astype(np.float32)
    assert M.aupro(perfect, masks) == 1.0
    assert M.aupro(1 - perfect, masks) == 0.0
    # Constant map: one threshold, FPR = PRO = 1; the line from (0,0) gives 0.3^2/2/0.3.
    assert M.aupro(np.zeros_like(perfect), masks) == pytest.approx(0.15)


def test_pro_curve_shape():
    maps, masks = random_case(0)
    fpr, pro = M.pro_curve(maps, masks)
    assert (fpr[0], pro[0], fpr[-1], pro[-1]) == (0.0, 0.0, 1.0, 1.0)
    assert np.all(np.diff(fpr) >= 0) and np.all(np.diff(pro) >= 0)


def test_normal_images_change_official_aupro_but_not_rd4ad():
    maps, masks = random_case(6)
    extra_maps = np.concatenate([maps, np.full((1, *maps.shape[1:]), maps.max())])
    extra_masks = np.concatenate([masks, np.zeros((1, *masks.shape[1:]), masks.dtype)])
    assert M.aupro(extra_maps, extra_masks) < M.aupro(maps, masks)
    assert M.aupro(extra_maps, extra_masks) == pytest.approx(ref_aupro(extra_maps, extra_masks))
    assert M.pro_rd4ad(extra_maps, extra_masks) == M.pro_rd4ad(maps, masks)


# --------------------------------------------------------------------------------------------
# RD4AD PRO
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("seed,ties,dtype", [(0, False, np.float64), (1, True, np.float64),
                                             (2, False, np.float32), (7, True, np.float32)])
def test_pro_rd4ad_matches_rd4ad_loop(seed, ties, dtype):
    maps, masks = random_case(seed, ties=ties, dtype=dtype)
    assert M.pro_rd4ad(maps, masks) == pytest.approx(ref_pro_rd4ad(maps, masks), abs=1e-10)


def test_pro_rd4ad_thresholds_hit_scores_exactly():
    # Integer scores 0..200: every RD4AD threshold equals some pixel score, so the strict
    # "score > th" of RD4AD differs from ">=" at every step.
    rng = np.random.default_rng(5)
    _, masks = random_case(8)
    maps = rng.integers(0, 201, size=masks.shape) + 40.0 * masks
    maps = np.clip(maps, 0, 200)
    maps[:, 0, 0], maps[:, 0, 1] = 0, 200
    assert M.pro_rd4ad(maps, masks) == pytest.approx(ref_pro_rd4ad(maps, masks), abs=1e-10)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_threshold_slots_equal_searchsorted(dtype):
    rng = np.random.default_rng(9)
    for lo, hi in [(0.0, 1.0), (-3.7, 12.1), (1e-6, 1e-6 + 3e-9), (0.0, 200.0)]:
        lo, hi = dtype(lo), dtype(hi)
        th = np.arange(lo, hi, (hi - lo) / 200)
        values = np.concatenate([rng.uniform(lo, hi, 5000).astype(dtype), th,
                                 np.nextafter(th, dtype(np.inf)), [lo, hi]]).astype(dtype)
        np.testing.assert_array_equal(M._count_below(th, values),
                                      np.searchsorted(th, values, side="left"))


def test_pro_rd4ad_one_image_many_regions():
    rng = np.random.default_rng(11)
    masks = np.zeros((1, 40, 40), dtype=np.uint8)
    masks[0, ::4, ::4] = 1  # 100 isolated single-pixel regions
    masks[0, 20:30, 20:30] = 1
    maps = np.round(rng.random(masks.shape) + masks * rng.random(masks.shape), 2)  # ~200 levels
    assert M.pro_rd4ad(maps, masks) == pytest.approx(ref_pro_rd4ad(maps, masks), abs=1e-10)
    assert M.aupro(maps, masks) == pytest.approx(ref_aupro(maps, masks), abs=1e-10)


def test_pro_rd4ad_documented_degenerate_cases():
    _, masks = random_case(4)
    # Perfect separation: every kept FPR is 0 (RD4AD itself returns NaN); defined as 1.0 here.
    assert M.pro_rd4ad(masks.astype(float), masks) == 1.0
    # Constant map: RD4AD's np.arange raises; defined as 0.0.
    assert M.pro_rd4ad(np.ones(masks.shape), masks) == 0.0
    # Inverted map: only thresholds with every normal pixel above are there: no FPR < 0.3 point.
    assert M.pro_rd4ad(1.0 - masks, masks) == 0.0


def test_pro_rd4ad_skips_fully_anomalous_image_with_warning():
    maps, masks = random_case(0)
    full_maps = np.concatenate([maps, np.ones((1, *maps.shape[1:]))])
    full_masks = np.concatenate([masks, np.ones((1, *masks.shape[1:]), masks.dtype)])
    with pytest.warns(M.MetricWarning, match="left out"):
        value = M.pro_rd4ad(full_maps, full_masks)
    assert value == pytest.approx(M.pro_rd4ad(maps, masks))


# --------------------------------------------------------------------------------------------
# evaluate(), input types and errors
# --------------------------------------------------------------------------------------------


def test_evaluate_keys_and_values_agree_with_single_functions():
    maps, masks = random_case(2, ties=True, dtype=np.float32)
    scores = maps.reshape(len(maps), -1).max(axis=1)
    labels = masks.reshape(len(masks), -1).max(axis=1)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        result = M.evaluate(scores, labels, maps, masks)
    assert tuple(result) == METRIC_NAMES
    assert result == {
        "i_auroc": M.image_auroc(scores, labels), "p_auroc": M.pixel_auroc(maps, masks),
        "aupro": M.aupro(maps, masks), "pro_rd4ad": M.pro_rd4ad(maps, masks),
        "i_ap": M.image_ap(scores, labels), "p_ap": M.pixel_ap(maps, masks),
        "i_f1max": M.image_f1max(scores, labels),
    }
    assert all(isinstance(v, float) for v in result.values())


def test_torch_tensors_are_accepted():
    maps, masks = random_case(3, dtype=np.float32)
    scores = maps.reshape(len(maps), -1).max(axis=1)
    labels = masks.reshape(len(masks), -1).max(axis=1)
    expected = M.evaluate(scores, labels, maps, masks)
    got = M.evaluate(torch.from_numpy(scores), torch.from_numpy(labels).bool(),
                     torch.from_numpy(maps).requires_grad_(), torch.from_numpy(masks))
    assert got == expected


def test_missing_class_gives_nan_with_warning():
    maps, masks = random_case(0)
    no_anomaly = np.zeros_like(masks)
    with pytest.warns(M.MetricWarning, match="no anomalous pixel"):
        assert np.isnan(M.pixel_auroc(maps, no_anomaly))
    with pytest.warns(M.MetricWarning, match="no anomalous pixel"):
        assert np.isnan(M.aupro(maps, no_anomaly))
    with pytest.warns(M.MetricWarning, match="no anomalous pixel"):
        assert np.isnan(M.pro_rd4ad(maps, no_anomaly))
    with pytest.warns(M.MetricWarning, match="no normal"):
        assert np.isnan(M.image_auroc([0.1, 0.2], [1, 1]))
    scores = np.zeros(len(maps))
    with pytest.warns(M.MetricWarning):
        result = M.evaluate(scores, np.zeros(len(maps)), maps, no_anomaly)
    assert all(np.isnan(v) for v in result.values())


@pytest.mark.parametrize("call,match", [
    (lambda m, g: M.aupro(m, g[:, :-1]), "does not match"),
    (lambda m, g: M.aupro(m[0], g[0]), "expected shape"),
    (lambda m, g: M.pixel_auroc(m, g * 255), "not 0 or 1"),
    (lambda m, g: M.pro_rd4ad(np.where(g == 1, np.nan, m), g), "non-finite"),
    (lambda m, g: M.pixel_ap(np.where(g == 1, np.inf, m), g), "non-finite"),
    (lambda m, g: M.aupro(m, g, fpr_limit=0.0), "fpr_limit"),
    (lambda m, g: M.aupro(m.astype(complex), g), "not real"),
    (lambda m, g: M.evaluate(np.zeros(2), np.zeros(2), m, g), "same test set"),
    (lambda m, g: M.image_auroc([0.1, 0.2, 0.3], [0, 1]), "does not match"),
])
def test_bad_input_raises_one_line_value_error(call, match):
    maps, masks = random_case(0)
    with pytest.raises(ValueError, match=match) as info:
        call(maps, masks)
    assert "\n" not in str(info.value)
