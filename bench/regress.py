"""Metric regression checks: compare a results folder against a committed baseline.

A change to a method or to the harness must not quietly lower detection quality. This module
groups runs by what they compute, summarises each group over its seeds, stores that summary as
a baseline file, and later checks a new results folder against it.

Matching
    Runs are matched by spec, not by fingerprint: the group key is the record's ``spec`` minus
    ``data_root`` (where the data is), ``split_seed`` and ``train_seed`` (what varies inside a
    group), i.e. method, config overrides, dataset, category, noise ratio, image and resize size
    and teacher weights, in canonical JSON. The seed pairs of a group are its runs.

Baseline (JSON, or YAML when the file name ends in .yaml/.yml)::

    {"schema": "fuad-bench-baseline/1", "created": ISO time, "source": {...},
     "k": 3.0, "min_tolerance": 0.005, "rule": "run", "floors": {"i_auroc": 0.6, ...},
     "metrics": [names compared], "protocols": ["no_overlap", "overlap"],
     "groups": [{"label": str, "key": {spec minus seeds}, "seeds": [[split, train], ...],
                 "stats": {protocol: {metric: {"mean", "std", "n"}}},
                 "values": {protocol: {metric: [value per seed, null if undefined]}}}]}

Rule
    ``rule: run`` (the default): every run of a group, i.e. every seed pair, is compared with the
    baseline's group statistics for its protocol and metric. A run regresses when its value is
    below ``mean - max(k * std, min_tolerance)`` or below the metric's absolute floor, if one
    is set; the row of the group names its lowest run. ``std`` is the sample standard deviation
    of single runs over the baseline's seeds (0 with one seed): a run is judged against the
    spread of single runs, as the check is stated.

    ``rule: mean`` (``--rule mean``): the group's mean now is compared with the baseline's mean
    against the same threshold and floor. When only some of the baseline's seeds have results
    now (or extra seeds were run), both means are taken over the seeds both have, from the
    per-seed values the baseline keeps, so that seed-to-seed differences do not shift them; the
    std still comes from all baseline seeds. This is the more forgiving rule: one bad seed
    moves the mean by a third of its drop.

    ``min_tolerance`` keeps a baseline whose std is 0 (one seed, or identical runs) from
    failing on float noise from another BLAS or CPU. A metric that had values and now has none
    (NaN in every run) also regresses. Baseline runs without a result now are "missing" (a
    failed or skipped run) and fail the check unless allowed; runs not in the baseline are
    "extra" and reported; floors still apply to them. A run is "improved" when the
    group mean rises above ``mean + max(k * std, min_tolerance)`` (reported, never a failure).
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from bench.errors import UserError
from bench.identity import SEED_FIELDS, key_id, regress_group_key
from bench.records import (
    METRIC_NAMES,
    PROTOCOLS,
    is_complete,
    iter_records,
    json_ready,
    write_bytes_atomic,
)
from bench.stats import Stat
from bench.util import utc_timestamp

SCHEMA = "fuad-bench-baseline/1"
DEFAULT_K = 3.0
# Absolute slack in metric units (all metrics are in [0, 1]): below any drop worth flagging,
# above the float noise of re-running the same code on another machine.
DEFAULT_MIN_TOLERANCE = 0.005
RULES = ("run", "mean")
DEFAULT_RULE = "run"

OK, REGRESSED, IMPROVED, NEW, UNDEFINED = "ok", "REGRESSED", "improved", "new", "n/a"


# --------------------------------------------------------------------------------------------
# Grouping
# --------------------------------------------------------------------------------------------


def group_label(key: Mapping[str, Any], varying: Iterable[str] = ()) -> str:
    """Short readable name: method[config] dataset/category r<noise>, plus fields that vary."""
    config = key.get("config") or {}
    text = str(key.get("method", "?"))
    if config:
        text += "[" + ",".join(f"{k}={v}" for k, v in sorted(config.items())) + "]"
    text += f" {key.get('dataset', '?')}/{key.get('category', '?')} r{key.get('noise_ratio', 0):g}"
    for name in ("image_size", "resize_size", "teacher_weights"):
        if name in varying:
            text += f" {name}={key.get(name)}"
    return text


def _varying(keys: Sequence[Mapping[str, Any]]) -> set[str]:
    names = {"image_size", "resize_size", "teacher_weights"}
    return {n for n in names if len({json.dumps(k.get(n)) for k in keys}) > 1}


@dataclass
class Group:
    """The runs of one group key in a results folder."""

    key: dict[str, Any]
    seeds: list[tuple[int, int]] = field(default_factory=list)
    records: list[dict] = field(default_factory=list)

    def values(self, protocol: str, metric: str, seeds: Iterable[tuple[int, int]] | None = None
               ) -> list[Any]:
        """The metric of each run (in ``seeds`` order when given), None where undefined."""
        by_seed = dict(zip(self.seeds, self.records))
        chosen = [by_seed[s] for s in seeds] if seeds is not None else self.records
        return [((r.get("metrics") or {}).get(protocol) or {}).get(metric) for r in chosen]

    def stat(self, protocol: str, metric: str,
             seeds: Iterable[tuple[int, int]] | None = None) -> Stat:
        return Stat.of(self.values(protocol, metric, seeds), single_std=0.0)


@dataclass
class Results:
    """A results folder grouped by key: complete runs per group, and the failed ones."""

    groups: dict[str, Group]
    failed: list[dict]

    @classmethod
    def load(cls, results: str | os.PathLike) -> Results:
        base = Path(results)
        if base.exists() and not base.is_dir():
            raise UserError(f"--results {base} is a file, not a folder; pass the --results "
                            "folder a sweep wrote (the one holding runs/)")
        if not base.is_dir():
            raise UserError(f"results folder {base} does not exist; pass the --results folder "
                            "a sweep wrote (the one holding runs/)")
        groups: dict[str, Group] = {}
        failed: list[dict] = []
        for record in iter_records(base):
            if not is_complete(record):
                failed.append(record)
                continue
            try:
                spec = record["spec"]
                key = regress_group_key(spec)
                seeds = (int(spec.get("split_seed", 0)), int(spec.get("train_seed", 0)))
            except (KeyError, TypeError, ValueError) as err:
                raise UserError(f"record {record.get('fingerprint', '?')} under {base} has an "
                                f"unreadable spec ({err}); delete or re-run it") from None
            group = groups.setdefault(key_id(key), Group(key))
            group.seeds.append(seeds)
            group.records.append(record)
        return cls(groups, failed)


def _failed_label(record: dict) -> str:
    spec = record.get("spec") or {}
    try:
        label = group_label(regress_group_key(spec))
    except (TypeError, ValueError):
        label = str(record.get("fingerprint", "?"))
    seeds = tuple(spec.get(f) for f in SEED_FIELDS)
    error = (record.get("error") or {}).get("message") or record.get("status") or "incomplete"
    return f"{label} seeds {seeds}: {str(error).splitlines()[0][:120]}"


# --------------------------------------------------------------------------------------------
# Baseline files
# --------------------------------------------------------------------------------------------


def build_baseline(results: Results, *, k: float = DEFAULT_K,
                   min_tolerance: float = DEFAULT_MIN_TOLERANCE, rule: str = DEFAULT_RULE,
                   floors: Mapping[str, float] | None = None,
                   metrics: Sequence[str] = METRIC_NAMES,
                   protocols: Sequence[str] = PROTOCOLS, source: str = "") -> dict[str, Any]:
    """A baseline holding, per group, protocol and metric, the mean, std and n over seeds."""
    _check_settings(k, min_tolerance, floors or {}, metrics, "the new baseline", rule)
    if not results.groups:
        raise UserError(f"no complete run in {source or 'the results folder'}; run the sweep "
                        "before writing a baseline")
    varying = _varying([g.key for g in results.groups.values()])
    groups = []
    for ident in sorted(results.groups):
        group = results.groups[ident]
        seeds = sorted(group.seeds)
        groups.append({
            "label": group_label(group.key, varying),
            "key": group.key,
            "seeds": [list(s) for s in seeds],
            "stats": {p: {m: group.stat(p, m).to_dict() for m in metrics} for p in protocols},
            # Per-seed values, so that a check with some seeds missing compares like with like.
            "values": {p: {m: [_finite_or_none(v) for v in group.values(p, m, seeds)]
                           for m in metrics} for p in protocols},
        })
    commits = sorted({str((r.get("environment") or {}).get("commit"))
                      for g in results.groups.values() for r in g.records} - {"None"})
    return {
        "schema": SCHEMA,
        "created": utc_timestamp(),
        "source": {"results": source, "runs": sum(len(g.records) for g in results.groups.values()),
                   "commits": commits},
        "k": float(k),
        "min_tolerance": float(min_tolerance),
        "rule": rule,
        "floors": {m: float(v) for m, v in sorted((floors or {}).items())},
        "metrics": list(metrics),
        "protocols": list(protocols),
        "groups": groups,
    }


def _finite_or_none(value: Any) -> float | None:
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    return float(value) if ok else None


def _check_settings(k: float, min_tolerance: float, floors: Mapping[str, float],
                    metrics: Sequence[str], where: str, rule: str = DEFAULT_RULE) -> None:
    if rule not in RULES:
        raise UserError(f"rule={rule!r} in {where} must be one of {', '.join(RULES)}")
    if not (math.isfinite(k) and k >= 0):
        raise UserError(f"k={k} in {where} must be a number >= 0 (default {DEFAULT_K})")
    if not (math.isfinite(min_tolerance) and min_tolerance >= 0):
        raise UserError(f"min_tolerance={min_tolerance} in {where} must be a number >= 0")
    for name in list(metrics) + list(floors):
        if name not in METRIC_NAMES:
            raise UserError(f"unknown metric {name!r} in {where}; choose from "
                            f"{', '.join(METRIC_NAMES)}")
    for name, value in floors.items():
        if not (isinstance(value, (int, float)) and math.isfinite(value)):
            raise UserError(f"floor of {name} in {where} is {value!r}; give a number in [0, 1]")


def write_baseline(path: str | os.PathLike, baseline: Mapping[str, Any]) -> None:
    """Write atomically: JSON, or YAML when the name ends in .yaml/.yml."""
    path = Path(path)
    check_writable_file(path, "baseline")
    if path.suffix.lower() in (".yaml", ".yml"):
        import yaml

        text = yaml.safe_dump(json_ready(baseline), sort_keys=False, width=100)
    else:
        text = json.dumps(baseline, indent=2, allow_nan=False) + "\n"
    write_bytes_atomic(path, text.encode("utf-8"))


def check_writable_file(path: Path, what: str) -> None:
    """``path`` can be written as a file: not a folder, and its folder exists (or can be made
    where a folder, not a file, is in the way)."""
    if path.is_dir():
        raise UserError(f"{what} {path} is a folder; give a file path, e.g. "
                        f"{path / ('ci.json' if what == 'baseline' else 'comparison.json')}")
    ancestor = path.parent
    while not ancestor.exists() and ancestor != ancestor.parent:
        ancestor = ancestor.parent
    if not ancestor.is_dir():
        raise UserError(f"{what} {path} cannot be written: {ancestor} is a file, not a folder")
    if not os.access(ancestor, os.W_OK):
        raise UserError(f"{what} {path} cannot be written: {ancestor} is not writable")


def load_baseline(path: str | os.PathLike) -> dict[str, Any]:
    """A validated baseline; a missing or malformed file is a :class:`UserError`."""
    path = Path(path)
    if path.is_dir():
        raise UserError(f"baseline {path} is a folder; give the baseline file, e.g. "
                        f"{path / 'ci.json'}")
    if not path.is_file():
        raise UserError(f"baseline {path} does not exist; create it from a results folder with "
                        "'run_benchmark.py regress --results DIR --baseline FILE --update'")
    import yaml

    try:
        text = path.read_text(encoding="utf-8")
        if path.suffix.lower() in (".yaml", ".yml"):
            data = yaml.safe_load(text)
        else:
            data = json.loads(text)
    except (UnicodeDecodeError, json.JSONDecodeError, yaml.YAMLError) as err:
        raise UserError(f"baseline {path} is not valid {path.suffix[1:] or 'JSON'} "
                        f"({str(err).splitlines()[0]}); restore it or rewrite it with --update"
                        ) from None
    if not isinstance(data, dict) or data.get("schema") != SCHEMA:
        raise UserError(f"baseline {path} is not a {SCHEMA} file; rewrite it with --update")
    try:
        _check_settings(float(data["k"]), float(data["min_tolerance"]), data["floors"],
                        data["metrics"], f"baseline {path}", data.get("rule", DEFAULT_RULE))
        for group in data["groups"]:
            if not isinstance(group["key"], dict) or not isinstance(group["stats"], dict):
                raise TypeError("'key'/'stats' of a group")
            group["seeds"] = [tuple(int(x) for x in s) for s in group["seeds"]]
    except (KeyError, TypeError, ValueError) as err:
        raise UserError(f"baseline {path} lacks or mangles field {err}; rewrite it with "
                        "--update") from None
    return data


# --------------------------------------------------------------------------------------------
# Comparison
# --------------------------------------------------------------------------------------------


@dataclass
class Row:
    """One group, protocol and metric: baseline vs now."""

    label: str
    protocol: str
    metric: str
    base: Stat | None
    now: Stat | None
    threshold: float | None
    status: str
    reason: str = ""
    lowest: float | None = None  # the lowest single run now (rule "run")

    @property
    def delta(self) -> float | None:
        if self.base is None or self.now is None or self.base.mean is None or self.now.mean is None:
            return None
        return self.now.mean - self.base.mean


@dataclass
class Comparison:
    rows: list[Row]
    missing: list[str]  # baseline runs with no complete result now
    extra: list[str]  # runs now that the baseline does not have
    failed: list[str]  # failed or incomplete records in the results folder
    k: float
    min_tolerance: float
    allow_missing: bool = False
    rule: str = DEFAULT_RULE

    @property
    def regressions(self) -> list[Row]:
        return [r for r in self.rows if r.status == REGRESSED]

    @property
    def passed(self) -> bool:
        return not self.regressions and (self.allow_missing or not self.missing)


def _judge(base: Stat | None, now: Stat, k: float, min_tol: float, floor: float | None,
           runs: Sequence[tuple[tuple[int, int], Any]] | None = None,
           floor_runs: Sequence[tuple[tuple[int, int], Any]] | None = None,
           shown_base: Stat | None = None) -> tuple[float | None, str, str]:
    """Threshold, status and reason for one metric.

    ``runs`` ((seed pair, value) per run) selects the per-run rule: the lowest finite run is
    judged against the threshold, the lowest of ``floor_runs`` (default ``runs``) against the
    floor; without ``runs`` the group mean is judged. ``shown_base`` is the baseline stat over
    the seeds compared (for "improved"); it defaults to ``base``.
    """
    tolerance = max(k * (base.std or 0.0), min_tol) if base is not None else 0.0
    lower = None
    if base is not None and base.mean is not None:
        lower = base.mean - tolerance
    if floor is not None:
        lower = floor if lower is None else max(lower, floor)
    if now.mean is None:
        if base is not None and base.mean is not None:
            return lower, REGRESSED, "no value now (NaN in every run)"
        return lower, UNDEFINED, ""

    def lowest(candidates):
        finite = [(v, tuple(seeds)) for seeds, v in candidates if _finite_or_none(v) is not None]
        if not finite:
            return None, ""
        value, seeds = min(finite)
        return value, f"run {seeds} at {value:.4f}"

    if runs is None:
        judged, who = now.mean, "mean"
        floored, floor_who = judged, who
    else:
        judged, who = lowest(runs)
        floored, floor_who = lowest(floor_runs if floor_runs is not None else runs)
    if floor is not None and floored is not None and floored < floor:
        return lower, REGRESSED, f"{floor_who} below floor {floor:g}"
    if base is None or base.mean is None:
        return lower, NEW, ""
    if judged is not None and judged < base.mean - tolerance:
        why = "k*std" if k * (base.std or 0.0) >= min_tol else "min tolerance"
        return lower, REGRESSED, f"{who} below mean - {why}"
    shown = shown_base if shown_base is not None and shown_base.mean is not None else base
    if now.mean > shown.mean + tolerance:
        return lower, IMPROVED, ""
    return lower, OK, ""


def _base_stat(group: Mapping[str, Any] | None, protocol: str, metric: str,
               seeds: list[tuple[int, int]] | None) -> Stat | None:
    """The baseline's stat; its mean over ``seeds`` only when given (std from all seeds)."""
    if group is None:
        return None
    raw = (group["stats"].get(protocol) or {}).get(metric)
    if raw is None:
        return None
    stat = Stat(raw.get("mean"), raw.get("std"), int(raw.get("n", 0)))
    values = ((group.get("values") or {}).get(protocol) or {}).get(metric)
    if seeds is not None and values is not None and len(values) == len(group["seeds"]):
        by_seed = dict(zip(map(tuple, group["seeds"]), values))
        sub = Stat.of((by_seed[s] for s in seeds), single_std=0.0)
        stat = Stat(sub.mean, stat.std, sub.n)
    return stat


def compare(baseline: Mapping[str, Any], results: Results, *, k: float | None = None,
            min_tolerance: float | None = None, floors: Mapping[str, float] | None = None,
            metrics: Sequence[str] | None = None, allow_missing: bool = False,
            rule: str | None = None) -> Comparison:
    """Compare results with a baseline; settings not given come from the baseline."""
    k = float(baseline.get("k", DEFAULT_K)) if k is None else float(k)
    min_tol = (float(baseline.get("min_tolerance", DEFAULT_MIN_TOLERANCE))
               if min_tolerance is None else float(min_tolerance))
    all_floors = {**(baseline.get("floors") or {}), **(floors or {})}
    names = list(metrics) if metrics else list(baseline.get("metrics") or METRIC_NAMES)
    rule = rule or baseline.get("rule") or DEFAULT_RULE
    _check_settings(k, min_tol, all_floors, names, "the regression settings", rule)
    protocols = list(baseline.get("protocols") or PROTOCOLS)

    base_groups = {key_id(g["key"]): g for g in baseline.get("groups", [])}
    varying = _varying([g["key"] for g in base_groups.values()]
                       + [g.key for g in results.groups.values()])
    rows: list[Row] = []
    missing: list[str] = []
    extra: list[str] = []
    for ident in sorted(set(base_groups) | set(results.groups)):
        b = base_groups.get(ident)
        now = results.groups.get(ident)
        label = group_label(b["key"] if b else now.key, varying)
        base_seeds = set(map(tuple, b["seeds"])) if b else set()
        now_seeds = set(now.seeds) if now else set()
        missing += [f"{label} seeds {s}" for s in sorted(base_seeds - now_seeds)]
        extra += [f"{label} seeds {s}" for s in sorted(now_seeds - base_seeds)]
        if now is None:
            continue
        # With some baseline seeds missing (or extra seeds run), compare the seeds both have:
        # seed-to-seed differences would otherwise shift the means.
        common = sorted(base_seeds & now_seeds)
        partial = bool(common) and (common != sorted(base_seeds) or common != sorted(now_seeds))
        for protocol in protocols:
            for metric in names:
                base_stat = _base_stat(b, protocol, metric, common if partial else None)
                stat = now.stat(protocol, metric, common if partial else None)
                # A single run is judged against the statistics of all the baseline's runs.
                reference = _base_stat(b, protocol, metric, None) if rule == "run" else base_stat
                # Per run: the threshold for the seeds the baseline has (extra seeds have no
                # baseline value to be compared with), the floor for every run now.
                runs = floor_runs = None
                if rule == "run":
                    floor_runs = list(zip(now.seeds, now.values(protocol, metric)))
                    runs = [(seeds, v) for seeds, v in floor_runs if seeds in base_seeds]
                threshold, status, reason = _judge(reference, stat, k, min_tol,
                                                   all_floors.get(metric), runs, floor_runs,
                                                   shown_base=base_stat)
                lowest = min((_finite_or_none(v) for _, v in floor_runs or ()
                              if _finite_or_none(v) is not None), default=None)
                rows.append(Row(label, protocol, metric, base_stat, stat, threshold, status,
                                reason, lowest))
    failed = [_failed_label(r) for r in results.failed]
    return Comparison(rows, missing, extra, failed, k, min_tol, allow_missing, rule)


# --------------------------------------------------------------------------------------------
# Output
# --------------------------------------------------------------------------------------------


def _fmt_stat(stat: Stat | None) -> str:
    if stat is None or stat.mean is None:
        return "-"
    return f"{stat.mean:.4f}±{stat.std or 0.0:.4f} (n={stat.n})"


def format_table(comparison: Comparison, only_problems: bool = False) -> str:
    """Baseline vs now, one line per group, protocol and metric, then a summary."""
    rows = [r for r in comparison.rows if not only_problems or r.status == REGRESSED]
    per_run = comparison.rule == "run"
    head = ("group", "protocol", "metric", "baseline", "now", "delta",
            *(("lowest run",) if per_run else ()), "threshold", "status")
    table = [head]
    for r in rows:
        delta = "-" if r.delta is None else f"{r.delta:+.4f}"
        threshold = "-" if r.threshold is None else f"{r.threshold:.4f}"
        status = r.status + (f" ({r.reason})" if r.reason else "")
        lowest = (("-" if r.lowest is None else f"{r.lowest:.4f}",) if per_run else ())
        table.append((r.label, r.protocol, r.metric, _fmt_stat(r.base), _fmt_stat(r.now),
                      delta, *lowest, threshold, status))
    widths = [max(len(row[i]) for row in table) for i in range(len(head))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(row, widths)).rstrip() for row in table]
    lines.insert(1, "  ".join("-" * w for w in widths))
    out = lines if len(table) > 1 else []
    for title, items in (("missing runs (in the baseline, no complete result now)",
                          comparison.missing),
                         ("failed runs", comparison.failed),
                         ("extra runs (not in the baseline)", comparison.extra)):
        if items:
            out.append(f"{title}: {len(items)}")
            out += [f"  {item}" for item in items]
    n_reg = len(comparison.regressions)
    names = sorted({f"{r.label} {r.protocol} {r.metric}" for r in comparison.regressions})
    summary = (f"{len(comparison.rows)} comparisons (rule {comparison.rule}, k={comparison.k:g}, "
               f"min tolerance {comparison.min_tolerance:g}): {n_reg} regressed, {len(comparison.missing)} "
               f"missing, {len(comparison.extra)} extra")
    out.append(summary)
    out += [f"REGRESSED: {n}" for n in names]
    if comparison.missing and comparison.allow_missing:
        out.append("missing runs allowed (--allow-missing)")
    out.append("PASS" if comparison.passed else "FAIL")
    return "\n".join(out)


def comparison_dict(comparison: Comparison) -> dict[str, Any]:
    """JSON-ready form of a comparison (for CI artefacts)."""
    return {
        "passed": comparison.passed,
        "rule": comparison.rule,
        "k": comparison.k,
        "min_tolerance": comparison.min_tolerance,
        "rows": [{"group": r.label, "protocol": r.protocol, "metric": r.metric,
                  "baseline": r.base.to_dict() if r.base else None,
                  "now": r.now.to_dict() if r.now else None, "delta": r.delta,
                  "lowest_run": r.lowest, "threshold": r.threshold, "status": r.status,
                  "reason": r.reason}
                 for r in comparison.rows],
        "missing": comparison.missing,
        "extra": comparison.extra,
        "failed": comparison.failed,
    }
