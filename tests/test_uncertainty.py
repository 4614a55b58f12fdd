"""The bootstrap over test images: each vectorised replicate equals the metric recomputed on
the resampled images (a plain loop), stratification, paired draws, intervals."""

import warnings

import numpy as np
import pytest

from bench import metrics as M
from bench.uncertainty import (
    AuproGrid,
    bootstrap_run,
    counts_of,
    interval,
    mean_deviations,
    pixel_statistics,
    resample_indices,
    run_statistics,
)


def _case(seed=0, n_normal=6, n_anomalous=7, size=20, dtype=np.float16):
    """Test arrays with ties (float16 maps), several regions per image, an anomalous image whose
    mask vanished (labelled anomalous, no pixel) and one anomalous everywhere."""
    rng = np.random.default_rng(seed)
    n = n_normal + n_anomalous
    labels = np.array([0] * n_normal + [1] * n_anomalous, np.uint8)
    masks = np.zeros((n, size, size), np.uint8)
    for i in range(n_normal, n):
        for _ in range(rng.integers(1, 3)):
            y, x = rng.integers(0, size - 5, 2)
            masks[i, y:y + rng.integers(2, 5), x:x + rng.integers(2, 5)] = 1
    masks[n_normal] = 0  # a defect lost in downsampling
    masks[n - 1] = 1  # anomalous everywhere: RD4AD PRO leaves it out
    maps = (rng.random((n, size, size)) + 0.8 * masks * rng.random((n, 1, 1))).astype(dtype)
    scores = maps.reshape(n, -1).max(axis=1).astype(np.float32)
    scores[1] = scores[n_normal + 1]  # an image-level tie
    keys = np.array([f"cat/test/{'good' if lab == 0 else 'cut'}/{i:03d}.png"
                     for i, lab in enumerate(labels)])
    return {"test_keys": keys, "test_scores": scores, "test_labels": labels,
            "in_no_overlap": np.arange(n) != n - 2, "test_maps": maps, "test_masks": masks}


def _quiet(fn, *args):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", M.MetricWarning)
        return fn(*args)


def test_unit_weights_give_the_metrics_themselves():
    arrays = _case()
    stats = run_statistics(arrays)
    reps = bootstrap_run(stats, ("i_auroc", "p_auroc", "pro_rd4ad", "aupro"), n_boot=5)
    for protocol, keep in (("overlap", slice(None)), ("no_overlap", arrays["in_no_overlap"])):
        scores, labels = arrays["test_scores"][keep], arrays["test_labels"][keep]
        maps, masks = arrays["test_maps"][keep], arrays["test_masks"][keep]
        assert reps[(protocol, "i_auroc")].value == M.image_auroc(scores, labels)
        assert reps[(protocol, "p_auroc")].value == M.pixel_auroc(maps, masks)
        assert reps[(protocol, "pro_rd4ad")].value == pytest.approx(
            _quiet(M.pro_rd4ad, maps, masks), abs=1e-12)
        assert reps[(protocol, "aupro")].value == pytest.approx(M.aupro(maps, masks), abs=1e-3)


def test_every_replicate_equals_the_metric_on_the_resampled_images():
    """The plain-loop reference: draw the same resamples, duplicate the images, evaluate."""
    arrays = _case(seed=3)
    stats = run_statistics(arrays)
    n_boot = 40
    reps = bootstrap_run(stats, ("i_auroc", "p_auroc", "pro_rd4ad", "aupro"), n_boot=n_boot,
                         seed=7)
    for protocol, keep in (("overlap", np.ones(13, bool)), ("no_overlap",
                                                            arrays["in_no_overlap"])):
        sub = {k: v[keep] for k, v in arrays.items()}
        indices = resample_indices(sub["test_keys"], sub["test_labels"], n_boot, seed=7)
        for b in range(n_boot):
            idx = indices[b]
            scores, labels = sub["test_scores"][idx], sub["test_labels"][idx]
            maps, masks = sub["test_maps"][idx], sub["test_masks"][idx]
            assert reps[(protocol, "i_auroc")].replicates[b] == M.image_auroc(scores, labels)
            assert reps[(protocol, "p_auroc")].replicates[b] == M.pixel_auroc(maps, masks)
            assert reps[(protocol, "pro_rd4ad")].replicates[b] == pytest.approx(
                _quiet(M.pro_rd4ad, maps, masks), abs=1e-12)
            assert reps[(protocol, "aupro")].replicates[b] == pytest.approx(
                M.aupro(maps, masks), abs=1e-3)


def test_resamples_are_stratified_and_depend_on_the_test_set_only():
    arrays = _case()
    keys, labels = arrays["test_keys"], arrays["test_labels"].astype(bool)
    idx = resample_indices(keys, labels, 200, seed=0)
    assert idx.shape == (200, 13)
    assert (labels[idx].sum(axis=1) == labels.sum()).all()  # class sizes kept in every row
    counts = counts_of(idx, 13)
    assert (counts.sum(axis=1) == 13).all() and counts.max() > 1  # with replacement
    # Another order of the same images: the same images drawn (paired across runs).
    perm = np.random.default_rng(1).permutation(13)
    idx_perm = resample_indices(keys[perm], labels[perm], 200, seed=0)
    assert np.array_equal(keys[perm][idx_perm], keys[idx])
    assert not np.array_equal(resample_indices(keys, labels, 200, seed=1), idx)
    # Another test set (one image fewer): other draws.
    assert not np.array_equal(resample_indices(keys[1:], labels[1:], 200, seed=0)[:, :5],
                              idx[:, 1:6])


def test_two_runs_on_one_test_set_are_resampled_alike():
    a, b = _case(seed=0), _case(seed=0)
    rng = np.random.default_rng(5)
    b["test_scores"] = rng.random(13).astype(np.float32)  # another method, same images
    ra = bootstrap_run(run_statistics(a), ("i_auroc",), n_boot=300)
    rb = bootstrap_run(run_statistics(b), ("i_auroc",), n_boot=300)
    # Paired draws: the difference varies less than it would with independent draws.
    paired = np.std(ra[("overlap", "i_auroc")].replicates - rb[("overlap", "i_auroc")].replicates)
    rb_other = bootstrap_run(run_statistics(b), ("i_auroc",), n_boot=300, seed=9)
    unpaired = np.std(ra[("overlap", "i_auroc")].replicates
                      - rb_other[("overlap", "i_auroc")].replicates)
    assert paired < unpaired


def test_full_resolution_statistics_reproduce_the_record_value():
    """With the worker's full-resolution statistics stored, the stored maps (coarse) are not
    used for P-AUC and PRO: the bootstrap's value is the full-resolution metric."""
    full = _case(seed=4, size=32, dtype=np.float32)
    coarse = dict(full)
    coarse["test_maps"] = full["test_maps"][:, ::2, ::2].astype(np.float16)
    coarse["test_masks"] = full["test_masks"][:, ::2, ::2]
    with_stats = {**coarse, **pixel_statistics(full["test_maps"], full["test_masks"])}
    stats = run_statistics(with_stats)
    assert stats.full_resolution
    reps = bootstrap_run(stats, ("p_auroc", "pro_rd4ad"), n_boot=10)
    assert reps[("overlap", "p_auroc")].value == M.pixel_auroc(full["test_maps"],
                                                               full["test_masks"])
    assert reps[("overlap", "pro_rd4ad")].value == pytest.approx(
        _quiet(M.pro_rd4ad, full["test_maps"], full["test_masks"]), abs=1e-12)
    coarse_reps = bootstrap_run(run_statistics(coarse), ("p_auroc",), n_boot=10)
    assert coarse_reps[("overlap", "p_auroc")].value != reps[("overlap", "p_auroc")].value


def test_missing_arrays_leave_the_pixel_metrics_out():
    arrays = _case()
    image_only = {k: v for k, v in arrays.items() if k not in ("test_maps", "test_masks")}
    stats = run_statistics(image_only)
    reps = bootstrap_run(stats, ("i_auroc", "p_auroc", "pro_rd4ad"), n_boot=5)
    assert set(reps) == {("overlap", "i_auroc"), ("no_overlap", "i_auroc")}
    assert any("test_maps" in m for m in stats.missing)
    assert run_statistics({"test_scores": arrays["test_scores"]}) is None
    # One class only (a protocol without anomalous images): nothing to bootstrap.
    normal = {k: v[:6] for k, v in arrays.items()}
    assert bootstrap_run(run_statistics(normal), ("i_auroc",), n_boot=5) == {}


def test_the_aupro_grid_stays_close_on_larger_maps():
    rng = np.random.default_rng(2)
    masks = np.zeros((10, 48, 48), np.uint8)
    masks[5:, 10:20, 12:30] = 1
    maps = rng.random((10, 48, 48)) + masks * rng.random((10, 1, 1))
    grid = AuproGrid.of(maps, masks)
    assert grid.weighted(np.ones((1, 10)))[0] == pytest.approx(M.aupro(maps, masks), abs=1e-3)


def test_interval_is_the_translated_percentile_interval():
    dev = np.linspace(-0.1, 0.1, 1001)
    got = interval(0.5, dev)
    assert got.low == pytest.approx(0.5 - 0.095) and got.high == pytest.approx(0.5 + 0.095)
    assert got.level == 0.95 and got.replicates == 1001 and got.contains(0.5)
    clipped = interval(0.98, dev)
    assert clipped.high == 1.0 and clipped.low == pytest.approx(0.885)
    assert interval(0.5, np.full(100, np.nan)) is None
    assert interval(float("nan"), dev) is None
    assert mean_deviations([np.ones(3), np.zeros(3)]).tolist() == [0.5, 0.5, 0.5]
    assert mean_deviations([np.ones(3), None]) is None and mean_deviations([]) is None
