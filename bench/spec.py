"""What one benchmark run is: a :class:`RunSpec`, and its fingerprint.

A run is a pure function of its spec: the method (a registered method or a named variant) with
its config overrides, the dataset and category, the noise ratio, the split and training seeds,
the image geometry and the teacher weights. The training budget (epochs, steps) lives in the
method's config, so it is part of the spec through ``config``.

The fingerprint is the SHA-256 of the canonical JSON of every field except ``data_root``: a path
says where the data is on one machine, not what it is (split manifests carry file hashes for
that). The same spec gives the same fingerprint on every machine and Python version, and any
change to a field that matters gives a different one; it names the run's folder in the results
store and is how a resumed sweep recognises finished runs.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any

# Bump only when the meaning of a field changes, so that old fingerprints stop matching.
SPEC_VERSION = 1


@dataclass(frozen=True)
class RunSpec:
    """One run of one method on one category at one noise ratio and seed pair."""

    method: str  # registered method or variant name (e.g. "rd", "cdd", "cdd-t5-k3")
    config: Mapping[str, Any] = field(default_factory=dict)  # overrides of the method's config
    dataset: str = "synthetic"  # mvtec | visa | synthetic
    data_root: str = ""  # where the data is; not part of the fingerprint
    category: str = ""
    noise_ratio: float = 0.0
    split_seed: int = 0
    train_seed: int = 0
    image_size: int = 224  # center crop (evaluation resolution)
    resize_size: int = 256  # resize before the crop
    teacher_weights: str = "imagenet"  # imagenet | random | path to a state_dict file

    def __post_init__(self):
        # Normalise types so that 0 and 0.0, or "1" from a command line, hash the same.
        object.__setattr__(self, "noise_ratio", _canonical_float(self.noise_ratio))
        object.__setattr__(self, "split_seed", int(self.split_seed))
        object.__setattr__(self, "train_seed", int(self.train_seed))
        object.__setattr__(self, "image_size", int(self.image_size))
        object.__setattr__(self, "resize_size", int(self.resize_size))
        object.__setattr__(self, "data_root", str(self.data_root))
        # A read-only copy: a frozen spec must not change under a caller's feet.
        object.__setattr__(self, "config", MappingProxyType(dict(self.config)))

    def __reduce__(self):
        # MappingProxyType does not pickle; rebuild from the plain dict (workers get specs).
        return (RunSpec.from_dict, (self.to_dict(),))

    def __hash__(self) -> int:
        return hash(self.fingerprint)

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, RunSpec):
            return NotImplemented
        return self.to_dict() == other.to_dict()

    def to_dict(self, include_root: bool = True) -> dict[str, Any]:
        """Plain JSON-ready dict (the ``spec`` of a record)."""
        out = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        out["config"] = canonical_value(dict(self.config))
        if not include_root:
            out.pop("data_root")
        return out

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> RunSpec:
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in names})

    def canonical_json(self) -> str:
        """Sorted-key, whitespace-free JSON of everything the result depends on."""
        body = {"spec_version": SPEC_VERSION, **self.to_dict(include_root=False)}
        return json.dumps(canonical_value(body), sort_keys=True, separators=(",", ":"),
                          ensure_ascii=True, allow_nan=False)

    @property
    def fingerprint(self) -> str:
        return hashlib.sha256(self.canonical_json().encode("ascii")).hexdigest()

    @property
    def label(self) -> str:
        """Short human label for progress bars and MLflow run names."""
        return (f"{self.method}/{self.dataset}/{self.category}/r{self.noise_ratio:g}"
                f"/s{self.split_seed}.{self.train_seed}")

    def replace(self, **changes: Any) -> RunSpec:
        return dataclasses.replace(self, **changes)


def _canonical_float(value: Any) -> float:
    number = float(value)
    if not math.isfinite(number):
        raise ValueError(f"non-finite number {value!r} in a run spec")
    return 0.0 if number == 0 else number  # -0.0 and 0.0 are the same setting


def canonical_value(value: Any) -> Any:
    """JSON-ready value with one spelling per meaning.

    Tuples become lists, mapping keys strings, numpy scalars Python numbers and floats their
    shortest round-trip form (what ``repr`` prints), so the JSON text is platform-independent.
    """
    if isinstance(value, Mapping):
        return {str(k): canonical_value(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [canonical_value(v) for v in value]
    if isinstance(value, bool) or value is None or isinstance(value, str):
        return value
    if isinstance(value, int):
        return int(value)
    if isinstance(value, float):
        return _canonical_float(value)
    if hasattr(value, "item") and getattr(value, "ndim", 1) == 0:
        return canonical_value(value.item())  # numpy / torch scalars
    raise TypeError(f"cannot put {type(value).__name__} {value!r} in a run spec")


def same_teacher_name(weights: str) -> str:
    """One name per random teacher: ``random`` and ``random:00`` are ``random:0`` (as
    :func:`methods.backbones.random_teacher_seed` reads them); other weights are returned as
    given. For grouping results, not for specs: fingerprints keep what was written."""
    if weights == "random":
        return "random:0"
    head, _, seed = weights.partition(":")
    return f"random:{int(seed)}" if head == "random" and seed.isdigit() else weights
