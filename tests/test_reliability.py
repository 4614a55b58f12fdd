"""Bad input and faults: one clear line and exit 2 before anything is written, nothing wrongly
accepted, no traceback, nothing lost.

Each test names the class of problem it guards. Tracking faults (a dead MLflow server, a sweep
killed while logging) are in ``test_tracking.py``.
"""

from __future__ import annotations

import dataclasses
import io
import json
import os
import shutil
import signal
import subprocess
import sys
import textwrap
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from test_runner import MeanDiff, make_spec, synthetic_root  # noqa: F401  (fixture, methods)

from bench.cli import main
from bench.driver import (
    SweepSettings,
    check_data,
    execute_sweep,
    partition,
    results_lock,
    run_sweep,
    write_result,
)
from bench.errors import UserError
from bench.records import (
    FILES_KEY,
    RECORD_FILE,
    SCORES_FILE,
    load_record,
    run_dir,
    write_json_atomic,
)
from bench.worker import JobOptions, run_one
from datasets import DataError, DecodeVerdicts, Preprocess, load_category, read_manifest
from datasets.images import load_images
from methods.base import get_method_class, make_config, register_method

REPO = Path(__file__).resolve().parents[1]


@dataclass(frozen=True)
class ExitConfig:
    code: int = 3


class ExitInFit(MeanDiff):
    """Calls sys.exit in fit, as a careless method (or a library it uses) might."""

    name = "test-exit-in-fit"
    Config = ExitConfig

    def fit(self, train, observer=None):
        sys.exit(self.config.code)


class NaNScores(MeanDiff):
    """Predicts NaN scores: metrics of them would only look computed."""

    name = "test-nan-scores"

    def predict(self, images, batch_size=32):
        prediction = super().predict(images, batch_size)
        return type(prediction)(np.full_like(prediction.scores, np.nan), prediction.maps)


class Multiple16(MeanDiff):
    """Runs only on crops that are multiples of 16, and says so before a sweep starts."""

    name = "test-multiple-16"

    @classmethod
    def geometry_check(cls, config, image_size, resize_size):
        if image_size % 16:
            raise UserError(f"test-multiple-16: crop {image_size} is not a multiple of 16")


for _cls in (ExitInFit, NaNScores, Multiple16):
    try:
        get_method_class(_cls.name)
    except UserError:
        register_method(_cls)


def error_line(capsys) -> str:
    err = capsys.readouterr().err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in err, err
    return lines[0]


@pytest.fixture
def data(synthetic_root, tmp_path):  # noqa: F811
    """A private copy of the tiny synthetic tree, to damage."""
    return Path(shutil.copytree(synthetic_root, tmp_path / "data"))


def settings(results: Path, **changes) -> SweepSettings:
    base = SweepSettings(name="rel", preset="rel", results=results, tracking=False,
                         report=False, device="cpu")
    return dataclasses.replace(base, **changes)


def written(folder: Path) -> list[str]:
    return sorted(p.relative_to(folder).as_posix() for p in folder.rglob("*")) \
        if folder.exists() else []


# --------------------------------------------------------------------------------------------
# Accepted wrongly


def test_16_bit_images_are_scaled_and_32_bit_ones_refused(tmp_path):
    """A 16-bit PNG is read at its depth, not clipped at 255; float pixels are refused."""
    values = (np.arange(64 * 64).reshape(64, 64) * 16).astype(np.uint16)
    path = tmp_path / "deep.png"
    Image.fromarray(values).save(path)
    assert Image.open(path).mode == "I;16"
    from datasets.samples import Sample

    sample = Sample(path, 0, "good", None, "train", "deep.png")
    image = load_images([sample], Preprocess(resize=64, crop=64))[0].numpy()
    expected = (values.astype(np.int64) * 255 + 32767) // 65535
    assert np.array_equal(image[0], expected) and np.array_equal(image[2], expected)
    assert (image == 255).mean() < 0.01  # clipping made 99.6 % of these pixels 255

    floats = tmp_path / "float.tiff"
    Image.fromarray(np.ones((8, 8), np.float32)).save(floats)
    with pytest.raises(DataError, match=r"float\.tiff has floating-point pixels"):
        load_images([Sample(floats, 0, "good", None, "train", "f")], Preprocess(8, 8))


def test_an_opaque_rgba_mask_is_not_all_anomalous(tmp_path):
    mask = np.zeros((8, 8, 4), np.uint8)
    mask[..., 3] = 255
    mask[2:4, 2:4, :3] = 255
    result = Preprocess(resize=8, crop=8).mask(Image.fromarray(mask, "RGBA"))
    assert result.sum() == 4


def _truncate(path: Path) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


def test_a_truncated_image_stops_splits_and_run_before_anything(data, tmp_path, capsys,
                                                                monkeypatch):
    victim = sorted((data / "brick" / "train" / "good").iterdir())[3]
    _truncate(victim)
    out = tmp_path / "splits"
    assert main(["splits", "--dataset", "synthetic", "--data-root", str(data), "--categories",
                 "brick", "--noise-ratios", "0.1", "--out", str(out)]) == 2
    line = error_line(capsys)
    assert str(victim) in line and "truncated" in line and not out.exists()

    fits = []
    monkeypatch.setattr(MeanDiff, "fit", lambda self, train, observer=None: fits.append(1))
    results = tmp_path / "results"
    with pytest.raises(DataError, match=victim.name):
        execute_sweep([make_spec(data)], settings(results))
    assert fits == [] and not results.exists()


def _without_normal_test_images(root: Path, category: str) -> None:
    shutil.rmtree(root / category / "test" / "good")


def test_metrics_that_cannot_be_computed_are_said_in_record_and_report(data, tmp_path):
    from bench.report import render_report

    _without_normal_test_images(data, "brick")
    results = tmp_path / "results"
    specs = [make_spec(data, seed=s) for s in (0, 1)]
    summary = run_sweep(specs, results, options=JobOptions(device="cpu"), progress=False)
    assert summary.exit_code == 0
    record = load_record(run_dir(results, specs[0].fingerprint) / RECORD_FILE)
    undefined = record["undefined_metrics"]
    assert set(undefined) == {"no_overlap", "overlap"}  # train has both classes at ratio 0.2
    assert "no normal image" in undefined["no_overlap"]["reason"]
    assert set(undefined["no_overlap"]["metrics"]) == set(record["metrics"]["no_overlap"])
    index = Path(render_report(results, figures=False)).read_text()
    section = index.split("## Metrics that could not be computed")[1].split("## ")[0]
    lines = [line for line in section.splitlines() if line.startswith("- ")]
    # Once per cell and protocol, not once per seed.
    assert len(lines) == 2 and all("brick" in line and "no normal image" in line
                                   for line in lines)


def _preset(tmp_path: Path, body: str, name: str = "p.yaml") -> Path:
    path = tmp_path / name
    path.write_text(textwrap.dedent(body), encoding="utf-8")
    return path


PRESET = """\
    description: reliability test sweep
    dataset: synthetic
    categories: [brick]
    methods: [test-mean-diff]
    noise_ratios: [0.2]
    seeds: [0]
    image_size: 32
    resize_size: 32
    teacher_weights: random
"""


def test_a_preset_key_given_twice_is_refused(tmp_path):
    from bench.sweep import load_preset

    path = _preset(tmp_path, PRESET + "    noise_ratios: [0.1]\n")
    with pytest.raises(UserError, match="'noise_ratios' is given twice"):
        load_preset(str(path))


def test_a_method_listed_twice_with_two_configs_runs_both(tmp_path):
    from bench.sweep import expand, load_preset

    body = PRESET.replace("methods: [test-mean-diff]", textwrap.dedent("""\
        methods:
          - {name: test-mean-diff, config: {epochs: 1}}
          - {name: test-mean-diff, config: {epochs: 3}}
          - {name: test-mean-diff, config: {epochs: 3}}""").replace("\n", "\n    "))
    preset = load_preset(str(_preset(tmp_path, body)))
    specs = expand(preset, check_data=False)
    assert [dict(s.config) for s in specs] == [{"epochs": 1}, {"epochs": 3}]
    picked = expand(preset, methods=["test-mean-diff"], check_data=False)
    assert [dict(s.config) for s in picked] == [{"epochs": 1}, {"epochs": 3}]


def _manifest(synthetic_root, tmp_path, capsys) -> Path:  # noqa: F811
    out = tmp_path / "splits"
    assert main(["splits", "--dataset", "synthetic", "--data-root", str(synthetic_root),
                 "--categories", "brick", "--noise-ratios", "0.2", "--out", str(out)]) == 0
    capsys.readouterr()
    return next(out.rglob("*.json"))


@pytest.mark.parametrize("edit", ["dotdot", "absolute", "category", "mask"])
def test_manifest_paths_never_leave_the_data_root(edit, synthetic_root, tmp_path, capsys):  # noqa: F811
    path = _manifest(synthetic_root, tmp_path, capsys)
    manifest = json.loads(path.read_text())
    outside = tmp_path / "outside.png"
    outside.write_bytes(b"secret")
    entry = manifest["train"][0]
    if edit == "dotdot":
        entry["key"] = "brick/../../outside.png"
    elif edit == "absolute":
        entry["key"] = str(outside)
    elif edit == "category":
        manifest["category"] = "../brick"
    else:
        anomalous = next(e for e in manifest["test_overlap"] if e["mask"])
        anomalous["mask"] = "../outside.png"
    path.write_text(json.dumps(manifest))
    assert main(["splits", "--data-root", str(synthetic_root), "--verify", str(path)]) == 1
    out = capsys.readouterr().out
    assert "FAILED" in out and ("refused" in out or "folder name" in out)
    import hashlib

    assert hashlib.sha256(b"secret").hexdigest()[:12] not in out


@pytest.mark.parametrize("mutate,needle", [
    (lambda m: m["train"][0].pop("key"), "train[0].key"),
    (lambda m: m["train"][0].update(key=7), "train[0].key"),
    (lambda m: m["test_overlap"][0].update(label="bad"), "test_overlap[0].label"),
    (lambda m: m.update(train={"a": 1}), "train is"),
    (lambda m: m["train"].append("x"), "train[12]"),
    (lambda m: m.update(noise_ratio="0.2"), "noise_ratio"),
    (lambda m: m.update(seed=None), "seed"),
    (lambda m: m["train"][0].update(injected="yes"), "injected"),
])
def test_a_malformed_manifest_entry_is_one_line(mutate, needle, synthetic_root, tmp_path,  # noqa: F811
                                                capsys):
    path = _manifest(synthetic_root, tmp_path, capsys)
    manifest = json.loads(path.read_text())
    mutate(manifest)
    path.write_text(json.dumps(manifest))
    with pytest.raises(DataError, match=needle.replace("[", r"\[").replace("]", r"\]")):
        read_manifest(path)
    assert main(["splits", "--data-root", str(synthetic_root), "--verify", str(path)]) == 1
    out = capsys.readouterr()
    assert "Traceback" not in out.err and needle in out.out


# --------------------------------------------------------------------------------------------
# Tracebacks and unclear lines


@pytest.mark.parametrize("value", ["nan", "inf", "-inf", "NaN", "1e999"])
def test_non_finite_config_values_are_refused(value):
    with pytest.raises(UserError, match=f"rd.lr={value} must be a finite number"):
        make_config("rd", {"lr": value})
    with pytest.raises(UserError, match="expected an integer"):
        make_config("rd", {"epochs": value})


def test_bad_set_and_non_utf8_preset_are_one_line(synthetic_root, tmp_path, capsys):  # noqa: F811
    preset = _preset(tmp_path, PRESET)
    assert main(["run", "--preset", str(preset), "--plugin", "test_runner", "--data-root",
                 str(synthetic_root), "--set", "epochs=nan", "--dry-run"]) == 2
    assert "epochs" in error_line(capsys)
    latin = tmp_path / "latin.yaml"
    latin.write_bytes(PRESET.replace("reliability", "fiabilit\xe9").encode("latin-1"))
    assert main(["run", "--preset", str(latin), "--dry-run"]) == 2
    assert "not UTF-8" in error_line(capsys)


def test_a_truncated_scores_file_does_not_break_the_report(synthetic_root, tmp_path, capsys):  # noqa: F811
    results = tmp_path / "results"
    spec = make_spec(synthetic_root)
    write_result(results, run_one(spec, JobOptions(device="cpu")))
    _truncate(run_dir(results, spec.fingerprint) / SCORES_FILE)
    assert main(["report", "--results", str(results)]) == 0
    index = (results / "report" / "report.md").read_text()
    assert "no scores.npz" in index


def test_a_plugin_that_raises_on_import_is_named_and_debug_shows_why(tmp_path, capsys,
                                                                      monkeypatch):
    (tmp_path / "broken_plugin.py").write_text("raise ValueError('configured wrongly')\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    argv = ["report", "--results", str(tmp_path), "--plugin", "broken_plugin"]
    assert main(argv) == 2
    line = error_line(capsys)
    assert "'broken_plugin'" in line and "ValueError: configured wrongly" in line
    sys.modules.pop("broken_plugin", None)
    assert main(["--debug", *argv]) == 2
    err = capsys.readouterr().err
    assert "Traceback" in err and "broken_plugin.py" in err and err.startswith("error: ")
    sys.modules.pop("broken_plugin", None)
    assert main([*argv, "--debug"]) == 2 and "Traceback" in capsys.readouterr().err
    assert main(["report", "--results", str(tmp_path), "--plugin", "no_such_plugin_x"]) == 2
    assert "no module named 'no_such_plugin_x'" in error_line(capsys)


def _wrong_mask_size(root: Path) -> Path:
    mask = sorted((root / "brick" / "ground_truth").rglob("*.png"))[0]
    Image.new("L", (7, 5)).save(mask)
    return mask


def _unreadable_image(root: Path) -> Path:
    image = sorted((root / "brick" / "test").rglob("*.png"))[-1]
    image.write_bytes(b"not a png")
    return image


def _nothing_to_inject(root: Path) -> Path:
    for folder in sorted((root / "brick" / "test").iterdir()):
        if folder.name != "good":
            shutil.rmtree(folder)
    shutil.rmtree(root / "brick" / "ground_truth")
    return root / "brick" / "test"


@pytest.mark.parametrize("damage,needle", [
    (_wrong_mask_size, "is 7x5 but its image"),
    (_unreadable_image, "cannot read image"),
    (_nothing_to_inject, "none to inject"),
])
def test_data_errors_stop_the_sweep_before_anything_is_written(damage, needle, data, tmp_path):
    damage(data)
    results = tmp_path / "results"
    with pytest.raises(DataError, match=needle):
        execute_sweep([make_spec(data, category="nut"), make_spec(data)], settings(results))
    assert not results.exists()
    # An existing results folder is left as it was, plan and tracker included.
    results.mkdir()
    (results / "keep.txt").write_text("x")
    with pytest.raises(DataError):
        execute_sweep([make_spec(data)], settings(results))
    assert written(results) == ["keep.txt"]


def test_a_missing_synthetic_data_root_is_refused_not_written(tmp_path, capsys):
    preset = _preset(tmp_path, PRESET)
    typo = tmp_path / "dta"
    assert main(["run", "--preset", str(preset), "--plugin", "test_runner", "--data-root",
                 str(typo), "--results", str(tmp_path / "r"), "--no-tracking"]) == 2
    assert "does not exist" in error_line(capsys) and not typo.exists()


def test_a_bad_geometry_stops_the_sweep_before_anything_is_written(data, tmp_path):
    results = tmp_path / "results"
    spec = dataclasses.replace(make_spec(data), image_size=0)
    with pytest.raises(UserError, match="crop 0"):
        execute_sweep([spec], settings(results))
    assert not results.exists()


def test_a_method_that_cannot_run_at_the_geometry_stops_the_sweep_first(data, tmp_path):
    results = tmp_path / "results"
    spec = dataclasses.replace(make_spec(data, method="test-multiple-16"), image_size=24,
                               resize_size=32)
    with pytest.raises(UserError, match="crop 24 is not a multiple of 16"):
        execute_sweep([spec], settings(results))
    assert not results.exists()


def test_processes_start_no_more_workers_than_runs(synthetic_root, monkeypatch):  # noqa: F811
    from bench.executors import ProcessExecutor

    pools = []
    monkeypatch.setattr(ProcessExecutor, "_drain", lambda self, queue, options, workers, *a:
                        (pools.append(workers), queue.clear(), iter(()))[2])
    executor = ProcessExecutor(8, "cpu")
    assert list(executor.run([make_spec(synthetic_root)], JobOptions(device="cpu"))) == []
    assert pools == [1] and executor._threads() == max(1, os.cpu_count() or 1)


def test_the_infeasible_ratio_line_is_whole_and_names_run_options(data, tmp_path, capsys):
    preset = _preset(tmp_path, PRESET.replace("[0.2]", "[0.9]"))
    assert main(["run", "--preset", str(preset), "--plugin", "test_runner", "--data-root",
                 str(data), "--results", str(tmp_path / "r"), "--no-tracking"]) == 2
    line = error_line(capsys)
    assert "largest feasible ratio is 0.69" in line and "--noise-ratios" in line
    assert "--cap" not in line and not (tmp_path / "r").exists()
    assert main(["splits", "--dataset", "synthetic", "--data-root", str(data), "--noise-ratios",
                 "0.9", "--out", str(tmp_path / "s")]) == 2
    assert "--cap" in error_line(capsys)


def test_a_file_where_a_folder_belongs_is_one_line(data, tmp_path, capsys):
    preset = _preset(tmp_path, PRESET)
    a_file = tmp_path / "a_file"
    a_file.write_text("x")
    base = ["run", "--preset", str(preset), "--plugin", "test_runner", "--data-root", str(data),
            "--no-tracking"]
    assert main([*base, "--results", str(tmp_path / "r"), "--cache-dir", str(a_file)]) == 2
    assert "--cache-dir" in error_line(capsys) and not (tmp_path / "r").exists()
    assert main([*base, "--results", str(a_file)]) == 2
    assert "is a file" in error_line(capsys)
    baseline = REPO / "results" / "baselines" / "ci.json"
    assert main(["regress", "--results", str(a_file), "--baseline", str(baseline)]) == 2
    assert "is a file" in error_line(capsys)
    assert main(["regress", "--results", str(tmp_path), "--baseline", str(tmp_path)]) == 2
    assert "is a folder" in error_line(capsys)
    assert main(["regress", "--results", str(tmp_path), "--baseline", str(tmp_path),
                 "--update"]) == 2
    assert "is a folder" in error_line(capsys)
    assert main(["report", "--results", str(a_file)]) == 2
    assert "--results" in (line := error_line(capsys)) and "is a file" in line


def test_wrong_teacher_weights_stop_before_the_plan_is_written(data, tmp_path):
    weights = tmp_path / "wrong.pth"
    weights.write_bytes(b"not a state dict")
    spec = dataclasses.replace(make_spec(data, method="rd", config={"backbone": "resnet18"}),
                               teacher_weights=str(weights))
    results = tmp_path / "results"
    with pytest.raises(UserError, match="wrong.pth"):
        execute_sweep([spec], settings(results))
    assert not results.exists()


@pytest.mark.parametrize("weights,needle", [("random:abc", "non-negative integer"),
                                             ("/no/such/teacher.pth", "existing state_dict")])
def test_teacher_weights_nothing_could_load_are_refused_for_any_method(weights, needle, data,
                                                                       tmp_path):
    """Even a method that loads no teacher: the weights are part of every run's spec."""
    spec = dataclasses.replace(make_spec(data), teacher_weights=weights)
    with pytest.raises(UserError, match=needle):
        execute_sweep([spec], settings(tmp_path / "results"))
    assert not (tmp_path / "results").exists()


# --------------------------------------------------------------------------------------------
# Faults


def test_a_run_with_a_damaged_file_is_not_done(synthetic_root, tmp_path):  # noqa: F811
    spec = make_spec(synthetic_root)
    folder = write_result(tmp_path, run_one(spec, JobOptions(device="cpu")))
    record = load_record(folder / RECORD_FILE)
    assert set(record[FILES_KEY]) == {"scores.npz", "manifest.json"}
    assert partition([spec], tmp_path) == ([], [spec])
    scores = (folder / SCORES_FILE).read_bytes()
    _truncate(folder / SCORES_FILE)
    assert partition([spec], tmp_path) == ([spec], [])
    # Same size, other bytes: the hash catches it.
    (folder / SCORES_FILE).write_bytes(scores[:-1] + bytes([scores[-1] ^ 1]))
    assert partition([spec], tmp_path) == ([spec], [])

    # A record from before records listed their files: done when its files load whole.
    (folder / SCORES_FILE).write_bytes(scores)
    del record[FILES_KEY]
    write_json_atomic(folder / RECORD_FILE, record)
    assert partition([spec], tmp_path) == ([], [spec])
    _truncate(folder / SCORES_FILE)
    assert partition([spec], tmp_path) == ([spec], [])


def test_a_second_sweep_on_the_same_results_stops_with_one_line(synthetic_root, tmp_path,  # noqa: F811
                                                                 monkeypatch):
    fits = []
    monkeypatch.setattr(MeanDiff, "fit", lambda self, train, observer=None: fits.append(1))
    results = tmp_path / "results"
    with results_lock(results, "the first sweep"):
        with pytest.raises(UserError, match=rf"another sweep is running .*pid {os.getpid()}"):
            execute_sweep([make_spec(synthetic_root)], settings(results))
    assert fits == [] and not (results / "runs").exists()


def test_system_exit_in_fit_is_a_failed_record(synthetic_root, tmp_path):  # noqa: F811
    specs = [make_spec(synthetic_root, method="test-exit-in-fit"), make_spec(synthetic_root)]
    summary = run_sweep(specs, tmp_path, options=JobOptions(device="cpu"), progress=False)
    assert [s for s, _ in summary.failed] == specs[:1] and summary.ok == specs[1:]
    error = summary.failed[0][1]
    assert error["type"] == "SystemExit" and "sys.exit(3)" in error["message"]


def test_a_prediction_with_nan_fails_the_run(data):
    # No set with both classes (no normal test image, nothing injected): no metric is
    # evaluated, so nothing else would look at the scores.
    _without_normal_test_images(data, "brick")
    record = run_one(make_spec(data, method="test-nan-scores", ratio=0.0),
                     JobOptions(device="cpu")).record
    assert record["status"] == "failed" and "non-finite values on the test" in \
        record["error"]["message"]


def test_a_dangling_link_is_an_error_not_a_smaller_set(data):
    victim = sorted((data / "brick" / "train" / "good").iterdir())[0]
    victim.unlink()
    victim.symlink_to(data / "gone.png")
    with pytest.raises(DataError, match="does not exist"):
        load_category("synthetic", data, "brick")


def test_a_twin_is_not_copied_from_a_damaged_source(synthetic_root, tmp_path, monkeypatch):  # noqa: F811
    source = make_spec(synthetic_root, config={"epochs": 2})
    twin = make_spec(synthetic_root, config={})  # the default epochs: the same training
    run_sweep([source], tmp_path, options=JobOptions(device="cpu"), progress=False)
    _truncate(run_dir(tmp_path, source.fingerprint) / SCORES_FILE)
    fits = []
    original = MeanDiff.fit
    monkeypatch.setattr(MeanDiff, "fit", lambda self, train, observer=None: (
        fits.append(1), original(self, train, observer))[1])
    summary = run_sweep([twin], tmp_path, options=JobOptions(device="cpu"), progress=False)
    assert fits == [1] and summary.reused == []


_DRIVER = """
import os, subprocess, sys, time
sys.path.insert(0, {repo!r})
from bench.executors import ProcessExecutor
pool = ProcessExecutor(1, "cpu")._pool(1, None)
worker = pool.submit(os.getpid).result()
# A second process that arms only the watchdog (what platforms without prctl get).
watched = subprocess.Popen([sys.executable, "-c", {watchdog!r}])
print(worker, watched.pid, flush=True)
time.sleep(300)
"""
_WATCHDOG = """
import os, sys, time
sys.platform = "darwin"  # no prctl: the parent-pid watchdog alone
sys.path.insert(0, {repo!r})
from bench.executors import _die_with_driver
_die_with_driver(os.getppid())
time.sleep(300)
"""


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"  # a zombie has died
    except FileNotFoundError:
        return False


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")
def test_workers_die_with_a_killed_driver():
    script = _DRIVER.format(repo=str(REPO), watchdog=_WATCHDOG.format(repo=str(REPO)))
    driver = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True)
    try:
        worker, watched = map(int, driver.stdout.readline().split())
        time.sleep(1.5)  # the watchdog process has armed itself
        assert _alive(worker) and _alive(watched)
    finally:
        driver.send_signal(signal.SIGKILL)
        driver.wait()
    deadline = time.time() + 15
    while (_alive(worker) or _alive(watched)) and time.time() < deadline:
        time.sleep(0.2)
    assert not _alive(worker), "the pool worker outlived its driver"
    assert not _alive(watched), "the watchdog did not end its process"


def test_decode_verdicts_make_a_rerun_cheap_and_notice_changes(data, tmp_path):
    specs = [make_spec(data), make_spec(data, category="nut")]
    path = tmp_path / "verdicts.json"
    verdicts = DecodeVerdicts(path)
    first = check_data(specs, verdicts)
    verdicts.save()
    n_files = sum(len(load_category("synthetic", data, c).train)
                  + len(load_category("synthetic", data, c).test) for c in ("brick", "nut"))
    assert first == n_files
    assert check_data(specs, DecodeVerdicts(path)) == 0
    # A changed file is decoded again; a damaged one fails although it decoded before.
    victim = sorted((data / "nut" / "train" / "good").iterdir())[0]
    _truncate(victim)
    with pytest.raises(DataError, match=victim.name):
        check_data(specs, DecodeVerdicts(path))
    # Repaired, it is decoded again on its own; the other verdicts still hold.
    stale = DecodeVerdicts(path)
    assert len(stale) == n_files
    buf = io.BytesIO()
    Image.new("RGB", (32, 32)).save(buf, format="PNG")
    victim.write_bytes(buf.getvalue())
    assert check_data(specs, stale) == 1


def test_an_unreachable_ray_cluster_is_one_line_before_anything(synthetic_root, tmp_path):  # noqa: F811
    import socket

    pytest.importorskip("ray")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # nothing listens there once closed
    results = tmp_path / "results"
    started = time.time()
    with pytest.raises(UserError, match="does not answer"):
        execute_sweep([make_spec(synthetic_root)], settings(
            results, executor="ray", ray_address=f"127.0.0.1:{port}"))
    assert time.time() - started < 30 and not results.exists()


@pytest.mark.parametrize("method", ["rd", "cdd", "recontrast", "urd"])
def test_a_crop_the_distillation_networks_cannot_take_stops_the_sweep_first(data, tmp_path,
                                                                            method):
    results = tmp_path / "results"
    spec = dataclasses.replace(make_spec(data, method=method), image_size=48, resize_size=64)
    with pytest.raises(UserError, match=f"{method}: image size 48x48 is not a multiple of 32"):
        execute_sweep([spec], settings(results))
    assert not results.exists()
