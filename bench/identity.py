"""What makes two runs "the same", one answer per question the harness asks.

- **Fingerprint** (:func:`fingerprint`): the run itself. The SHA-256 of the spec's canonical
  JSON (everything but ``data_root``); names the run's folder, so a resumed sweep finds its
  finished runs. Defined by :class:`bench.spec.RunSpec`.
- **Training identity** (:func:`training_identity`): what a run trains and evaluates. Two specs
  whose method and variant names resolve to the same registered method with the same full
  config, on the same data, split, seeds, geometry and teacher, give the same result, so a
  sweep trains one of them (:mod:`bench.twins`).
- **Regression group** (:func:`regress_group_key`): what a metric is compared across. The spec
  without ``data_root`` and the seeds, so the runs of a group are its seed pairs
  (:mod:`bench.regress`).

Every config is resolved by :func:`methods.base.resolve_config`, through :func:`resolved_config`
here; nothing else merges overrides.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping
from typing import Any

from bench.records import is_complete
from bench.spec import RunSpec, canonical_value, same_teacher_name

_NOT_TRAINING = ("method", "config", "data_root")  # replaced by the resolved method and config
SEED_FIELDS = ("split_seed", "train_seed")
_NOT_IN_GROUP = ("data_root", *SEED_FIELDS)


def fingerprint(spec: RunSpec) -> str:
    """The run's fingerprint (see the module docstring)."""
    return spec.fingerprint


def resolved_config(spec: RunSpec) -> tuple[str, Any]:
    """(registered method, its full typed config) for ``spec``."""
    from methods.base import resolve_config

    return resolve_config(spec.method, spec.config, dataset=spec.dataset,
                          category=spec.category)


def _training_hash(method: str, resolved: Mapping[str, Any], spec: Mapping[str, Any]) -> str:
    body = {"method": method, "config": canonical_value(resolved),
            **{k: v for k, v in spec.items() if k not in _NOT_TRAINING}}
    body["teacher_weights"] = same_teacher_name(str(body.get("teacher_weights")))
    text = json.dumps(canonical_value(body), sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def training_identity(spec: RunSpec) -> str | None:
    """The hash of what ``spec`` trains and evaluates; None when its method cannot be resolved
    (the run then fails on its own, with its own message)."""
    import dataclasses

    try:
        method, config = resolved_config(spec)
    except Exception:  # noqa: BLE001 - an unknown method or bad value is the run's own error
        return None
    return _training_hash(method, dataclasses.asdict(config), spec.to_dict())


def record_training_identity(record: Mapping[str, Any]) -> str | None:
    """The training identity of a complete record (from its spec and resolved config)."""
    from methods.base import resolve_method

    spec, resolved = record.get("spec"), record.get("resolved_config")
    if not is_complete(record) or not isinstance(spec, Mapping) or resolved is None:
        return None
    try:
        method, _ = resolve_method(str(spec["method"]))
        return _training_hash(method, resolved, spec)
    except Exception:  # noqa: BLE001 - a record of a method not registered here: not reusable
        return None


def regress_group_key(spec: Mapping[str, Any]) -> dict[str, Any]:
    """The spec fields that define a regression group: all but the data path and the seeds."""
    canonical = RunSpec.from_dict(spec).to_dict(include_root=False)
    return {k: canonical_value(v) for k, v in canonical.items() if k not in _NOT_IN_GROUP}


def key_id(key: Mapping[str, Any]) -> str:
    """One string per group key (canonical JSON), used to match baseline and results."""
    return json.dumps(canonical_value(dict(key)), sort_keys=True, separators=(",", ":"))
