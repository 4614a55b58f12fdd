"""MLflow tracking of sweeps (driver only: workers compute, one process writes).

Layout in MLflow: one **experiment per preset** (``fuad/<preset>``), one **parent run per sweep**
invocation, one **child run per spec** with

- params: the spec's fields and the method's whole resolved config, flattened
  (``config.lr``, ``config.betas``, ...);
- tags: dataset, category, noise ratio, seeds, method, fingerprint, teacher weights (the
  provenance id when the method reports one), status, and the error type of a failed run;
- metrics: ``no_overlap/i_auroc``, ``overlap/p_auroc``, ``train/i_auroc``, ... and timings
  (``timing/fit_s`` ...); per-epoch history as step metrics (``history/loss``) and diagnostics
  (``diag/<name>``), with the epoch as step;
- artifacts: ``record.json``, the split manifest and any figures (``*.png``) in the run folder;
  the sweep run holds the rendered report (``report/``: tables, figures, ``report.md``).

The store defaults to MLflow's SQLite backend at ``<results>/mlflow.db``; ``--tracking-uri`` or
``MLFLOW_TRACKING_URI`` point elsewhere (e.g. ``http://host:5000``). With a local SQLite store the
artifacts go to ``mlartifacts/`` beside the database, not to the working directory. MLflow is imported only
when used and its logging is kept quiet. Tracking is a convenience, never the record of truth:
any MLflow failure prints one warning and tracking stops for the sweep; records are unaffected.
A resumed sweep logs the completed runs that the store does not have yet (by fingerprint).

Faults (docs/runner.md, "MLflow"): a tracking server is asked once, with a short timeout,
before a sweep writes anything (:func:`check_tracking_store`); MLflow's HTTP retries are capped
(:data:`HTTP_LIMITS`) so a server that dies mid-sweep costs seconds before the one warning. Runs
carry the results folder and host they belong to (tags ``results_dir``, ``host``), so that a
later sweep on the same folder, which holds the folder's lock, can finish what a killed sweep
left ``RUNNING`` (:meth:`Tracker.reconcile`).
"""

from __future__ import annotations

import logging
import math
import os
import socket
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
import warnings
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

from bench.errors import UserError
from bench.records import MANIFEST_FILE, RECORD_FILE, files_intact, load_record, run_dir

EXPERIMENT_PREFIX = "fuad/"
_PARAM_LIMIT = 6000  # MLflow's longest param value; longer values are cut with a marker
_BATCH = 100  # params/tags per log_batch call stay under MLflow's limits
# MLflow's HTTP client retries 7 times with exponential backoff and a 120 s timeout by default:
# about 4 minutes before a dead server is reported. A sweep would stall that long at its first
# call after the server died; these defaults (a user's own environment wins) make it seconds.
HTTP_LIMITS = {
    "MLFLOW_HTTP_REQUEST_MAX_RETRIES": "2",
    "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": "1",
    "MLFLOW_HTTP_REQUEST_BACKOFF_JITTER": "0.5",
    "MLFLOW_HTTP_REQUEST_TIMEOUT": "10",
}
HEALTH_TIMEOUT_S = 5.0  # the up-front check of a tracking server
TERMINAL = ("FINISHED", "FAILED")  # child runs that count as logged


def default_tracking_uri(results: str | os.PathLike) -> str:
    """``sqlite:///<abs results>/mlflow.db`` (MLflow 3's local store)."""
    return f"sqlite:///{(Path(results).resolve() / 'mlflow.db').as_posix()}"


def local_artifact_root(uri: str) -> str | None:
    """``<db dir>/mlartifacts`` as a URI for a local SQLite store, else None.

    MLflow puts a new experiment's artifacts under ``./mlruns`` of whatever the working
    directory happens to be; beside the database is where a user looks for them.
    """
    prefix = "sqlite:///"
    if not uri.startswith(prefix):
        return None
    database = Path(uri[len(prefix):])
    if not database.is_absolute():
        database = Path.cwd() / database
    return (database.parent / "mlartifacts").resolve().as_uri()


def resolve_tracking_uri(results: str | os.PathLike, uri: str | None = None) -> str:
    """``--tracking-uri``, else ``MLFLOW_TRACKING_URI``, else the default under ``results``."""
    return uri or os.environ.get("MLFLOW_TRACKING_URI") or default_tracking_uri(results)


def is_server(uri: str) -> bool:
    return uri.startswith(("http://", "https://"))


def check_tracking_store(uri: str, results: str | os.PathLike | None = None) -> None:
    """Stop with one line, before anything is written, when the store cannot be reached.

    A server (``http(s)://``) must answer ``GET /health`` within :data:`HEALTH_TIMEOUT_S`; a
    SQLite store's folder must exist and be writable (the default store's folder is the results
    folder, created later). Other stores are left to the first MLflow call.
    """
    if is_server(uri):
        url = uri.rstrip("/") + "/health"
        try:
            with urllib.request.urlopen(url, timeout=HEALTH_TIMEOUT_S):
                return
        except urllib.error.HTTPError as err:
            if err.code in (401, 403):  # an MLflow server behind an auth wall answers so
                return
            problem = (f"HTTP {err.code} on /health: something answers there, but not an MLflow "
                       f"server" if err.code < 500 else f"HTTP {err.code}")
        except (urllib.error.URLError, OSError, ValueError) as err:
            reason = getattr(err, "reason", err)
            problem = f"{type(reason).__name__}: {reason}" if str(reason) else type(reason).__name__
        raise UserError(
            f"MLflow tracking server {uri} does not answer ({problem}, {HEALTH_TIMEOUT_S:g} s "
            f"timeout); start it, give another --tracking-uri, or pass --no-tracking to run "
            f"without tracking")
    scheme = urllib.parse.urlsplit(uri).scheme
    known = _store_schemes()
    if len(scheme) > 1 and known is not None and scheme not in known:  # len 1: a Windows drive
        raise UserError(
            f"MLflow tracking URI {uri}: MLflow has no store for scheme {scheme!r} (it knows "
            f"{', '.join(sorted(k for k in known if k))}); give another --tracking-uri or pass "
            f"--no-tracking")
    if uri.startswith("sqlite:///"):
        database = Path(uri[len("sqlite:///"):])
        folder = database.parent if database.is_absolute() else (Path.cwd() / database).parent
        if results is not None and folder.resolve() == Path(results).resolve():
            return
        if not folder.is_dir() or not os.access(folder, os.W_OK):
            raise UserError(
                f"MLflow store {uri}: folder {folder} does not exist or is not writable; create "
                f"it, give another --tracking-uri, or pass --no-tracking")


def _store_schemes() -> set[str] | None:
    """The URI schemes MLflow's tracking-store registry knows (plugins included), or None when
    this MLflow does not expose it (then the first MLflow call says what is wrong)."""
    _quiet_mlflow()
    try:
        from mlflow.tracking._tracking_service import utils

        return set(utils._tracking_store_registry._registry)
    except (ImportError, AttributeError):
        return None


def ui_command(uri: str) -> str:
    """The command that browses ``uri`` (a server URI is opened in the browser instead)."""
    if uri.startswith(("http://", "https://")):
        return f"open {uri} in a browser"
    return f"mlflow ui --backend-store-uri {uri}"


def _quiet_mlflow() -> None:
    os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
    for name in ("mlflow", "alembic", "sqlalchemy", "urllib3", "databricks"):
        logging.getLogger(name).setLevel(logging.ERROR)
    warnings.filterwarnings("ignore", module=r"mlflow.*")
    warnings.filterwarnings("ignore", module=r"pydantic.*")


def flatten(prefix: str, value: Any, out: dict[str, str]) -> dict[str, str]:
    """Nested config -> {"config.a.b": "value"} with list/tuple values kept as one string."""
    if isinstance(value, Mapping):
        for key, item in value.items():
            flatten(f"{prefix}.{key}" if prefix else str(key), item, out)
    else:
        text = str(list(value) if isinstance(value, tuple) else value)
        out[prefix] = text if len(text) <= _PARAM_LIMIT else text[: _PARAM_LIMIT - 3] + "..."
    return out


def run_metrics(record: Mapping[str, Any]) -> dict[str, float]:
    """Final metrics of a record, named ``<protocol>/<metric>`` and ``timing/<name>``."""
    out = {}
    for protocol, values in (record.get("metrics") or {}).items():
        for name, value in (values or {}).items():
            if _finite(value):
                out[f"{protocol}/{name}"] = float(value)
    for name, value in (record.get("timings") or {}).items():
        if _finite(value):
            out[f"timing/{name}"] = float(value)
    split = record.get("split") or {}
    if _finite(split.get("realized_ratio")):
        out["split/realized_ratio"] = float(split["realized_ratio"])
    return out


def step_metrics(record: Mapping[str, Any]) -> list[tuple[str, float, int]]:
    """(name, value, epoch) for every per-epoch history value and diagnostic."""
    out = []
    for section, prefix in (("history", "history/"), ("diagnostics", "diag/")):
        table = record.get(section) or {}
        epochs = table.get("epoch") or []
        for name, values in table.items():
            if name == "epoch":
                continue
            for i, value in enumerate(values or []):
                if _finite(value):
                    step = int(epochs[i]) if i < len(epochs) and epochs[i] is not None else i
                    out.append((prefix + name, float(value), step))
    return out


def _finite(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def run_tags(record: Mapping[str, Any]) -> dict[str, str]:
    spec = record.get("spec") or {}
    provenance = record.get("provenance") or {}
    tags = {
        "dataset": spec.get("dataset"),
        "category": spec.get("category"),
        "noise_ratio": spec.get("noise_ratio"),
        "split_seed": spec.get("split_seed"),
        "train_seed": spec.get("train_seed"),
        "method": spec.get("method"),
        "fingerprint": record.get("fingerprint"),
        "teacher_weights": provenance.get("teacher_weights_id")
        or provenance.get("teacher_weights") or spec.get("teacher_weights"),
        "status": record.get("status"),
        "sweep": record.get("sweep"),
    }
    if record.get("error"):
        tags["error_type"] = record["error"].get("type")
    env = record.get("environment") or {}
    if env.get("commit"):
        tags["commit"] = env["commit"]
    if env.get("device_name"):
        tags["device_name"] = env["device_name"]
    return {k: str(v) for k, v in tags.items() if v is not None}


def run_params(record: Mapping[str, Any]) -> dict[str, str]:
    spec = dict(record.get("spec") or {})
    spec.pop("config", None)
    spec.pop("data_root", None)  # where the data was on one machine: a tag would mislead
    params = flatten("", spec, {})
    flatten("config", record.get("resolved_config") or (record.get("spec") or {}).get("config")
            or {}, params)
    return params


class Tracker:
    """Logs one sweep to MLflow; every call is a no-op after the first failure (warned once)."""

    def __init__(self, uri: str, experiment: str, sweep_info: Mapping[str, Any] | None = None,
                 warn=None, results_dir: str | os.PathLike | None = None):
        self.uri = uri
        # Runs are tagged with the results folder (and host) they belong to: see reconcile.
        self.results_dir = str(Path(results_dir).resolve()) if results_dir is not None else None
        self.experiment = experiment if experiment.startswith(EXPERIMENT_PREFIX) \
            else EXPERIMENT_PREFIX + experiment
        self.sweep_info = dict(sweep_info or {})
        self.enabled = True
        self.parent_id: str | None = None
        self.experiment_id: str | None = None
        self._client = None
        self._known: set[str] | None = None
        self._warn = warn or (lambda line: print(line, file=sys.stderr))

    # -- plumbing
    def _guard(self, what: str, fn, *args, **kwargs):
        if not self.enabled:
            return None
        try:
            return fn(*args, **kwargs)
        except Exception as err:  # noqa: BLE001 - tracking must never cost a record
            self.enabled = False
            first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
            self._warn(f"warning: MLflow tracking at {self.uri} stopped ({what}: "
                       f"{type(err).__name__}: {first}); records are still written")
            return None

    def _connect(self):
        if self._client is None:
            for name, value in HTTP_LIMITS.items():
                os.environ.setdefault(name, value)
            _quiet_mlflow()
            from mlflow.tracking import MlflowClient

            _quiet_mlflow()  # importing mlflow resets its loggers to INFO

            with _store_lock(self.uri):
                client = MlflowClient(tracking_uri=self.uri)
                experiment = client.get_experiment_by_name(self.experiment)
                self.experiment_id = (
                    experiment.experiment_id if experiment is not None
                    else client.create_experiment(
                        self.experiment, artifact_location=local_artifact_root(self.uri)))
            self._client = client
        return self._client

    def _owner_tags(self) -> dict[str, str]:
        if self.results_dir is None:
            return {}
        return {"results_dir": self.results_dir, "host": socket.gethostname()}

    # -- sweep
    def start_sweep(self, total: int, todo: int) -> None:
        self._guard("start", self._start, total, todo)

    def _start(self, total: int, todo: int) -> None:
        client = self._connect()
        run = client.create_run(self.experiment_id, run_name=self.sweep_info.get("name"),
                                tags={"kind": "sweep", "preset": str(self.sweep_info.get("preset")),
                                      **self._owner_tags()})
        self.parent_id = run.info.run_id
        params = flatten("", {k: v for k, v in self.sweep_info.items() if v is not None}, {})
        params.update({"runs_total": str(total), "runs_todo": str(todo)})
        self._log_batch(self.parent_id, params=params)

    def end_sweep(self, summary) -> None:
        self._guard("end", self._end, summary)

    def _end(self, summary) -> None:
        if self.parent_id is None:
            return
        client = self._connect()
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        client.log_batch(self.parent_id, metrics=[
            Metric("runs_ok", len(summary.ok), now, 0),
            Metric("runs_failed", len(summary.failed), now, 0),
            Metric("runs_skipped", len(summary.skipped), now, 0),
            Metric("elapsed_s", float(summary.elapsed_s), now, 0),
        ])
        status = "KILLED" if summary.interrupted else ("FAILED" if summary.failed else "FINISHED")
        client.set_terminated(self.parent_id, status=status)

    def log_report(self, folder: str | os.PathLike) -> None:
        """Attach the rendered report (tables, figures, report.md) to the sweep run."""
        if self.parent_id is not None and Path(folder).is_dir():
            self._guard("log report", lambda: self._connect().log_artifacts(
                self.parent_id, str(folder), "report"))

    # -- runs
    def log_run(self, record: Mapping[str, Any], folder: str | os.PathLike) -> str | None:
        """Log one run's record (and the files beside it) as a child of the sweep run."""
        return self._guard("log run", self._log_run, record, Path(folder))

    def _log_run(self, record: Mapping[str, Any], folder: Path) -> str:
        from mlflow.entities import Metric

        client = self._connect()
        spec = record.get("spec") or {}
        name = (f"{spec.get('method')}/{spec.get('category')}/r{spec.get('noise_ratio')}"
                f"/s{spec.get('split_seed')}.{spec.get('train_seed')}")
        tags = {**run_tags(record), "kind": "run", **self._owner_tags()}
        if self.parent_id:
            tags["mlflow.parentRunId"] = self.parent_id
        run = client.create_run(self.experiment_id, run_name=name, tags=tags)
        run_id = run.info.run_id
        now = int(time.time() * 1000)
        metrics = [Metric(k, v, now, 0) for k, v in run_metrics(record).items()]
        metrics += [Metric(k, v, now, step) for k, v, step in step_metrics(record)]
        self._log_batch(run_id, params=run_params(record), metrics=metrics)
        for path in _artifacts(folder):
            client.log_artifact(run_id, str(path))
        client.set_terminated(run_id, status=_final_status(record))
        if self._known is not None and record.get("fingerprint"):
            self._known.add(record["fingerprint"])
        return run_id

    # -- a killed sweep's leftovers
    def reconcile(self, results: str | os.PathLike, say=None) -> tuple[int, int] | None:
        """Finish the runs a killed sweep of this results folder left ``RUNNING``.

        Call it only while holding the folder's lock (one sweep per results folder), before
        :meth:`start_sweep`: then no live sweep owns such a run. A child run whose record is
        there and whole gets what it lacks (params, metrics, tags, artifacts) and the record's
        final status; other children and the sweep runs are marked ``KILLED``. A run is this
        folder's when its ``results_dir`` and ``host`` tags say so, or, for runs logged before
        those tags existed, when the store is this folder's own default store. Returns
        (filled, killed), or None when tracking failed (warned once).
        """
        found = self._guard("reconcile", self._reconcile, Path(results))
        if found and say is not None and sum(found):
            say(f"  MLflow: {sum(found)} run(s) left RUNNING by a sweep that died: {found[0]} "
                f"completed from their records, {found[1]} marked KILLED")
        return found

    def _reconcile(self, results: Path) -> tuple[int, int]:
        from mlflow.entities import ViewType

        client = self._connect()
        results = results.resolve()
        own_store = self.uri == default_tracking_uri(results)
        host = socket.gethostname()

        def ours(run) -> bool:
            tags = run.data.tags
            if "results_dir" in tags:
                return tags["results_dir"] == str(results) and tags.get("host", host) == host
            return own_store

        experiments, token = [], None
        while True:
            page = client.search_experiments(view_type=ViewType.ACTIVE_ONLY, max_results=1000,
                                             page_token=token)
            experiments += [e.experiment_id for e in page]
            token = page.token
            if not token:
                break
        stale, token = [], None
        while experiments:
            page = client.search_runs(experiments, filter_string="attributes.status = 'RUNNING'",
                                      max_results=1000, page_token=token)
            stale += [r for r in page if ours(r)]
            token = page.token
            if not token:
                break
        filled = killed = 0
        for run in stale:
            run_id = run.info.run_id
            fingerprint = run.data.tags.get("fingerprint")
            record, folder = None, None
            if run.data.tags.get("kind") == "run" and fingerprint:
                folder = run_dir(results, fingerprint)
                record = load_record(folder / RECORD_FILE)
                if record is not None and (record.get("fingerprint") != fingerprint
                                           or not files_intact(folder, record)):
                    record = None
            if record is None:
                client.set_tag(run_id, "reconciled", "its sweep died before this run was logged")
                client.set_terminated(run_id, status="KILLED")
                killed += 1
            else:
                self._fill(client, run, record, folder)
                filled += 1
        return filled, killed

    def _fill(self, client, run, record: Mapping[str, Any], folder: Path) -> None:
        """Log what ``run`` lacks of ``record`` (keys already there are kept), then end it."""
        from mlflow.entities import Metric

        run_id = run.info.run_id
        have_params, have_metrics = run.data.params, set(run.data.metrics)
        now = int(time.time() * 1000)
        metrics = [Metric(k, v, now, 0) for k, v in run_metrics(record).items()
                   if k not in have_metrics]
        metrics += [Metric(k, v, now, step) for k, v, step in step_metrics(record)
                    if k not in have_metrics]
        params = {k: v for k, v in run_params(record).items() if k not in have_params}
        self._log_batch(run_id, params=params, metrics=metrics)
        tags = {**run_tags(record), "reconciled": "completed from its record after its sweep died"}
        client.log_batch(run_id, tags=[_tag(k, v) for k, v in tags.items()])
        logged = {a.path for a in client.list_artifacts(run_id)}
        for path in _artifacts(folder):
            if path.name not in logged:
                client.log_artifact(run_id, str(path))
        client.set_terminated(run_id, status=_final_status(record))

    def _log_batch(self, run_id: str, params: Mapping[str, str] | None = None, metrics=()) -> None:
        from mlflow.entities import Param

        client = self._connect()
        items = [Param(k, v) for k, v in (params or {}).items()]
        for i in range(0, len(items), _BATCH):
            client.log_batch(run_id, params=items[i:i + _BATCH])
        metrics = list(metrics)
        for i in range(0, len(metrics), 1000):
            client.log_batch(run_id, metrics=metrics[i:i + 1000])

    def known_fingerprints(self) -> set[str]:
        """Fingerprints of the child runs already in this experiment."""
        if self._known is None:
            self._known = self._guard("search", self._search) or set()
        return self._known

    def _search(self) -> set[str]:
        client = self._connect()
        found, token = set(), None
        while True:
            page = client.search_runs([self.experiment_id], filter_string="tags.kind = 'run'",
                                      max_results=1000, page_token=token)
            # A KILLED (or still RUNNING) child holds no finished log of its run.
            found |= {r.data.tags.get("fingerprint") for r in page
                      if r.data.tags.get("fingerprint") and r.info.status in TERMINAL}
            token = page.token
            if not token:
                return found

    def log_existing(self, results: str | os.PathLike, specs: Iterable) -> int:
        """Log completed runs of a resumed sweep that the store does not hold yet."""
        specs = list(specs)
        if not specs or not self.enabled:
            return 0
        known = self.known_fingerprints()
        logged = 0
        for spec in specs:
            if spec.fingerprint in known:
                continue
            folder = run_dir(results, spec.fingerprint)
            record = load_record(folder / RECORD_FILE)
            if record is not None and self.log_run(record, folder):
                logged += 1
        return logged


def _final_status(record: Mapping[str, Any]) -> str:
    return "FINISHED" if record.get("status") == "ok" else "FAILED"


def _artifacts(folder: Path) -> list[Path]:
    """The files of a run folder that its MLflow run holds as artifacts."""
    paths = [folder / RECORD_FILE, folder / MANIFEST_FILE, *sorted(folder.glob("*.png"))]
    return [p for p in paths if p.is_file()]


def _tag(key: str, value: str):
    from mlflow.entities import RunTag

    return RunTag(key, str(value))


class _store_lock:
    """Serialise creating or migrating a local SQLite store: two sweeps that open a new store
    at once race in its schema migration (``duplicate column name``). Other stores: no-op."""

    def __init__(self, uri: str):
        self.lock = None
        if uri.startswith("sqlite:///"):
            from filelock import FileLock

            database = Path(uri[len("sqlite:///"):])
            if database.parent.is_dir():
                self.lock = FileLock(str(database) + ".lock", timeout=120)

    def __enter__(self):
        if self.lock is not None:
            self.lock.acquire()
        return self

    def __exit__(self, *exc):
        if self.lock is not None:
            self.lock.release()
        return False
