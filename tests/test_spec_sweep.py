"""RunSpec fingerprints and preset expansion (counts, overrides, errors)."""

from __future__ import annotations

import pickle

import pytest

from bench.cli import main
from bench.errors import UserError
from bench.spec import RunSpec
from bench.sweep import expand, list_presets, load_preset, parse_sets

BASE = dict(method="rd", config={"epochs": 5}, dataset="mvtec", data_root="/data/mvtec",
            category="bottle", noise_ratio=0.1, split_seed=0, train_seed=0, image_size=224,
            resize_size=256, teacher_weights="imagenet")


def test_fingerprint_is_stable_and_ignores_only_data_root():
    spec = RunSpec(**BASE)
    # Pinned: a change here silently orphans every stored result; bump SPEC_VERSION instead.
    assert spec.canonical_json() == (
        '{"category":"bottle","config":{"epochs":5},"dataset":"mvtec","image_size":224,'
        '"method":"rd","noise_ratio":0.1,"resize_size":256,"spec_version":1,"split_seed":0,'
        '"teacher_weights":"imagenet","train_seed":0}'
    )
    assert spec.fingerprint == RunSpec(**BASE).fingerprint
    assert spec.fingerprint == RunSpec(**{**BASE, "data_root": "/elsewhere"}).fingerprint
    assert RunSpec(**{**BASE, "noise_ratio": 0}).fingerprint == \
        RunSpec(**{**BASE, "noise_ratio": 0.0}).fingerprint
    assert pickle.loads(pickle.dumps(spec)) == spec
    assert RunSpec.from_dict(spec.to_dict()).fingerprint == spec.fingerprint


@pytest.mark.parametrize("field,value", [
    ("method", "cdd"), ("config", {"epochs": 6}), ("config", {"epochs": 5, "lr": 0.01}),
    ("dataset", "visa"), ("category", "cable"), ("noise_ratio", 0.1 + 1e-12),
    ("split_seed", 1), ("train_seed", 1), ("image_size", 128), ("resize_size", 146),
    ("teacher_weights", "random"),
])
def test_fingerprint_changes_with_every_field(field, value):
    assert RunSpec(**{**BASE, field: value}).fingerprint != RunSpec(**BASE).fingerprint


def test_every_bundled_preset_expands():
    names = set(list_presets())
    assert {"demo", "ci", "paper-mvtec", "paper-visa", "noise-mvtec", "noise-visa", "table4",
            "table5", "table6", "table-a1", "table-a2"} <= names
    counts = {}
    for name in names:
        preset = load_preset(name)
        assert preset.description
        counts[name] = len(expand(preset, check_data=False))
    # categories x ratios x seeds x methods
    assert counts["demo"] == 2 * 3 * 1 * 2
    assert counts["ci"] == 2 * 2 * 3 * 2
    # Table 1: RD, ReContrast, URD, SoftPatch, InReaCh, FUN-AD, CDD; Table 2 has no
    # ReContrast or URD column.
    assert counts["paper-mvtec"] == 15 * 1 * 1 * 7
    assert counts["paper-visa"] == 12 * 5
    assert counts["noise-mvtec"] == 15 * 8 * 2
    assert counts["noise-visa"] == 12 * 5 * 2
    assert counts["table4"] == 15 * 6 and counts["table5"] == 15 * 5
    assert counts["table6"] == 15 * 3 and counts["table-a1"] == 15 * 5
    assert counts["table-a2"] == 15 * 4


def test_overrides_are_type_checked_and_canonical():
    preset = load_preset("paper-mvtec")
    from_cli = expand(preset, categories=["bottle"], methods=["rd"], sets=["epochs=7"],
                      check_data=False)
    from_yaml = expand(preset, categories=["bottle"], methods=["rd"], sets=["rd.epochs=7.0"],
                       check_data=False)
    assert from_cli[0].config["epochs"] == 7 and isinstance(from_cli[0].config["epochs"], int)
    assert from_cli[0].fingerprint == from_yaml[0].fingerprint
    with pytest.raises(UserError, match="no method of this sweep .* has a config field 'epoch'"):
        expand(preset, categories=["bottle"], sets=["epoch=3"], check_data=False)
    with pytest.raises(UserError, match="expected an integer"):
        expand(preset, categories=["bottle"], sets=["epochs=many"], check_data=False)
    # epochs exists in the trained methods but not in softpatch or inreach: a sweep-wide --set
    # reaches those that have it, and a SoftPatch field reaches SoftPatch alone.
    both = expand(preset, categories=["bottle"], sets=["epochs=3", "lof_k=6"], check_data=False)
    assert {s.method: (s.config.get("epochs"), s.config.get("lof_k")) for s in both} == {
        "rd": (3, None), "recontrast-cdd": (3, None), "urd-cdd": (3, None),
        "softpatch": (None, 6), "inreach": (None, None), "funad": (3, None), "cdd": (3, None)}
    with pytest.raises(UserError, match="rd.lof_k: method 'rd'"):
        expand(preset, categories=["bottle"], sets=["rd.lof_k=6"], check_data=False)
    cdd_only = expand(preset, categories=["bottle"], sets=["cdd.epochs=3"], check_data=False)
    assert {s.method: s.config["epochs"] for s in cdd_only if "epochs" in s.config} == \
        {"rd": 200, "recontrast-cdd": None, "urd-cdd": None, "cdd": 3}
    with pytest.raises(UserError, match="not in this sweep"):
        expand(preset, categories=["bottle"], sets=["patchcore.sigma=2"], check_data=False)
    assert parse_sets(["a=1", "rd.b=x"]) == {None: {"a": "1"}, "rd": {"b": "x"}}


def test_method_preset_rows_keep_their_overrides():
    specs = expand(load_preset("table4"), categories=["bottle"], check_data=False)
    rows = {s.method: s.config for s in specs}
    assert rows["cdd-t4-rd"]["domain_construction"] is False
    assert rows["cdd-t4-full"]["k_schedule"] == [2]
    assert all(c["epochs"] == 200 and c["backbone"] == "wide_resnet50_2" for c in rows.values())


def test_seed_pairs_and_order(tmp_path):
    path = tmp_path / "mine.yaml"
    path.write_text(
        "description: x\ndataset: mvtec\ncategories: [a, b]\nmethods: [rd]\n"
        "noise_ratios: [0.1, 0.05]\nseeds: [0, 1]\nsplit_seeds: [7]\nimage_size: 32\n"
        "resize_size: 37\nteacher_weights: random\nconfig: {backbone: resnet18}\n"
    )
    specs = expand(load_preset(str(path)), check_data=False)
    assert [(s.category, s.noise_ratio, s.split_seed, s.train_seed) for s in specs] == [
        ("a", 0.1, 7, 0), ("a", 0.1, 7, 1), ("a", 0.05, 7, 0), ("a", 0.05, 7, 1),
        ("b", 0.1, 7, 0), ("b", 0.1, 7, 1), ("b", 0.05, 7, 0), ("b", 0.05, 7, 1),
    ]


def test_bad_presets_and_names_are_one_line_errors(tmp_path, capsys):
    with pytest.raises(UserError, match="unknown preset 'nope'"):
        load_preset("nope")
    bad = tmp_path / "bad.yaml"
    bad.write_text("description: x\ndataset: mvtec\ncategorys: [a]\n")
    with pytest.raises(UserError, match="unknown key"):
        load_preset(str(bad))
    with pytest.raises(UserError, match="unknown method 'nope'"):
        expand(load_preset("demo"), methods=["nope"], check_data=False)
    with pytest.raises(UserError, match="match no field"):
        typo = tmp_path / "typo.yaml"
        typo.write_text("description: x\ndataset: mvtec\ncategories: [a]\nmethods: [rd]\n"
                        "noise_ratios: [0.1]\nseeds: [0]\nimage_size: 32\nresize_size: 37\n"
                        "teacher_weights: random\nconfig: {backbnoe: resnet18}\n")
        expand(load_preset(str(typo)), check_data=False)

    assert main(["run", "--preset", "nope"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "unknown preset" in err[0]


def test_unknown_category_against_the_data(tmp_path, capsys):
    from datasets import generate_synthetic

    root = generate_synthetic(tmp_path / "syn", seed=0, size=32, n_train=4, n_test_good=2,
                              n_test_anomalous=3, categories=["brick"])
    specs = expand(load_preset("demo"), data_root=root, categories=["brick"])
    assert {s.category for s in specs} == {"brick"} and specs[0].data_root == str(root.resolve())
    assert main(["run", "--preset", "demo", "--data-root", str(root), "--categories", "wood",
                 "--dry-run"]) == 2
    assert "unknown category 'wood'" in capsys.readouterr().err
    assert main(["run", "--preset", "demo", "--data-root", str(root), "--categories", "brick",
                 "--dry-run"]) == 0
    assert "6 runs, 0 done, 6 to run" in capsys.readouterr().out


def test_unavailable_teacher_weights_stop_the_sweep_before_any_run(tmp_path, capsys, monkeypatch):
    import urllib.error

    import torch

    from datasets import generate_synthetic

    root = generate_synthetic(tmp_path / "syn", seed=0, size=32, n_train=4, n_test_good=2,
                              n_test_anomalous=3, categories=["brick"])
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))

    def offline(*args, **kwargs):
        raise urllib.error.URLError("network is unreachable")

    monkeypatch.setattr(torch.hub, "download_url_to_file", offline)
    results = tmp_path / "res"
    assert main(["run", "--preset", "demo", "--data-root", str(root), "--categories", "brick",
                 "--teacher-weights", "imagenet", "--results", str(results), "--no-tracking",
                 "--no-report"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "cannot get ImageNet weights for resnet18" in err[0]
    assert "resnet18-f37072fd.pth" in err[0]  # where to put the file, uncut
    assert not (results / "runs").exists()


def test_image_size_from_the_command_line(tmp_path, capsys):
    from datasets import generate_synthetic

    root = generate_synthetic(tmp_path / "syn", seed=0, size=32, n_train=4, n_test_good=2,
                              n_test_anomalous=3, categories=["brick"])
    base = ["run", "--preset", "ci", "--data-root", str(root), "--categories", "brick",
            "--seeds", "0", "--noise-ratios", "0", "--methods", "rd", "--dry-run",
            "--results", str(tmp_path / "res")]
    assert main([*base, "--image-size", "128"]) == 0
    out = capsys.readouterr().out
    assert "1 runs, 0 done, 1 to run" in out
    # The run listed is the one at 128 px (resize 146), by its fingerprint.
    import dataclasses

    spec = expand(load_preset("ci"), data_root=root, categories=["brick"], seeds=[0],
                  noise_ratios=[0.0], methods=["rd"])[0]
    sized_spec = dataclasses.replace(spec, image_size=128, resize_size=146)
    assert sized_spec.fingerprint[:12] in out and spec.fingerprint[:12] not in out
    from bench.commands.run import with_image_size

    preset = load_preset("ci")
    sized = with_image_size(preset, 128, None)
    assert (sized.image_size, sized.resize_size) == (128, 146)  # 256/224 of the crop
    assert with_image_size(preset, 96, 110).resize_size == 110
    assert with_image_size(preset, None, None) is preset
    assert main([*base, "--image-size", "128", "--resize-size", "100"]) == 2
    assert "no larger than the resize" in capsys.readouterr().err


def test_one_name_per_random_teacher():
    from bench.spec import same_teacher_name

    assert same_teacher_name("random") == same_teacher_name("random:0") == "random:0"
    assert same_teacher_name("random:007") == "random:7"
    assert same_teacher_name("imagenet") == "imagenet"
    assert same_teacher_name("random:x") == "random:x"  # not a seed: left for the loader to refuse
    assert same_teacher_name("/w/random:3.pth") == "/w/random:3.pth"



def test_a_method_entry_may_bring_its_own_geometry(tmp_path):
    from bench.commands.run import with_image_size

    path = tmp_path / "own.yaml"
    path.write_text(
        "description: x\ndataset: mvtec\ncategories: [a]\nnoise_ratios: [0.1]\nseeds: [0]\n"
        "methods: [rd, {name: cdd, image_size: 256, resize_size: 256}]\nimage_size: 224\n"
        "resize_size: 256\nteacher_weights: random\n"
    )
    preset = load_preset(str(path))
    sizes = {s.method: (s.image_size, s.resize_size) for s in expand(preset, check_data=False)}
    assert sizes == {"rd": (224, 256), "cdd": (256, 256)}
    # --image-size is every method's, the entry's own included.
    sized = expand(with_image_size(preset, 64, None), check_data=False)
    assert {(s.image_size, s.resize_size) for s in sized} == {(64, 73)}
    path.write_text(path.read_text().replace("image_size: 256,", "image_size: big,"))
    with pytest.raises(UserError, match="cdd.image_size"):
        load_preset(str(path))
