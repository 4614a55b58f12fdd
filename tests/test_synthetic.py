"""The synthetic generator: layout, byte-identical output per seed, masks that match the defects
exactly, and atomic writing."""

import json

import numpy as np
import pytest
from PIL import Image

from datasets import DataError, generate_synthetic, list_categories, load_category, make_split
from datasets import synthetic as synth

SMALL = {"size": 32, "n_train": 4, "n_test_good": 2, "n_test_anomalous": 5}


def files(root):
    return {
        p.relative_to(root).as_posix(): p.read_bytes()
        for p in sorted(root.rglob("*"))
        if p.is_file()
    }


@pytest.fixture(scope="module")
def tree(tmp_path_factory):
    return generate_synthetic(tmp_path_factory.mktemp("syn") / "data", seed=3, **SMALL)


def test_layout_loads_as_the_synthetic_dataset(tree):
    assert list_categories("synthetic", tree) == sorted(synth.SYNTHETIC_CATEGORIES)
    for category in synth.SYNTHETIC_CATEGORIES:
        data = load_category("synthetic", tree, category)
        assert data.counts() == {"train": 4, "test_good": 2, "test_anomalous": 5}
        # Balanced over the category's defect types, one folder per type.
        assert sorted({s.defect for s in data.test_anomalous}) == sorted(synth.DEFECTS[category])
        for s in data.test_anomalous:
            assert s.mask_path.name == s.path.stem + "_mask.png"
    params = json.loads((tree / synth.PARAMS_FILE).read_text())
    assert params["seed"] == 3 and params["size"] == 32


def test_default_counts_make_ratio_02_feasible(tmp_path):
    root = generate_synthetic(tmp_path / "d", size=16, categories=["nut"])
    data = load_category("synthetic", root, "nut")
    assert data.counts() == {"train": 40, "test_good": 10, "test_anomalous": 25}
    assert make_split(data, 0.2, 0).n_injected == 8


def test_same_seed_gives_byte_identical_files(tree, tmp_path):
    again = generate_synthetic(tmp_path / "again", seed=3, **SMALL)
    assert files(again) == files(tree)
    other = files(generate_synthetic(tmp_path / "other", seed=4, **SMALL))
    same = files(tree)
    assert other.keys() == same.keys()
    pngs = [k for k in same if k.endswith(".png")]
    assert sum(other[k] != same[k] for k in pngs) == len(pngs)


def test_counts_do_not_change_other_images(tmp_path):
    a = files(generate_synthetic(tmp_path / "a", seed=1, categories=["brick"], **SMALL))
    more = {**SMALL, "n_train": 6}
    b = files(generate_synthetic(tmp_path / "b", seed=1, categories=["brick"], **more))
    shared = [k for k in a if k.endswith(".png")]
    assert all(a[k] == b[k] for k in shared)


@pytest.mark.parametrize("category", synth.SYNTHETIC_CATEGORIES)
def test_masks_match_defects_exactly(category):
    size = 64
    kind = "texture" if category in synth.TEXTURES else "object"
    lo, hi = synth.AREA_BOUNDS[kind]
    for i, defect in enumerate(synth.DEFECTS[category] * 2):
        clean, final, mask = synth.render_sample(
            category, synth._rng(0, category, 2, i), size, defect
        )
        changed = np.any(clean != final, axis=2)
        assert not (changed & ~mask).any(), f"{category}/{defect}: pixels changed outside the mask"
        assert lo <= mask.mean() <= hi, f"{category}/{defect}: area {mask.mean():.3f}"
        diff = np.abs(clean.astype(int) - final.astype(int)).mean(axis=2)[mask]
        # Visible: strong on average, and nearly every masked pixel really changed.
        assert diff.mean() > 30, f"{category}/{defect}: mean change {diff.mean():.1f}"
        assert (diff > 8).mean() > 0.8, f"{category}/{defect}: {(diff > 8).mean():.2f} changed"


def test_written_files_are_the_rendered_samples(tree):
    for category in ("gravel", "screw"):
        for i in range(SMALL["n_test_anomalous"]):
            defects = synth.DEFECTS[category]
            defect, j = defects[i % len(defects)], i // len(defects)
            _, final, mask = synth.render_sample(
                category, synth._rng(3, category, 2, i), 32, defect
            )
            image = np.asarray(Image.open(tree / category / "test" / defect / f"{j:03d}.png"))
            written = np.asarray(
                Image.open(tree / category / "ground_truth" / defect / f"{j:03d}_mask.png")
            )
            assert np.array_equal(image, final)
            assert set(np.unique(written)) <= {0, 255} and np.array_equal(written > 0, mask)


def test_normal_images_vary(tree):
    for category in synth.SYNTHETIC_CATEGORIES:
        a = np.asarray(Image.open(tree / category / "train" / "good" / "000.png"), dtype=int)
        b = np.asarray(Image.open(tree / category / "train" / "good" / "001.png"), dtype=int)
        assert a.shape == (32, 32, 3) and np.abs(a - b).mean() > 1


def test_interrupted_run_leaves_nothing(tmp_path, monkeypatch):
    real = synth._write_category
    calls = []

    def fail_on_second(tmp, category, *args):
        calls.append(category)
        if len(calls) == 2:
            raise KeyboardInterrupt
        real(tmp, category, *args)

    monkeypatch.setattr(synth, "_write_category", fail_on_second)
    with pytest.raises(KeyboardInterrupt):
        generate_synthetic(tmp_path / "out", **SMALL)
    assert list(tmp_path.iterdir()) == []


def test_existing_folders(tmp_path, tree):
    before = {p: p.stat().st_mtime_ns for p in tree.rglob("*.png")}
    assert generate_synthetic(tree, seed=3, **SMALL) == tree  # same parameters: kept as is
    assert {p: p.stat().st_mtime_ns for p in tree.rglob("*.png")} == before

    busy = tmp_path / "busy"
    busy.mkdir()
    (busy / "thesis.txt").write_text("keep me")
    with pytest.raises(DataError, match="is not empty.*--force"):
        generate_synthetic(busy, **SMALL)
    assert (busy / "thesis.txt").exists()
    generate_synthetic(busy, overwrite=True, categories=["nut"], **SMALL)
    assert not (busy / "thesis.txt").exists() and (busy / "nut" / "train" / "good").is_dir()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["busy"]  # no temporary folders left

    empty = tmp_path / "empty"
    empty.mkdir()
    generate_synthetic(empty, categories=["grass"], **SMALL)
    assert list_categories("synthetic", empty) == ["grass"]

    # A tree with a file missing is not reused as it is: it is written again, identically.
    victim = next((empty / "grass" / "test").rglob("*.png"))
    content = {p.relative_to(empty): p.read_bytes() for p in empty.rglob("*.png")}
    victim.unlink()
    generate_synthetic(empty, categories=["grass"], **SMALL)
    assert {p.relative_to(empty): p.read_bytes() for p in empty.rglob("*.png")} == content


@pytest.mark.parametrize(
    "kwargs,match",
    [
        ({"categories": ["bottle"]}, "unknown synthetic category 'bottle'"),
        ({"size": 8}, "size 8 must be an integer in 16..1024"),
        ({"n_test_anomalous": 0}, "n_test_anomalous 0"),
        ({"seed": -1}, "seed -1"),
    ],
)
def test_bad_parameters(tmp_path, kwargs, match):
    with pytest.raises(DataError, match=match):
        generate_synthetic(tmp_path / "x", **{**SMALL, **kwargs})
    assert not (tmp_path / "x").exists()


def test_pixels_are_pinned(tmp_path):
    """The generator's output, pixel for pixel, is part of every stored result's identity (the
    manifests hash these files): a refactor that changes one pixel must fail here. The pin is on
    decoded pixels, so another PNG encoder version cannot break it."""
    import hashlib

    root = generate_synthetic(tmp_path / "data", seed=0, size=64, n_train=3, n_test_good=1,
                              n_test_anomalous=5)
    digest = hashlib.sha256()
    for path in sorted(root.rglob("*.png")):
        digest.update(path.relative_to(root).as_posix().encode())
        digest.update(np.asarray(Image.open(path)).tobytes())
    assert digest.hexdigest() == (
        "86e1f641d0b92c815011125edf6222215d2bf3f4b5eb8fc77154d00875c1f802")
