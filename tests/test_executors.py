"""Executors: local, processes (loky) and a local 2-CPU Ray instance give the same records."""

from __future__ import annotations

import io
import os

import numpy as np
import pytest
from test_runner import PLUGIN, make_spec, synthetic_root  # noqa: F401  (fixture, methods)

from bench.driver import run_sweep
from bench.executors import _claim_gpu, make_executor
from bench.records import SCORES_FILE, load_records, run_dir
from bench.worker import JobOptions


def _sweep(root):
    return [make_spec(root, category=c, ratio=r) for c in ("brick", "nut") for r in (0.0, 0.2)]


def _outcome(results, specs):
    """Per fingerprint: status, metrics and the stored score arrays (what must not differ)."""
    out = {}
    records = {r["fingerprint"]: r for r in load_records(results, include_failed=True)}
    for spec in specs:
        record = records[spec.fingerprint]
        npz = np.load(io.BytesIO((run_dir(results, spec.fingerprint) / SCORES_FILE).read_bytes()))
        out[spec.fingerprint] = (record["status"], record["metrics"], record["history"],
                                 npz["test_scores"].tolist(), npz["train_scores"].tolist())
    return out


@pytest.fixture(scope="module")
def local_outcome(synthetic_root, tmp_path_factory):  # noqa: F811
    results = tmp_path_factory.mktemp("local")
    specs = _sweep(synthetic_root)
    summary = run_sweep(specs, results, executor=make_executor("local"),
                        options=JobOptions(device="cpu", plugins=(PLUGIN,)), progress=False)
    assert summary.exit_code == 0
    return _outcome(results, specs)


def test_processes_match_local(synthetic_root, local_outcome, tmp_path):  # noqa: F811
    specs = _sweep(synthetic_root)
    summary = run_sweep(specs, tmp_path, executor=make_executor("processes", 2, "cpu"),
                        options=JobOptions(device="cpu", plugins=(PLUGIN,)), progress=False)
    assert summary.exit_code == 0 and len(summary.ok) == 4
    assert _outcome(tmp_path, specs) == local_outcome


def test_ray_matches_local(synthetic_root, local_outcome, tmp_path, monkeypatch):  # noqa: F811
    pytest.importorskip("ray")
    monkeypatch.setenv("RAY_USAGE_STATS_ENABLED", "0")
    specs = _sweep(synthetic_root)
    summary = run_sweep(specs, tmp_path, executor=make_executor("ray", 2, "cpu"),
                        options=JobOptions(device="cpu", plugins=(PLUGIN,)), progress=False)
    assert summary.exit_code == 0, summary.lines()
    assert _outcome(tmp_path, specs) == local_outcome


def test_a_dying_worker_fails_only_its_run(synthetic_root, tmp_path):  # noqa: F811
    good = _sweep(synthetic_root)[:3]
    dead = make_spec(synthetic_root, method="test-die")
    summary = run_sweep([good[0], dead, *good[1:]], tmp_path,
                        executor=make_executor("processes", 2, "cpu"),
                        options=JobOptions(device="cpu", plugins=(PLUGIN,)), progress=False)
    assert sorted(s.fingerprint for s in summary.ok) == sorted(s.fingerprint for s in good)
    assert [s for s, _ in summary.failed] == [dead]
    assert summary.failed[0][1]["type"] == "WorkerDied" and summary.exit_code == 1


def test_gpu_slots_pin_one_gpu_per_worker(tmp_path, monkeypatch):
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")
    _claim_gpu(["3", "5"], str(tmp_path), per_gpu=1)
    first = os.environ["CUDA_VISIBLE_DEVICES"]
    _claim_gpu(["3", "5"], str(tmp_path), per_gpu=1)
    assert {first, os.environ["CUDA_VISIBLE_DEVICES"]} == {"3", "5"}
    # A slot whose owner died is taken over by the next worker.
    (tmp_path / "gpu5-0" / "pid").write_text("999999999")
    _claim_gpu(["3", "5"], str(tmp_path), per_gpu=1)
    assert os.environ["CUDA_VISIBLE_DEVICES"] == "5"
