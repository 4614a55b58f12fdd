"""MLflow tracking: a real ``mlflow server`` receives a sweep; failures never cost a record."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request

import pytest
from test_runner import make_spec, synthetic_root  # noqa: F401  (fixture, methods)

from bench.driver import run_sweep
from bench.records import is_complete, load_records
from bench.tracking import Tracker, flatten, resolve_tracking_uri, step_metrics
from bench.worker import JobOptions, run_one


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def mlflow_server(tmp_path_factory):
    """``mlflow server`` on 127.0.0.1 (lean: no job execution, one worker); stopped by PID."""
    folder = tmp_path_factory.mktemp("mlflow-server")
    port = _free_port()
    env = {**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false",
           "MLFLOW_DISABLE_TELEMETRY": "true"}
    env.pop("MLFLOW_TRACKING_URI", None)
    cmd = [sys.executable, "-m", "mlflow", "server", "--host", "127.0.0.1", "--port", str(port),
           "--workers", "1", "--backend-store-uri", f"sqlite:///{folder / 'server.db'}",
           "--artifacts-destination", str(folder / "artifacts")]
    log = open(folder / "server.log", "wb")
    proc = subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT,
                            start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    deadline = time.time() + 120
    try:
        while True:
            try:
                with urllib.request.urlopen(f"{url}/health", timeout=2) as response:
                    if response.status == 200:
                        break
            except OSError:
                pass
            if proc.poll() is not None or time.time() > deadline:
                raise RuntimeError("mlflow server did not start: "
                                   + (folder / "server.log").read_text()[-2000:])
            time.sleep(0.5)
        yield url
    finally:
        # The server's own process group (its worker included), by the PID we started.
        try:
            os.killpg(proc.pid, signal.SIGTERM)
            proc.wait(timeout=30)
        except (ProcessLookupError, subprocess.TimeoutExpired):
            os.killpg(proc.pid, signal.SIGKILL)
        log.close()


def test_server_receives_parent_and_child_runs(mlflow_server, synthetic_root, tmp_path):  # noqa: F811
    from mlflow.tracking import MlflowClient

    ok = make_spec(synthetic_root, ratio=0.2)
    bad = make_spec(synthetic_root, config={"fail_in_fit": True})
    tracker = Tracker(mlflow_server, "unit", sweep_info={"name": "unit sweep", "preset": "unit"})
    summary = run_sweep([ok, bad], tmp_path, options=JobOptions(device="cpu", sweep="unit"),
                        tracker=tracker, progress=False)
    assert summary.exit_code == 1 and tracker.enabled

    client = MlflowClient(tracking_uri=mlflow_server)
    experiment = client.get_experiment_by_name("fuad/unit")
    runs = client.search_runs([experiment.experiment_id])
    parents = [r for r in runs if r.data.tags.get("kind") == "sweep"]
    children = {r.data.tags["fingerprint"]: r for r in runs if r.data.tags.get("kind") == "run"}
    assert len(parents) == 1 and set(children) == {ok.fingerprint, bad.fingerprint}
    assert parents[0].info.status == "FAILED" and parents[0].data.metrics["runs_failed"] == 1

    child = children[ok.fingerprint]
    assert child.data.tags["mlflow.parentRunId"] == parents[0].info.run_id
    assert child.data.tags["category"] == "brick" and child.data.tags["noise_ratio"] == "0.2"
    assert child.data.tags["method"] == "test-mean-diff" and child.data.tags["status"] == "ok"
    assert child.data.params["config.epochs"] == "2" and child.data.params["image_size"] == "32"
    record = load_records(tmp_path)[0]
    assert child.data.metrics["no_overlap/i_auroc"] == pytest.approx(
        record["metrics"]["no_overlap"]["i_auroc"])
    assert "overlap/p_auroc" in child.data.metrics and "timing/fit_s" in child.data.metrics
    history = client.get_metric_history(child.info.run_id, "history/loss")
    assert [(m.step, m.value) for m in history] == [(0, 1.0), (1, 0.5)]
    artifacts = {a.path for a in client.list_artifacts(child.info.run_id)}
    assert {"record.json", "manifest.json"} <= artifacts
    failed = children[bad.fingerprint]
    assert failed.info.status == "FAILED" and failed.data.tags["error_type"] == "RuntimeError"

    # A resumed sweep with a fresh store logs the finished run it skips; the known one is not
    # logged twice.
    again = Tracker(mlflow_server, "unit", sweep_info={"name": "resume", "preset": "unit"})
    run_sweep([ok], tmp_path, options=JobOptions(device="cpu"), tracker=again, progress=False)
    children_now = [r for r in client.search_runs([experiment.experiment_id])
                    if r.data.tags.get("kind") == "run"]
    assert len(children_now) == 2


def test_tracking_failure_warns_once_and_keeps_records(synthetic_root, tmp_path):  # noqa: F811
    warnings = []
    tracker = Tracker("sqlite:////proc/no-such-dir/mlflow.db", "unit", warn=warnings.append)
    specs = [make_spec(synthetic_root, ratio=r) for r in (0.0, 0.2)]
    summary = run_sweep(specs, tmp_path, options=JobOptions(device="cpu"), tracker=tracker,
                        progress=False)
    assert summary.exit_code == 0 and len(warnings) == 1 and "records are still written" in warnings[0]
    assert all(is_complete(r) for r in load_records(tmp_path)) and len(load_records(tmp_path)) == 2


def test_uri_precedence_and_flattening(tmp_path, monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    assert resolve_tracking_uri(tmp_path) == f"sqlite:///{(tmp_path / 'mlflow.db').resolve()}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://x:5000")
    assert resolve_tracking_uri(tmp_path) == "http://x:5000"
    assert resolve_tracking_uri(tmp_path, "http://y") == "http://y"
    assert flatten("config", {"a": {"b": (1, 2)}, "c": 0.5}, {}) == {
        "config.a.b": "[1, 2]", "config.c": "0.5"}
    record = {"history": {"epoch": [0, 1], "loss": [2.0, None]},
              "diagnostics": {"epoch": [1], "auroc": [0.9]}}
    assert step_metrics(record) == [("history/loss", 2.0, 0), ("diag/auroc", 0.9, 1)]


def test_local_store_keeps_artifacts_beside_the_database(synthetic_root, tmp_path, monkeypatch):  # noqa: F811
    """Artifacts of a local SQLite store land in <db dir>/mlartifacts, never in the cwd."""
    from mlflow.tracking import MlflowClient

    elsewhere = tmp_path / "cwd"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    store = tmp_path / "results"
    uri = f"sqlite:///{store / 'mlflow.db'}"
    store.mkdir()
    tracker = Tracker(uri, "unit", sweep_info={"name": "local", "preset": "unit"})
    run_sweep([make_spec(synthetic_root)], store, options=JobOptions(device="cpu"),
              tracker=tracker, progress=False)
    report = store / "report"
    report.mkdir()
    (report / "report.md").write_text("# report\n")
    tracker.log_report(report)
    assert tracker.enabled
    assert not (elsewhere / "mlruns").exists()
    assert (store / "mlartifacts").is_dir()
    client = MlflowClient(tracking_uri=uri)
    assert [a.path for a in client.list_artifacts(tracker.parent_id, "report")] == [
        "report/report.md"]
    logged = list((store / "mlartifacts").rglob("record.json"))
    assert len(logged) == 1


# --------------------------------------------------------------------------------------------
# Faults: a server that is down or dies, a sweep killed while it logs.


def _dead_uri() -> str:
    return f"http://127.0.0.1:{_free_port()}"  # nothing listens there


def _settings(results, **changes):
    import dataclasses

    from bench.driver import SweepSettings

    base = SweepSettings(name="unit", preset="unit", results=results, report=False,
                         device="cpu")
    return dataclasses.replace(base, **changes)


def test_a_server_that_is_down_stops_the_sweep_before_anything(synthetic_root, tmp_path):  # noqa: F811
    from bench.driver import execute_sweep
    from bench.errors import UserError

    results = tmp_path / "results"
    started = time.time()
    with pytest.raises(UserError, match="does not answer.*--no-tracking"):
        execute_sweep([make_spec(synthetic_root)], _settings(results, tracking_uri=_dead_uri()))
    assert time.time() - started < 20 and not results.exists()
    outcome = execute_sweep([make_spec(synthetic_root)],
                            _settings(results, tracking_uri=_dead_uri(), tracking=False))
    assert outcome.exit_code == 0 and outcome.tracking_uri is None


class _ServerDiesAfterFirstRun:
    """Runs the specs locally; after the first result, the tracker's server is gone (its
    client now talks to a port nothing listens on, as after the server was killed)."""

    def __init__(self, tracker):
        self.tracker = tracker

    def run(self, specs, options):
        from mlflow.tracking import MlflowClient

        for i, spec in enumerate(specs):
            if i == 1:
                self.tracker._client = MlflowClient(tracking_uri=_dead_uri())
            yield spec, run_one(spec, options)


def test_a_server_that_dies_mid_sweep_costs_seconds_and_one_warning(
        mlflow_server, synthetic_root, tmp_path):  # noqa: F811
    warnings = []
    tracker = Tracker(mlflow_server, "unit-dies", warn=warnings.append)
    specs = [make_spec(synthetic_root, ratio=r) for r in (0.0, 0.1, 0.2)]
    started = time.time()
    summary = run_sweep(specs, tmp_path, executor=_ServerDiesAfterFirstRun(tracker),
                        options=JobOptions(device="cpu"), tracker=tracker, progress=False)
    # MLflow's own defaults retry for about four minutes before giving up.
    assert time.time() - started < 45
    assert summary.exit_code == 0 and len(warnings) == 1 and not tracker.enabled
    assert len(load_records(tmp_path)) == 3


class _Killed(BaseException):
    """Stands for SIGKILL: not an Exception, so no handler of the tracker catches it."""


def _killed_while_logging(results, specs, uri, monkeypatch):
    """A sweep that dies right after its first record landed, while MLflow logs that run:
    the child run exists (RUNNING, no params, no artifacts) and so does the RUNNING parent."""
    from bench.driver import execute_sweep

    real = Tracker._log_batch

    def die(self, run_id, params=None, metrics=()):
        if self.parent_id is not None and run_id != self.parent_id:
            self.enabled = False  # a killed process ends no run on its way out
            raise _Killed
        return real(self, run_id, params, metrics)

    with monkeypatch.context() as patch:
        patch.setattr(Tracker, "_log_batch", die)
        with pytest.raises(_Killed):
            execute_sweep(specs, _settings(results, tracking_uri=uri))


def _runs(uri):
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=uri)
    ids = [e.experiment_id for e in client.search_experiments()]
    return client, client.search_runs(ids)


def test_a_rerun_finishes_what_a_killed_sweep_left_running(synthetic_root, tmp_path,  # noqa: F811
                                                          monkeypatch):
    from bench.driver import execute_sweep, results_lock
    from bench.errors import UserError

    monkeypatch.delenv("MLFLOW_TRACKING_URI")
    uri = f"sqlite:///{tmp_path / 'shared.db'}"  # one store, two results folders
    mine, theirs = tmp_path / "mine", tmp_path / "theirs"
    specs = [make_spec(synthetic_root, ratio=r) for r in (0.0, 0.2)]
    _killed_while_logging(mine, specs, uri, monkeypatch)
    _killed_while_logging(theirs, specs[:1], uri, monkeypatch)
    client, runs = _runs(uri)
    assert {r.info.status for r in runs} == {"RUNNING"} and len(runs) == 4

    # While a sweep holds the folder, a second one stops and touches nothing.
    with results_lock(mine), pytest.raises(UserError, match="another sweep"):
        execute_sweep(specs, _settings(mine, tracking_uri=uri))
    assert {r.info.status for r in _runs(uri)[1]} == {"RUNNING"}

    outcome = execute_sweep(specs, _settings(mine, tracking_uri=uri))
    assert outcome.exit_code == 0
    _, runs = _runs(uri)
    by_folder = {}
    for run in runs:
        by_folder.setdefault(run.data.tags["results_dir"], []).append(run)
    # The other folder's dead sweep is its own rerun's business.
    assert {r.info.status for r in by_folder[str(theirs.resolve())]} == {"RUNNING"}
    ours = by_folder[str(mine.resolve())]
    sweeps = sorted((r for r in ours if r.data.tags["kind"] == "sweep"),
                    key=lambda r: r.info.start_time)
    assert [r.info.status for r in sweeps] == ["KILLED", "FINISHED"]
    children = [r for r in ours if r.data.tags["kind"] == "run"]
    assert {r.info.status for r in children} == {"FINISHED"}
    # One logged child per run: the killed one completed from its record, the other logged.
    assert sorted(r.data.tags["fingerprint"] for r in children) == sorted(
        s.fingerprint for s in specs)
    filled = next(r for r in children if r.data.tags.get("reconciled"))
    assert filled.data.tags["fingerprint"] == specs[0].fingerprint
    assert "no_overlap/i_auroc" in filled.data.metrics and filled.data.params["image_size"] == "32"
    assert {a.path for a in client.list_artifacts(filled.info.run_id)} >= {
        "record.json", "manifest.json"}


def test_a_store_that_cannot_be_had_is_one_line_up_front(tmp_path):
    from bench.errors import UserError
    from bench.tracking import check_tracking_store

    with pytest.raises(UserError, match="no store for scheme 'foo'"):
        check_tracking_store("foo://bar")
    with pytest.raises(UserError, match="does not exist or is not writable"):
        check_tracking_store(f"sqlite:///{tmp_path / 'missing' / 'm.db'}")
    check_tracking_store(f"sqlite:///{tmp_path / 'm.db'}")  # a folder that exists: fine
    check_tracking_store(f"sqlite:///{tmp_path / 'results' / 'mlflow.db'}", tmp_path / "results")


def test_an_http_server_that_is_not_mlflow_is_refused(tmp_path):
    import http.server
    import threading

    from bench.errors import UserError
    from bench.tracking import check_tracking_store

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), http.server.SimpleHTTPRequestHandler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        with pytest.raises(UserError, match="HTTP 404 on /health.*not an MLflow server"):
            check_tracking_store(f"http://127.0.0.1:{server.server_address[1]}")
    finally:
        server.shutdown()
