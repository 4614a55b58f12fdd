"""Loaders (MVTec layout, VisA raw and converted), every user-facing error, and the image
pipeline (geometry, mask binarisation, grayscale to RGB, cache)."""

import io
import os

import numpy as np
import pytest
import torch
from PIL import Image

from bench.errors import UserError
from datasets import (
    DataError,
    ImageCache,
    Preprocess,
    check_images,
    list_categories,
    load_category,
    load_images,
    load_masks,
)
from datasets import images as images_module
from datasets.fake import write_fake_mvtec, write_fake_visa_converted, write_fake_visa_raw


def save(path, array, fmt="PNG"):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(array).save(path, format=fmt)


def one_line(err) -> str:
    message = str(err.value)
    assert "\n" not in message and message
    return message


@pytest.fixture()
def tree(tmp_path):
    """Two categories with tiny real images; 'gray' is grayscale like MVTec's grid/screw/zipper."""
    root = tmp_path / "data"
    write_fake_mvtec(root, {"my_part": (6, 2, 4)}, content=True, size=16)
    write_fake_mvtec(root, {"gray": (3, 1, 2)}, content=True, size=16, gray=True)
    (root / "notes").mkdir()  # a folder without train/good is not a category
    return root


def test_any_category_folder_is_found(tree):
    assert list_categories("mvtec", tree) == ["gray", "my_part"]
    data = load_category("mvtec", tree, "my_part")
    assert data.counts() == {"train": 6, "test_good": 2, "test_anomalous": 4}
    assert data.dataset == "mvtec" and data.category == "my_part"
    assert [s.key for s in data.train][:2] == [
        "my_part/train/good/000.png",
        "my_part/train/good/001.png",
    ]
    assert all(s.split == "train" and s.label == 0 and s.mask_path is None for s in data.train)
    assert {s.defect for s in data.test_anomalous} == {"crack", "scratch"}


def test_masks_are_paired_by_name_not_order(tmp_path):
    root = tmp_path / "d"
    save(root / "c/train/good/000.png", np.zeros((8, 8, 3), np.uint8))
    save(root / "c/test/good/000.png", np.zeros((8, 8, 3), np.uint8))
    for name in ("003", "010", "2"):
        save(root / f"c/test/crack/{name}.png", np.zeros((8, 8, 3), np.uint8))
    # Each mask marks its own row, so a mask paired with the wrong image would show.
    rows = {"003": 3, "010": 5, "2": 1}
    for name, row in rows.items():
        mask = np.zeros((8, 8), np.uint8)
        mask[row] = 255
        save(root / f"c/ground_truth/crack/{name}_mask.png", mask)
    data = load_category("mvtec", root, "c")
    masks = load_masks(data.test, Preprocess(8, 8))
    for sample, mask in zip(data.test, masks):
        if sample.label:
            stem = sample.path.stem
            assert sample.mask_path.name == f"{stem}_mask.png"
            assert mask[rows[stem]].all() and mask.sum() == 8
        else:
            assert not mask.any()


def test_grayscale_becomes_rgb(tree):
    data = load_category("mvtec", tree, "gray")
    images = load_images(data.train, Preprocess(16, 12))
    assert images.dtype == torch.uint8 and images.shape == (3, 3, 12, 12)
    assert torch.equal(images[:, 0], images[:, 1]) and torch.equal(images[:, 1], images[:, 2])


def test_missing_root(tmp_path):
    with pytest.raises(DataError) as err:
        list_categories("mvtec", tmp_path / "nowhere")
    assert str(tmp_path / "nowhere") in one_line(err) and "--data-root" in one_line(err)
    with pytest.raises(DataError):
        load_category("visa", tmp_path / "nowhere", "candle")


def test_missing_train_good(tree):
    (tree / "broken" / "test" / "good").mkdir(parents=True)
    with pytest.raises(DataError) as err:
        load_category("mvtec", tree, "broken")
    assert str(tree / "broken" / "train" / "good") in one_line(err) and "is missing" in one_line(
        err
    )
    (tree / "broken" / "train" / "good").mkdir(parents=True)
    with pytest.raises(DataError, match="has no images"):
        load_category("mvtec", tree, "broken")


def test_root_without_categories_hints_at_a_category_folder(tree):
    with pytest.raises(DataError) as err:
        list_categories("mvtec", tree / "my_part")
    assert "single category folder" in one_line(err) and str(tree) in one_line(err)


def test_unknown_category_lists_the_found_ones(tree):
    with pytest.raises(DataError) as err:
        load_category("mvtec", tree, "bottle")
    assert "'bottle'" in one_line(err) and "found: gray, my_part" in one_line(err)


def test_unknown_dataset(tree):
    with pytest.raises(
        DataError, match="unknown dataset 'mvtc'; known datasets: mvtec, visa, synthetic"
    ):
        load_category("mvtc", tree, "gray")


def test_anomalous_image_without_mask(tree):
    mask = tree / "my_part" / "ground_truth" / "scratch" / "000_mask.png"
    mask.unlink()
    with pytest.raises(DataError) as err:
        load_category("mvtec", tree, "my_part")
    message = one_line(err)
    assert str(tree / "my_part" / "test" / "scratch" / "000.png") in message
    assert str(mask) in message


def test_mask_size_must_match_image(tree):
    mask = tree / "my_part" / "ground_truth" / "crack" / "001_mask.png"
    save(mask, np.zeros((10, 16), np.uint8))
    data = load_category("mvtec", tree, "my_part")  # names are fine; sizes are read lazily
    with pytest.raises(DataError) as err:
        load_masks(data.test, Preprocess(16, 16))
    assert str(mask) in one_line(err) and "16x10" in one_line(err) and "16x16" in one_line(err)
    with pytest.raises(DataError, match="001_mask.png is 16x10"):
        check_images(data.test)


def test_unreadable_image(tree):
    bad = tree / "my_part" / "train" / "good" / "002.png"
    bad.write_bytes(b"this is not a png")
    data = load_category("mvtec", tree, "my_part")
    with pytest.raises(DataError) as err:
        load_images(data.train, Preprocess(16, 16))
    assert str(bad) in one_line(err) and "cannot read image" in one_line(err)
    with pytest.raises(DataError, match="002.png"):
        load_images(data.train, Preprocess(16, 16), cache=ImageCache())
    with pytest.raises(DataError, match="002.png"):
        check_images(data.train)
    truncated = tree / "my_part" / "train" / "good" / "003.png"
    truncated.write_bytes(truncated.read_bytes()[:40])
    with pytest.raises(DataError, match="003.png"):
        load_images(data.train[3:4], Preprocess(16, 16))


def test_data_error_is_a_user_error():
    assert issubclass(DataError, UserError) and DataError.exit_code == 2


# ---------------------------------------------------------------------------------------------
# VisA


@pytest.fixture()
def visa_counts():
    return {"candle": (5, 2, 3), "pcb1": (4, 1, 2)}


def test_visa_raw_layout(tmp_path, visa_counts):
    root = write_fake_visa_raw(tmp_path / "visa", visa_counts, content=True, size=12)
    assert list_categories("visa", root) == ["candle", "pcb1"]
    data = load_category("visa", root, "candle")
    assert data.counts() == {"train": 5, "test_good": 2, "test_anomalous": 3}
    anomalous = data.test_anomalous
    assert anomalous[0].key == "candle/Data/Images/Anomaly/000.JPG"
    assert anomalous[0].mask_path == root / "candle/Data/Masks/Anomaly/000.png"
    assert {s.defect for s in anomalous} == {"bad"}
    # Multi-valued masks (1, 7, 255): any non-zero pixel is anomalous.
    raw = [np.asarray(Image.open(s.mask_path)) for s in anomalous]
    assert sorted({int(r.max()) for r in raw}) == [1, 7, 255]
    masks = load_masks(anomalous, Preprocess(12, 12))
    assert set(np.unique(masks)) == {0, 1}
    assert [int(m.sum()) for m in masks] == [int((r > 0).sum()) for r in raw]
    images = load_images(data.train, Preprocess(12, 8))
    assert images.shape == (5, 3, 8, 8)


def test_visa_converted_layout_is_detected(tmp_path, visa_counts):
    root = write_fake_visa_converted(tmp_path / "visa", visa_counts, content=True, size=12)
    assert list_categories("visa", root) == ["candle", "pcb1"]
    data = load_category("visa", root, "pcb1")
    assert data.counts() == {"train": 4, "test_good": 1, "test_anomalous": 2}
    # Converted masks are named like their image (no _mask suffix).
    assert data.test_anomalous[0].mask_path == root / "pcb1/ground_truth/bad/000.png"


def test_visa_raw_errors(tmp_path, visa_counts):
    root = write_fake_visa_raw(tmp_path / "visa", visa_counts)
    with pytest.raises(DataError, match="unknown visa category 'fryum'.*found: candle, pcb1"):
        load_category("visa", root, "fryum")
    (root / "candle/Data/Masks/Anomaly/001.png").unlink()
    with pytest.raises(DataError) as err:
        load_category("visa", root, "candle")
    assert "candle/Data/Images/Anomaly/001.JPG" in one_line(err) and "1cls.csv line" in one_line(
        err
    )
    (root / "pcb1/Data/Images/Normal/0000.JPG").unlink()
    with pytest.raises(DataError, match="0000.JPG, which does not exist"):
        load_category("visa", root, "pcb1")
    (root / "split_csv/1cls.csv").write_text("object,split,image\ncandle,train,x.JPG\n")
    with pytest.raises(DataError, match="lacks column.*label"):
        list_categories("visa", root)


# ---------------------------------------------------------------------------------------------
# Image pipeline


def test_preprocess_geometry():
    assert Preprocess() == Preprocess(256, 224)
    assert Preprocess.for_size(224) == Preprocess(256, 224)
    assert Preprocess.for_size(64) == Preprocess(73, 64)
    assert Preprocess.for_size(32) == Preprocess(37, 32)
    assert Preprocess(256, 224).offset == 16
    with pytest.raises(UserError, match="crop 300 is larger than resize 256"):
        Preprocess(256, 300)
    with pytest.raises(UserError, match="positive integer"):
        Preprocess(0, 0)


def test_image_and_mask_share_geometry(tmp_path):
    # A bright square and its mask, off-centre on a 100x100 image.
    image = np.zeros((100, 100, 3), np.uint8)
    mask = np.zeros((100, 100), np.uint8)
    image[20:50, 60:90] = 255
    mask[20:50, 60:90] = 255
    save(tmp_path / "c/train/good/000.png", image)
    save(tmp_path / "c/test/good/000.png", image)
    save(tmp_path / "c/test/dent/000.png", image)
    save(tmp_path / "c/ground_truth/dent/000_mask.png", mask)
    data = load_category("mvtec", tmp_path, "c")
    pre = Preprocess(80, 64)
    img = load_images(data.test_anomalous, pre)[0].numpy()
    m = load_masks(data.test_anomalous, pre)[0]
    assert m.dtype == np.uint8 and set(np.unique(m)) == {0, 1}
    bright = img[0] > 127
    # Same place: the mask and the bright square agree except along the resampled edge.
    assert (bright != m.astype(bool)).mean() < 0.03
    ys, xs = np.nonzero(m)
    # 20..50 -> 16..40 after resize, minus the 8-pixel crop margin.
    assert ys.min() in (7, 8) and ys.max() in (31, 32) and xs.min() in (39, 40)


def test_masks_are_nearest_and_binary():
    mask = Image.fromarray(np.array([[0, 3], [200, 0]], np.uint8))
    out = Preprocess(4, 4).mask(mask)
    assert out.tolist() == [[0, 0, 1, 1], [0, 0, 1, 1], [1, 1, 0, 0], [1, 1, 0, 0]]


def test_normals_get_zero_masks(tree):
    data = load_category("mvtec", tree, "my_part")
    masks = load_masks(data.test, Preprocess(16, 16))
    for sample, mask in zip(data.test, masks):
        assert bool(mask.any()) == bool(sample.label)


def test_cache_in_memory_and_on_disk(tree, tmp_path, monkeypatch):
    data = load_category("mvtec", tree, "my_part")
    pre = Preprocess(16, 12)
    plain = load_images(data.train, pre)
    cache = ImageCache(tmp_path / "cache")
    first = load_images(data.train, pre, cache=cache)
    assert torch.equal(first, plain) and cache.misses == 6 and cache.hits == 0
    assert len(list((tmp_path / "cache").glob("*.npy"))) == 6
    again = load_images(data.train, pre, cache=cache, workers=2)
    assert torch.equal(again, plain) and cache.hits == 6
    # Another geometry is another entry.
    assert load_images(data.train[:1], Preprocess(16, 8), cache=cache).shape == (1, 3, 8, 8)

    # A fresh cache on the same folder decodes nothing: keyed by file content, not path.
    def no_decode(*_a, **_k):
        raise AssertionError("decoded although cached on disk")

    monkeypatch.setattr(images_module, "_open", no_decode)
    copy = tmp_path / "elsewhere.png"
    copy.write_bytes(data.train[0].path.read_bytes())
    fresh = ImageCache(tmp_path / "cache")
    arr = fresh.get(copy, pre)
    assert np.array_equal(arr, plain[0].numpy()) and fresh.misses == 1
    with pytest.raises(ValueError):
        arr[0, 0, 0] = 1  # shared arrays are read-only


def test_changed_file_is_not_served_stale(tree, tmp_path):
    data = load_category("mvtec", tree, "my_part")
    pre = Preprocess(16, 16)
    cache = ImageCache(tmp_path / "cache")
    before = load_images(data.train[:1], pre, cache=cache)
    path = data.train[0].path
    buf = io.BytesIO()
    Image.fromarray(np.full((16, 16, 3), 9, np.uint8)).save(buf, format="PNG")
    path.write_bytes(buf.getvalue())
    os.utime(path, ns=(1, 1))  # a different mtime even on coarse file systems
    after = load_images(data.train[:1], pre, cache=cache)
    assert not torch.equal(before, after) and int(after.max()) == 9


def test_damaged_disk_entry_is_rebuilt(tree, tmp_path):
    data = load_category("mvtec", tree, "my_part")
    pre = Preprocess(16, 16)
    load_images(data.train[:1], pre, cache=ImageCache(tmp_path / "cache"))
    (entry,) = (tmp_path / "cache").glob("*.npy")
    entry.write_bytes(b"garbage")
    out = load_images(data.train[:1], pre, cache=ImageCache(tmp_path / "cache"))
    assert torch.equal(out, load_images(data.train[:1], pre))
    assert np.load(entry).shape == (3, 16, 16)


def test_empty_sample_lists():
    pre = Preprocess(8, 8)
    assert load_images([], pre).shape == (0, 3, 8, 8)
    assert load_masks([], pre).shape == (0, 8, 8)


def test_memory_cache_is_bounded(tree):
    data = load_category("mvtec", tree, "my_part")
    pre = Preprocess(16, 16)
    per_image = 3 * 16 * 16
    cache = ImageCache(max_memory_mb=2.5 * per_image / 2**20)
    load_images(data.train, pre, cache=cache)
    assert len(cache) == 2 and cache.memory_bytes == 2 * per_image
    # The most recently used entries stay.
    load_images(data.train[-1:], pre, cache=cache)
    assert cache.hits == 1
    cache.clear()
    assert len(cache) == 0 and cache.memory_bytes == 0
