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
"""

from __future__ import annotations

import logging
import math
import os
import sys
import time
import warnings
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

from bench.records import RECORD_FILE, load_record, run_dir

EXPERIMENT_PREFIX = "fuad/"
_PARAM_LIMIT = 6000  # MLflow's longest param value; longer values are cut with a marker
_BATCH = 100  # params/tags per log_batch call stay under MLflow's limits


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
                 warn=None):
        self.uri = uri
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
            _quiet_mlflow()
            from mlflow.tracking import MlflowClient

            _quiet_mlflow()  # importing mlflow resets its loggers to INFO

            client = MlflowClient(tracking_uri=self.uri)
            experiment = client.get_experiment_by_name(self.experiment)
            self.experiment_id = (
                experiment.experiment_id if experiment is not None
                else client.create_experiment(self.experiment,
                                              artifact_location=local_artifact_root(self.uri)))
            self._client = client
        return self._client

    # -- sweep
    def start_sweep(self, total: int, todo: int) -> None:
        self._guard("start", self._start, total, todo)

    def _start(self, total: int, todo: int) -> None:
        client = self._connect()
        run = client.create_run(self.experiment_id, run_name=self.sweep_info.get("name"),
                                tags={"kind": "sweep", "preset": str(self.sweep_info.get("preset"))})
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
        tags = {**run_tags(record), "kind": "run"}
        if self.parent_id:
            tags["mlflow.parentRunId"] = self.parent_id
        run = client.create_run(self.experiment_id, run_name=name, tags=tags)
        run_id = run.info.run_id
        now = int(time.time() * 1000)
        metrics = [Metric(k, v, now, 0) for k, v in run_metrics(record).items()]
        metrics += [Metric(k, v, now, step) for k, v, step in step_metrics(record)]
        self._log_batch(run_id, params=run_params(record), metrics=metrics)
        for path in [folder / RECORD_FILE, folder / "manifest.json", *sorted(folder.glob("*.png"))]:
            if path.is_file():
                client.log_artifact(run_id, str(path))
        client.set_terminated(run_id, status="FINISHED" if record.get("status") == "ok" else "FAILED")
        if self._known is not None and record.get("fingerprint"):
            self._known.add(record["fingerprint"])
        return run_id

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
            found |= {r.data.tags.get("fingerprint") for r in page if r.data.tags.get("fingerprint")}
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
