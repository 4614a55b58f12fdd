"""Noisy splits: the SoftPatch rule on trees with the exact MVTec AD and VisA counts, infeasible
ratios, determinism across processes, nesting, the two test protocols, and manifests."""

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest

from datasets import (
    DataError,
    largest_feasible_ratio,
    list_categories,
    load_category,
    load_split,
    make_split,
    read_manifest,
    requested_count,
    verify_manifest,
    write_manifest,
)
from datasets.fake import write_fake_mvtec, write_fake_visa_converted, write_fake_visa_raw
from datasets.mvtec import MVTEC_COUNTS
from datasets.visa import VISA_COUNTS

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="session")
def mvtec_root(tmp_path_factory):
    return write_fake_mvtec(tmp_path_factory.mktemp("mvtec"))


@pytest.fixture(scope="session")
def visa_root(tmp_path_factory):
    return write_fake_visa_raw(tmp_path_factory.mktemp("visa_raw"))


@pytest.fixture(scope="session")
def mvtec_data(mvtec_root):
    return {c: load_category("mvtec", mvtec_root, c) for c in list_categories("mvtec", mvtec_root)}


@pytest.fixture(scope="session")
def visa_data(visa_root):
    return {c: load_category("visa", visa_root, c) for c in list_categories("visa", visa_root)}


def injected_keys(split):
    return {s.key for s, flag in zip(split.train, split.injected) if flag}


def test_fake_trees_have_the_published_counts(mvtec_data, visa_data):
    assert {c: tuple(d.counts().values()) for c, d in mvtec_data.items()} == MVTEC_COUNTS
    assert {c: tuple(d.counts().values()) for c, d in visa_data.items()} == VISA_COUNTS


@pytest.mark.parametrize("ratio", [0.05, 0.1, 0.15])
def test_injected_counts_follow_the_rule_on_mvtec(mvtec_data, ratio):
    for category, data in mvtec_data.items():
        n_train, _, _ = MVTEC_COUNTS[category]
        split = make_split(data, ratio, seed=0)
        assert split.n_injected == math.floor(ratio * n_train) == sum(split.injected)
        assert split.n_train_normal == n_train
        assert split.realized_ratio == split.n_injected / n_train
        assert not split.capped


@pytest.mark.parametrize("ratio", [0.03, 0.05, 0.07])
def test_injected_counts_follow_the_rule_on_visa(visa_data, ratio):
    for category, data in visa_data.items():
        n_train = VISA_COUNTS[category][0]
        split = make_split(data, ratio, seed=1)
        assert split.n_injected == requested_count(ratio, n_train) == len(injected_keys(split))


@pytest.mark.parametrize(
    "category,asked,available,largest",
    [("hazelnut", 78, 70, "0.18"), ("transistor", 42, 40, "0.19")],
)
def test_infeasible_mvtec_ratio_is_rejected_with_the_numbers(
    mvtec_data, category, asked, available, largest
):
    with pytest.raises(DataError) as err:
        make_split(mvtec_data[category], 0.2, seed=0)
    message = str(err.value)
    assert "\n" not in message
    assert f"mvtec/{category}" in message
    assert f"asks for {asked} " in message and f"only {available} exist" in message
    assert f"largest feasible ratio is {largest}" in message
    # The largest feasible ratio it names does work, and the next step up does not.
    assert make_split(mvtec_data[category], float(largest), 0).n_injected <= available
    with pytest.raises(DataError):
        make_split(mvtec_data[category], float(largest) + 0.01, 0)


def test_a_category_without_anomalous_images_says_so(mvtec_data):
    import dataclasses

    data = mvtec_data["bottle"]
    clean = dataclasses.replace(data, test=[s for s in data.test if s.label == 0])
    with pytest.raises(DataError, match="the test set has none to inject; use noise ratio 0"):
        make_split(clean, 0.1, seed=0)
    assert make_split(clean, 0.0, seed=0).n_injected == 0


def test_every_other_mvtec_category_is_feasible_at_02(mvtec_data):
    feasible = set()
    for category, data in mvtec_data.items():
        try:
            make_split(data, 0.2, 0)
            feasible.add(category)
        except DataError:
            pass
    assert set(MVTEC_COUNTS) - feasible == {"hazelnut", "transistor"}


def test_large_visa_category_at_02_is_rejected(visa_data):
    with pytest.raises(DataError, match=r"visa/candle: .*asks for 180 .*only 100 exist.*0\.11"):
        make_split(visa_data["candle"], 0.2, 0)


def test_cap_is_explicit_and_recorded(mvtec_data):
    split = make_split(mvtec_data["hazelnut"], 0.2, seed=3, cap=True)
    assert split.capped and split.requested == 78 and split.n_injected == 70
    assert split.realized_ratio == pytest.approx(70 / 391)
    assert split.summary()["capped"] is True
    assert len(split.test_no_overlap) == 40  # only the normal test images are left


def test_largest_feasible_ratio_is_floor_aware():
    for n_normal in (7, 60, 213, 391, 900):
        for n_anomalous in (1, 5, 30, 70, 100):
            text = largest_feasible_ratio(n_anomalous, n_normal)
            r = float(text)
            if r >= 0.99:
                continue
            step = 10 ** -len(text.split(".")[1])
            assert requested_count(r, n_normal) <= n_anomalous
            assert requested_count(round(r + step, 6), n_normal) > n_anomalous


def test_ratio_is_read_as_written():
    assert requested_count(0.29, 100) == 29  # float arithmetic alone would give 28
    assert requested_count(0.1, 391) == 39


@pytest.mark.parametrize("bad", [-0.1, 1.0, float("nan"), "x"])
def test_bad_ratio_is_a_data_error(mvtec_data, bad):
    with pytest.raises(DataError, match="noise ratio"):
        make_split(mvtec_data["bottle"], bad, 0)


def test_draws_are_nested_across_ratios(mvtec_data, visa_data):
    for data, ratios in (
        (mvtec_data["screw"], (0.0, 0.02, 0.05, 0.1, 0.15, 0.2, 0.3)),
        (visa_data["pcb1"], (0.01, 0.03, 0.05, 0.07, 0.1)),
    ):
        for seed in (0, 1):
            previous: set = set()
            for ratio in ratios:
                keys = injected_keys(make_split(data, ratio, seed))
                assert previous <= keys
                previous = keys


def test_seeds_give_different_draws_and_cover_the_anomalies(mvtec_data):
    data = mvtec_data["pill"]
    draws = [frozenset(injected_keys(make_split(data, 0.1, seed))) for seed in range(30)]
    assert len(set(draws)) == 30
    union = set().union(*draws)
    # 30 draws of 26 from 141 should touch nearly every anomaly (uniform without replacement).
    assert len(union) > 0.9 * len(data.test_anomalous)


def test_protocols_and_training_set(mvtec_data):
    data = mvtec_data["bottle"]
    split = make_split(data, 0.1, seed=7)
    injected = injected_keys(split)
    test_keys = {s.key for s in data.test}
    # Overlap keeps the test set whole; No overlap removes exactly the injected images.
    assert [s.key for s in split.test_overlap] == sorted(test_keys)
    assert {s.key for s in split.test_no_overlap} == test_keys - injected
    assert len(split.test_no_overlap) == len(data.test) - split.n_injected
    # Injected images are anomalous test images; normal training images are unchanged.
    anomalous = {s.key for s in data.test_anomalous}
    assert injected <= anomalous
    train_keys = {s.key for s in split.train}
    assert train_keys - injected == {s.key for s in data.train}
    # No test-normal image ever enters training.
    assert not train_keys & {s.key for s in data.test_normal}
    assert all(s.label == 1 for s, f in zip(split.train, split.injected) if f)
    assert all(s.label == 0 for s, f in zip(split.train, split.injected) if not f)


def test_no_test_normal_enters_training_anywhere(mvtec_data, visa_data):
    for data in [*mvtec_data.values(), *visa_data.values()]:
        split = make_split(data, 0.05, seed=2)
        assert not {s.key for s in split.train} & {s.key for s in data.test_normal}


def test_split_does_not_depend_on_listing_order(mvtec_data):
    data = mvtec_data["wood"]
    shuffled = type(data)(
        data.dataset,
        data.category,
        data.root,
        list(reversed(data.train)),
        list(reversed(data.test)),
    )
    a, b = make_split(data, 0.1, 5), make_split(shuffled, 0.1, 5)
    assert [s.key for s in a.train] == [s.key for s in b.train] and a.injected == b.injected


def test_split_is_identical_in_another_process(mvtec_root, mvtec_data):
    script = (
        "import json, sys\n"
        "from datasets import load_category, make_split\n"
        "out = {}\n"
        "for c in ('bottle', 'screw', 'toothbrush'):\n"
        "    s = make_split(load_category('mvtec', sys.argv[1], c), 0.1, 4)\n"
        "    out[c] = [[x.key, f] for x, f in zip(s.train, s.injected)]\n"
        "print(json.dumps(out))\n"
    )
    env = {"PYTHONHASHSEED": "12345", "PATH": "/usr/bin:/bin"}
    proc = subprocess.run(
        [sys.executable, "-c", script, str(mvtec_root)],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
        check=True,
    )
    other = json.loads(proc.stdout)
    for category, rows in other.items():
        here = make_split(mvtec_data[category], 0.1, 4)
        assert rows == [[x.key, f] for x, f in zip(here.train, here.injected)]


def test_visa_layouts_give_the_same_draw(tmp_path, visa_data):
    converted = write_fake_visa_converted(tmp_path / "visa", {"fryum": VISA_COUNTS["fryum"]})
    a = make_split(visa_data["fryum"], 0.05, 9)
    b = make_split(load_category("visa", converted, "fryum"), 0.05, 9)
    assert sorted(k.rsplit("/", 1)[1] for k in injected_keys(a)) == sorted(
        k.rsplit("/", 1)[1] for k in injected_keys(b)
    )


def test_manifest_round_trip_and_verification(tmp_path):
    root = write_fake_mvtec(tmp_path / "data", {"part": (20, 5, 10)}, content=True)
    data = load_category("mvtec", root, "part")
    split = make_split(data, 0.2, seed=1)
    path = tmp_path / "m" / "part.json"
    digest = write_manifest(split, path)
    assert digest == __import__("hashlib").sha256(path.read_bytes()).hexdigest()
    assert write_manifest(split, tmp_path / "again.json") == digest  # machine-independent bytes
    manifest = read_manifest(path)
    assert manifest["n_injected"] == 4 and manifest["n_train_normal"] == 20
    assert sum(e["injected"] for e in manifest["train"]) == 4
    assert len(manifest["test_overlap"]) == 15 and len(manifest["test_no_overlap"]) == 11
    assert all(len(e["sha256"]) == 64 for e in manifest["train"])
    assert all(e["mask_sha256"] for e in manifest["test_overlap"] if e["label"] == 1)
    # Files plus masks, each counted once.
    assert verify_manifest(path, root) == 20 + 15 + 10

    again = load_split(path, root)
    assert [s.key for s in again.train] == [s.key for s in split.train]
    assert again.injected == split.injected and again.n_injected == 4
    assert [s.path for s in again.test_no_overlap] == [s.path for s in split.test_no_overlap]

    changed = root / "part" / "train" / "good" / "003.png"
    changed.write_bytes(changed.read_bytes() + b"x")
    with pytest.raises(DataError) as err:
        verify_manifest(path, root)
    assert "part/train/good/003.png" in str(err.value) and "\n" not in str(err.value)
    changed.unlink()
    with pytest.raises(DataError, match="003.png is missing"):
        load_split(path, root)


def test_bad_manifest_files_are_data_errors(tmp_path):
    with pytest.raises(DataError, match="does not exist"):
        read_manifest(tmp_path / "none.json")
    (tmp_path / "bad.json").write_text("{not json")
    with pytest.raises(DataError, match="not valid JSON"):
        read_manifest(tmp_path / "bad.json")
    (tmp_path / "old.json").write_text(json.dumps({"schema_version": 99}))
    with pytest.raises(DataError, match="schema"):
        read_manifest(tmp_path / "old.json")
