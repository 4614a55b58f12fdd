"""Runner: one training serves both protocols, records and scores.npz, resume, failures, Ctrl-C.

The tiny methods registered here are importable by worker processes as the plugin module
``test_runner`` (pytest puts this folder on ``sys.path``); the executor tests reuse them.
"""

from __future__ import annotations

import dataclasses
import io
import json
import os
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import torch

from bench.driver import partition, run_sweep, write_result
from bench.records import (
    METRIC_NAMES,
    RECORD_FILE,
    SCORES_FILE,
    is_complete,
    load_record,
    load_records,
    run_dir,
)
from bench.spec import RunSpec
from bench.worker import JobOptions, RunResult, run_one
from methods.base import Method, Prediction, get_method_class, register_method

PLUGIN = "test_runner"


@dataclass(frozen=True)
class MeanDiffConfig:
    epochs: int = 2
    fail_in_fit: bool = False


class MeanDiff(Method):
    """Fit = mean training image; anomaly map = |x - mean| averaged over channels."""

    name = "test-mean-diff"
    Config = MeanDiffConfig

    def fit(self, train, observer=None):
        if self.config.fail_in_fit:
            raise RuntimeError("deliberate failure in fit")
        self.mean = train.images.float().mean(0)
        MeanDiff.last_names = train.names
        for epoch in range(self.config.epochs):
            if observer is not None:
                spread = (train.images.float() - self.mean).abs().mean((1, 2, 3)).numpy()
                observer(epoch, {"loss": 1.0 / (epoch + 1)}, {"spread": spread})

    def predict(self, images, batch_size=32):
        maps = (images.float() - self.mean).abs().mean(1)
        return Prediction(maps.flatten(1).amax(1).numpy(), maps.numpy())

    def state_dict(self):
        return {"mean": self.mean}

    def load_state_dict(self, state):
        self.mean = state["mean"]


@dataclass(frozen=True)
class DieConfig:
    pass


class DieInFit(MeanDiff):
    """Kills its own process in fit: a worker crash (segfault, OOM killer) for executor tests."""

    name = "test-die"
    Config = DieConfig

    def fit(self, train, observer=None):
        os._exit(3)


for _cls in (MeanDiff, DieInFit):
    try:
        get_method_class(_cls.name)
    except Exception:  # noqa: BLE001 - not registered yet in this process
        register_method(_cls)


@pytest.fixture(scope="session")
def synthetic_root(tmp_path_factory):
    """A tiny synthetic MVTec-layout tree (2 categories, 32 px)."""
    from datasets import generate_synthetic

    root = tmp_path_factory.mktemp("synthetic")
    return generate_synthetic(root / "data", seed=0, size=32, n_train=10, n_test_good=4,
                              n_test_anomalous=6, categories=["brick", "nut"])


def make_spec(root, method="test-mean-diff", config=None, category="brick", ratio=0.2, seed=0):
    return RunSpec(method=method, config=config or {}, dataset="synthetic", data_root=str(root),
                   category=category, noise_ratio=ratio, split_seed=seed, train_seed=seed,
                   image_size=32, resize_size=32, teacher_weights="random")


def test_run_one_trains_once_and_evaluates_both_protocols(synthetic_root):
    result = run_one(make_spec(synthetic_root), JobOptions(device="cpu"))
    record = result.record
    assert record["status"] == "ok", record["error"]
    assert is_complete(record)
    for protocol in ("no_overlap", "overlap", "train"):
        assert set(record["metrics"][protocol]) == set(METRIC_NAMES)
    split = record["split"]
    assert split["n_injected"] == 2 and split["n_train_normal"] == 10  # floor(0.2 * 10)
    assert split["n_test_overlap"] == 10 and split["n_test_no_overlap"] == 8
    assert record["history"]["epoch"] == [0, 1] and record["history"]["loss"] == [1.0, 0.5]
    assert set(record["diagnostics"]) == {"epoch", "spread/mean_injected", "spread/mean_normal"}
    assert record["timings"]["fit_s"] >= 0 and record["timings"]["infer_images_per_s"] > 0
    assert record["environment"]["device"] == "cpu"
    assert record["provenance"]["method"] == "test-mean-diff"

    npz = np.load(io.BytesIO(result.scores))
    assert npz["test_scores"].shape == (10,) and npz["test_maps"].dtype == np.float16
    assert npz["test_images"].shape == (10, 32, 32, 3) and npz["test_masks"].shape == (10, 32, 32)
    assert npz["in_no_overlap"].sum() == 8 and npz["train_injected"].sum() == 2
    # The injected images are exactly the test images that No overlap drops.
    dropped = set(npz["test_keys"][~npz["in_no_overlap"]])
    assert dropped == set(npz["train_keys"][npz["train_injected"]])
    # No overlap metrics are those of the subset: recompute one from the stored scores.
    from bench.metrics import evaluate

    keep = npz["in_no_overlap"]
    labels = npz["test_labels"][keep]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ref = evaluate(npz["test_scores"][keep], labels, np.zeros((keep.sum(), 2, 2)),
                       np.zeros((keep.sum(), 2, 2), np.uint8))
    assert record["metrics"]["no_overlap"]["i_auroc"] == pytest.approx(ref["i_auroc"])
    manifest = json.loads(result.manifest)
    assert len(manifest["train"]) == 12
    # The method sees opaque names: a file path would say which images came from test/.
    assert MeanDiff.last_names == tuple(f"train-{i:05d}" for i in range(12))


@pytest.mark.skipif(not Path("/proc/self/clear_refs").exists(), reason="Linux only")
def test_cpu_peak_memory_is_the_runs_own(synthetic_root):
    """A worker that held a large array earlier does not report that peak for a later run."""
    def rss_mb():
        status = Path("/proc/self/status").read_text()
        return int(next(ln for ln in status.splitlines() if ln.startswith("VmRSS:")).split()[1]) / 1024

    big = np.ones(2 * 2**30 // 8)  # 2 GiB, touched: the process's lifetime peak is now above it
    del big
    before = rss_mb()
    record = run_one(make_spec(synthetic_root), JobOptions(device="cpu")).record
    assert record["timings"]["peak_mem_kind"] == "run_peak_rss"
    # The tiny run adds far less than the 2 GiB the earlier array held.
    assert before * 0.9 < record["timings"]["peak_mem_mb"] < before + 1024


def test_summary_keeps_a_user_error_whole_and_cuts_tracebacks(synthetic_root):
    from bench.driver import SweepSummary

    spec = make_spec(synthetic_root)
    advice = "put it at /a/long/path/" + "x" * 300 + ".pth"
    summary = SweepSummary(total=2, failed=[
        (spec, {"type": "UserError", "message": advice}),
        (spec, {"type": "RuntimeError", "message": "y" * 300 + "\ntraceback"}),
    ])
    lines = summary.lines()
    assert lines[1].endswith(advice) and lines[2].endswith("y" * 197 + "...")


def test_a_raising_method_is_recorded_and_the_sweep_goes_on(synthetic_root, tmp_path):
    good = make_spec(synthetic_root)
    bad = make_spec(synthetic_root, config={"fail_in_fit": True})
    summary = run_sweep([bad, good], tmp_path, options=JobOptions(device="cpu"), progress=False)
    assert [s for s, _ in summary.failed] == [bad] and summary.ok == [good]
    assert summary.exit_code == 1
    failed = load_record(run_dir(tmp_path, bad.fingerprint) / RECORD_FILE)
    assert failed["status"] == "failed" and failed["error"]["type"] == "RuntimeError"
    assert "deliberate failure" in failed["error"]["message"]
    assert "Traceback" in failed["error"]["traceback"]
    assert not is_complete(failed)
    assert "FAILED" in "\n".join(summary.lines())


def test_resume_skips_done_and_reruns_incomplete_and_failed(synthetic_root, tmp_path):
    specs = [make_spec(synthetic_root, ratio=r) for r in (0.0, 0.1, 0.2)]
    first = run_sweep(specs, tmp_path, options=JobOptions(device="cpu"), progress=False)
    assert len(first.ok) == 3 and first.exit_code == 0
    again = run_sweep(specs, tmp_path, options=JobOptions(device="cpu"), progress=False)
    assert again.ok == [] and len(again.skipped) == 3

    # An interrupted run: scores written but no record. A failed run: a failed record.
    os.unlink(run_dir(tmp_path, specs[0].fingerprint) / RECORD_FILE)
    failed = dict(load_record(run_dir(tmp_path, specs[1].fingerprint) / RECORD_FILE))
    failed.update(status="failed", metrics=None)
    write_result(tmp_path, RunResult(failed))
    todo, done = partition(specs, tmp_path)
    assert todo == specs[:2] and done == specs[2:]
    resumed = run_sweep(specs, tmp_path, options=JobOptions(device="cpu"), progress=False)
    assert resumed.ok == specs[:2] and resumed.skipped == specs[2:]
    assert len(load_records(tmp_path)) == 3

    forced = run_sweep(specs, tmp_path, options=JobOptions(device="cpu"), progress=False,
                       force=True)
    assert len(forced.ok) == 3 and forced.skipped == []


class _InterruptingExecutor:
    """Yields the first result, then acts as if Ctrl-C arrived during the second run."""

    def run(self, specs, options):
        yield specs[0], run_one(specs[0], options)
        raise KeyboardInterrupt


def test_ctrl_c_leaves_no_partial_record(synthetic_root, tmp_path):
    specs = [make_spec(synthetic_root, ratio=r) for r in (0.0, 0.1)]
    with pytest.raises(KeyboardInterrupt):
        run_sweep(specs, tmp_path, executor=_InterruptingExecutor(),
                  options=JobOptions(device="cpu"), progress=False)
    assert is_complete(load_record(run_dir(tmp_path, specs[0].fingerprint) / RECORD_FILE))
    assert not run_dir(tmp_path, specs[1].fingerprint).exists()
    leftovers = [p for p in tmp_path.rglob("*") if p.name.endswith(".tmp")]
    assert leftovers == []


def test_rerun_retracts_the_old_record_before_writing_scores(synthetic_root, tmp_path,
                                                             monkeypatch):
    spec = make_spec(synthetic_root)
    result = run_one(spec, JobOptions(device="cpu"))
    folder = write_result(tmp_path, result)
    assert (folder / SCORES_FILE).is_file() and is_complete(load_record(folder / RECORD_FILE))

    # A rewrite that dies before its record lands leaves the run "not done", never the old
    # record paired with new scores.
    def disk_full(path, obj):
        raise OSError("disk full")

    monkeypatch.setattr("bench.driver.write_json_atomic", disk_full)
    with pytest.raises(OSError):
        write_result(tmp_path, result)
    assert load_record(folder / RECORD_FILE) is None
    assert partition([spec], tmp_path) == ([spec], [])


def test_real_rd_and_cdd_end_to_end(synthetic_root):
    """The registered methods through the runner: tiny budgets, random ResNet-18 teacher."""
    torch.manual_seed(0)
    rd = run_one(make_spec(synthetic_root, "rd", {"backbone": "resnet18", "epochs": 1}),
                 JobOptions(device="cpu"))
    assert rd.record["status"] == "ok", rd.record["error"]
    assert rd.record["provenance"]["teacher_weights"]
    cdd = run_one(make_spec(synthetic_root, "cdd", {"backbone": "resnet18", "epochs": 2,
                                                     "max_steps_per_stage": 1}),
                  JobOptions(device="cpu"))
    assert cdd.record["status"] == "ok", cdd.record["error"]
    diagnostics = cdd.record["diagnostics"]
    assert "confidence_auroc" in diagnostics and len(diagnostics["epoch"]) == 2


def test_softpatch_and_patchcore_end_to_end(synthetic_root):
    """The memory-bank baselines through the runner on the synthetic data."""
    small = {"backbone": "resnet18", "pretrain_embed_dimension": 64,
             "target_embed_dimension": 64, "projection_dim": 16}
    records = {}
    for name in ("softpatch", "patchcore"):
        record = run_one(make_spec(synthetic_root, name, small), JobOptions(device="cpu")).record
        assert record["status"] == "ok", record["error"]
        assert is_complete(record)
        assert 0.0 <= record["metrics"]["overlap"]["i_auroc"] <= 1.0
        assert record["history"]["bank_size"][0] > 0
        records[name] = record
    # SoftPatch removes noisy patches and its per-image noise scores reach the diagnostics,
    # split by the injected flags; PatchCore removes nothing.
    assert records["softpatch"]["history"]["removed_patches"][0] > 0
    assert "removed_fraction/mean_injected" in records["softpatch"]["diagnostics"]
    assert records["patchcore"]["history"]["removed_patches"][0] == 0


def test_specs_that_train_the_same_thing_share_one_training(synthetic_root, tmp_path,
                                                             monkeypatch):
    """{"epochs": 2} and {} (the default 2) differ in name only: one fit, two records."""
    fits = []
    original = MeanDiff.fit
    monkeypatch.setattr(MeanDiff, "fit", lambda self, train, observer=None: (
        fits.append(1), original(self, train, observer))[1])
    explicit = make_spec(synthetic_root, config={"epochs": 2})
    default = make_spec(synthetic_root, config={})
    other = make_spec(synthetic_root, config={"epochs": 3})
    assert explicit.fingerprint != default.fingerprint
    summary = run_sweep([explicit, default, other], tmp_path, options=JobOptions(device="cpu"),
                        progress=False)
    assert len(fits) == 2 and summary.reused == [default] and len(summary.ok) == 3
    assert "1 copied from runs that train the same thing" in summary.lines()[0]
    records = {r["fingerprint"]: r for r in load_records(tmp_path)}
    copy, source = records[default.fingerprint], records[explicit.fingerprint]
    assert copy["reused_from"] == explicit.fingerprint and "reused_from" not in source
    assert copy["spec"] == default.to_dict() and copy["metrics"] == source["metrics"]
    for name in (SCORES_FILE, "manifest.json"):
        assert (run_dir(tmp_path, default.fingerprint) / name).read_bytes() == \
            (run_dir(tmp_path, explicit.fingerprint) / name).read_bytes()

    # A later sweep reuses the record on disk; --no-reuse (reuse=False) trains anew.
    again = make_spec(synthetic_root, config={"epochs": 2, "fail_in_fit": False})
    summary = run_sweep([again], tmp_path, options=JobOptions(device="cpu"), progress=False)
    assert len(fits) == 2 and summary.reused == [again]
    assert load_record(run_dir(tmp_path, again.fingerprint) / RECORD_FILE)["reused_from"] == \
        explicit.fingerprint
    summary = run_sweep([again], tmp_path / "alone", options=JobOptions(device="cpu"),
                        progress=False, reuse=False)
    assert len(fits) == 3 and summary.reused == []
    # Retraining the source (--force) rewrites the copies earlier sweeps made of it.
    run_sweep([explicit], tmp_path, options=JobOptions(device="cpu", sweep="retrain"),
              force=True, progress=False)
    assert len(fits) == 4
    for spec in (explicit, default, again):
        record = load_record(run_dir(tmp_path, spec.fingerprint) / RECORD_FILE)
        assert record["sweep"] == "retrain", spec.config
    # "random" and "random:0" name the same teacher: a twin too.
    renamed = dataclasses.replace(explicit, teacher_weights="random:0")
    assert renamed.fingerprint != explicit.fingerprint
    summary = run_sweep([renamed], tmp_path, options=JobOptions(device="cpu"), progress=False)
    assert len(fits) == 4 and summary.reused == [renamed]


def test_a_failed_leader_fails_its_twins_with_the_reason(synthetic_root, tmp_path):
    leader = make_spec(synthetic_root, config={"fail_in_fit": True})
    twin = make_spec(synthetic_root, config={"fail_in_fit": True, "epochs": 2})
    summary = run_sweep([leader, twin], tmp_path, options=JobOptions(device="cpu"),
                        progress=False)
    assert [s for s, _ in summary.failed] == [leader, twin] and not summary.reused
    error = summary.failed[1][1]
    assert error["message"].startswith(f"(shares its training with run {leader.fingerprint[:12]})")
    assert "deliberate failure in fit" in error["message"]
