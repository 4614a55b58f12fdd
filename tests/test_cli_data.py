"""The data commands: ``list``, ``synth`` and ``splits``, and their one-line errors (exit 2)."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

from bench.cli import main
from datasets import read_manifest, verify_manifest
from datasets.fake import write_fake_mvtec

REPO = Path(__file__).resolve().parents[1]


# A tiny synthetic tree: seed 2, 24 px, 10 train / 3 good / 5 anomalous test images.
SMALL_SYNTH = ["--seed", "2", "--size", "24", "--train", "10", "--test-good", "3",
               "--test-anomalous", "5", "--categories", "nut", "grass"]


@pytest.fixture(scope="module")
def synthetic_root(tmp_path_factory):
    root = tmp_path_factory.mktemp("cli") / "synthetic"
    args = ["synth", "--out", str(root), *SMALL_SYNTH]
    assert main(args) == 0
    return root


def error_line(capsys) -> str:
    err = capsys.readouterr().err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in err, err
    return lines[0]


def test_synth_writes_the_tree(synthetic_root, capsys):
    assert sorted(p.name for p in synthetic_root.iterdir()) == ["grass", "nut", "synthetic.json"]
    params = json.loads((synthetic_root / "synthetic.json").read_text())
    assert params["size"] == 24 and params["n_train"] == 10
    # Same parameters again: kept, and the summary names both categories.
    assert (
        main(["synth", "--out", str(synthetic_root), *SMALL_SYNTH])
        == 0
    )
    out = capsys.readouterr().out
    assert "grass" in out and "nut" in out and "test anomalous    5" in out


def test_splits_writes_manifests_and_prints_the_table(synthetic_root, tmp_path, capsys):
    out_dir = tmp_path / "splits"
    rc = main(
        [
            "splits",
            "--dataset",
            "synthetic",
            "--data-root",
            str(synthetic_root),
            "--noise-ratios",
            "0.1",
            "0.3",
            "--seeds",
            "0",
            "1",
            "--out",
            str(out_dir),
        ]
    )
    assert rc == 0
    out = capsys.readouterr().out.splitlines()
    assert out[0].split() == [
        "category",
        "ratio",
        "seed",
        "normal",
        "train",
        "injected",
        "test",
        "no-overlap",
        "test",
        "overlap",
        "realized",
    ]
    rows = [line.split() for line in out[2:-1]]
    assert len(rows) == 8  # 2 categories x 2 ratios x 2 seeds
    assert ["grass", "0.3", "1", "10", "3", "5", "8", "0.3000"] in rows
    manifests = sorted(out_dir.rglob("*.json"))
    assert [p.relative_to(out_dir).as_posix() for p in manifests][:2] == [
        "synthetic/grass/noise0.1_seed0.json",
        "synthetic/grass/noise0.1_seed1.json",
    ]
    assert len(manifests) == 8
    manifest = read_manifest(out_dir / "synthetic/nut/noise0.3_seed0.json")
    assert manifest["n_injected"] == 3
    assert verify_manifest(manifest, synthetic_root) == 10 + 8 + 5


def test_splits_verify_rechecks_shared_manifests(synthetic_root, tmp_path, capsys):
    import shutil

    out_dir = tmp_path / "splits"
    assert main(["splits", "--dataset", "synthetic", "--data-root", str(synthetic_root),
                 "--noise-ratios", "0.2", "--out", str(out_dir)]) == 0
    manifests = sorted(str(p) for p in out_dir.rglob("*.json"))
    capsys.readouterr()
    assert main(["splits", "--data-root", str(synthetic_root), "--verify", *manifests]) == 0
    out = capsys.readouterr().out
    assert "2 of 2 manifest(s) verified" in out and "split re-drawn identically" in out
    # Another lab's copy of the data with one changed file: that manifest fails, by name.
    copy = tmp_path / "copy"
    shutil.copytree(synthetic_root, copy)
    image = next((copy / "nut" / "train" / "good").iterdir())
    image.write_bytes(image.read_bytes() + b"\0")
    assert main(["splits", "--data-root", str(copy), "--verify", *manifests]) == 1
    out = capsys.readouterr().out
    assert "1 of 2 manifest(s) verified" in out
    assert f"FAILED {[m for m in manifests if '/nut/' in m][0]}" in out and "sha256" in out
    # An edited manifest (a test image dropped) fails the re-draw.
    path = Path([m for m in manifests if "/grass/" in m][0])
    manifest = json.loads(path.read_text())
    manifest["test_overlap"] = manifest["test_overlap"][1:]
    path.write_text(json.dumps(manifest))
    assert main(["splits", "--data-root", str(synthetic_root), "--verify", str(path)]) == 1
    assert "test_overlap list differs" in capsys.readouterr().out
    # Writing without --dataset etc. is one line.
    assert main(["splits", "--data-root", str(synthetic_root)]) == 2
    assert "needs --dataset, --noise-ratios, --out" in error_line(capsys)


def test_infeasible_ratio_is_one_line_and_writes_nothing(synthetic_root, tmp_path, capsys):
    out_dir = tmp_path / "splits"
    rc = main(
        [
            "splits",
            "--dataset",
            "synthetic",
            "--data-root",
            str(synthetic_root),
            "--noise-ratios",
            "0.1",
            "0.6",
            "--out",
            str(out_dir),
        ]
    )
    assert rc == 2
    line = error_line(capsys)
    assert line.startswith("error: synthetic/grass: noise ratio 0.6 asks for 6")
    assert "only 5 exist" in line and "largest feasible ratio is 0.59" in line
    assert not out_dir.exists()
    # With --cap it goes through and says so.
    assert (
        main(
            [
                "splits",
                "--dataset",
                "synthetic",
                "--data-root",
                str(synthetic_root),
                "--noise-ratios",
                "0.6",
                "--out",
                str(out_dir),
                "--cap",
            ]
        )
        == 0
    )
    assert "0.5000 (capped)" in capsys.readouterr().out


def test_splits_on_a_fake_mvtec_tree(tmp_path, capsys):
    # Real (tiny) images: splits decodes every file before it writes a manifest.
    root = write_fake_mvtec(
        tmp_path / "mvtec", {"hazelnut": (391, 40, 70), "bottle": (209, 20, 63)}, content=True
    )
    assert (
        main(
            [
                "splits",
                "--dataset",
                "mvtec",
                "--data-root",
                str(root),
                "--categories",
                "bottle",
                "--noise-ratios",
                "0.1",
                "--out",
                str(tmp_path / "s"),
            ]
        )
        == 0
    )
    row = capsys.readouterr().out.splitlines()[2].split()
    assert row[:7] == ["bottle", "0.1", "0", "209", "20", "63", "83"]
    assert (
        main(
            [
                "splits",
                "--dataset",
                "mvtec",
                "--data-root",
                str(root),
                "--noise-ratios",
                "0.2",
                "--out",
                str(tmp_path / "s"),
            ]
        )
        == 2
    )
    assert "mvtec/hazelnut" in error_line(capsys)


@pytest.mark.parametrize(
    "argv,needle",
    [
        (
            [
                "splits",
                "--dataset",
                "mvtec",
                "--data-root",
                "/no/such/dir",
                "--noise-ratios",
                "0.1",
                "--out",
                "x",
            ],
            "/no/such/dir does not exist",
        ),
        (["list", "--dataset", "mvtec"], "--dataset and --data-root together"),
        (["list", "--dataset", "synthetic", "--data-root", "/no/such/dir"], "/no/such/dir"),
    ],
)
def test_user_errors_are_one_line(argv, needle, capsys):
    assert main(argv) == 2
    assert needle in error_line(capsys)


def test_unknown_category_is_one_line(synthetic_root, tmp_path, capsys):
    assert (
        main(
            [
                "splits",
                "--dataset",
                "synthetic",
                "--data-root",
                str(synthetic_root),
                "--categories",
                "screw",
                "--noise-ratios",
                "0.1",
                "--out",
                str(tmp_path),
            ]
        )
        == 2
    )
    assert "unknown synthetic category 'screw'" in error_line(capsys)


@pytest.mark.parametrize(
    "argv",
    [
        ["splits", "--dataset", "mvtec", "--data-root", "d", "--noise-ratios", "abc", "--out", "o"],
        [
            "splits",
            "--dataset",
            "imagenet",
            "--data-root",
            "d",
            "--noise-ratios",
            "0.1",
            "--out",
            "o",
        ],
        ["synth"],
        ["synth", "--out", "o", "--size", "big"],
    ],
)
def test_bad_arguments_exit_2_with_one_line(argv, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    assert exit_info.value.code == 2
    assert "error:" in error_line(capsys)


def test_bad_input_from_the_real_entry_point(tmp_path):
    proc = subprocess.run(
        [
            sys.executable,
            str(REPO / "run_benchmark.py"),
            "synth",
            "--out",
            str(tmp_path / "o"),
            "--size",
            "4",
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == [
        "error: synthetic image size 4 must be an integer in 16..1024 (e.g. 128)"
    ]


def test_list_shows_datasets_categories_methods_and_presets(synthetic_root, capsys):
    assert main(["list", "--dataset", "synthetic", "--data-root", str(synthetic_root)]) == 0
    out = capsys.readouterr().out
    for name in ("mvtec", "visa", "synthetic"):
        assert f"\n  {name} " in out
    assert "categories of synthetic" in out and "  grass " in out and "  nut " in out
    assert "methods (config fields and defaults):" in out
    assert "method variants" in out and "sweep presets:" in out
    import methods
    from methods.base import config_fields

    # Other test modules may register their own (field-less) methods; every method is listed,
    # and every config field of each.
    for method in methods.available_methods():
        assert f"\n  {method}\n" in out
        for field in config_fields(method):
            assert f"    {field.name}: " in out


def test_sweep_preset_descriptions(tmp_path):
    from bench.commands.list import sweep_preset_lines

    (tmp_path / "demo.yaml").write_text("description: >\n  The demo\n  sweep.\nruns: []\n")
    (tmp_path / "bare.yaml").write_text("runs: []\n")
    (tmp_path / "broken.yaml").write_text("a: [\n")
    lines = sweep_preset_lines(tmp_path)
    assert lines[0].split() == ["bare"]
    assert lines[1].split()[0] == "broken" and "unreadable" in lines[1]
    assert lines[2].split() == ["demo", "The", "demo", "sweep."]
