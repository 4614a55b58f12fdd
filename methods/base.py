"""The Method contract and the method registry.

A method owns its training loop, because some methods (CDD) need the whole training set every
epoch. The runner hands it a :class:`TrainSet` (images only: a method never learns which training
images are injected anomalies) and later calls :meth:`Method.predict` on test images. A method
never computes metrics.

Images cross the boundary as ``uint8`` tensors of shape (N, 3, H, W), already resized and cropped
by the dataset pipeline; each method normalises them as its backbone expects. Predictions come
back as numpy arrays: one score per image and one anomaly map per image at the input size.

Adding a method = one module that defines a ``Method`` subclass decorated with
``@register_method`` (and its config dataclass), plus its module name in
:mod:`methods.registry_loader` (or ``run --plugin module``). Everything generic code needs to
know about a method comes from the class: its report column (``display_name``, ``paper_name``,
``column_rank``), the setup the paper ran (``paper_setup``), a config that makes a smoke run
cheap (``smoke_overrides``) and what its per-sample logs mean (:meth:`Method.diagnostics`).

A *variant* is a named configuration of a registered method (an ablation row, a protocol):
:func:`register_variant`. Sweep presets (YAML files in ``bench/presets``) are something else:
a list of runs.
"""

from __future__ import annotations

import abc
import dataclasses
import math
import typing
from collections.abc import Callable, Hashable, Mapping
from dataclasses import dataclass, field
from typing import Any, ClassVar, Protocol

import numpy as np
import torch

from bench.errors import UserError


@dataclass(frozen=True)
class TrainSet:
    """Training images as the method sees them: pixels and stable names, nothing else.

    The runner passes opaque names (``train-00000``, ... in the split's shuffled order), never
    file paths, which would give away the injected images (they live under ``test/``).
    """

    images: torch.Tensor  # uint8, (N, 3, H, W)
    names: tuple[str, ...]

    def __post_init__(self):
        if self.images.dtype != torch.uint8 or self.images.ndim != 4 or self.images.shape[1] != 3:
            raise ValueError(
                f"TrainSet.images must be a uint8 tensor (N, 3, H, W), got "
                f"{self.images.dtype} {tuple(self.images.shape)}"
            )
        if len(self.names) != self.images.shape[0]:
            raise ValueError("TrainSet.names must have one entry per image")

    def __len__(self) -> int:
        return int(self.images.shape[0])


def check_image_batch(images: torch.Tensor, where: str) -> None:
    """Raise if ``images`` is not a uint8 batch (N, 3, H, W), the contract's input."""
    if images.dtype != torch.uint8 or images.ndim != 4 or images.shape[1] != 3:
        raise ValueError(
            f"{where} expects uint8 images (N, 3, H, W), got {images.dtype} {tuple(images.shape)}"
        )


@dataclass(frozen=True)
class Prediction:
    """What :meth:`Method.predict` returns."""

    scores: np.ndarray  # float32, (N,)  image-level anomaly scores (higher = more anomalous)
    maps: np.ndarray  # float32, (N, H, W) anomaly maps at the input image size


class EpochObserver(Protocol):
    """Receives per-epoch logs from :meth:`Method.fit`.

    ``scalars`` are step metrics (loss, r(e), lambda(e), K, ...). ``per_sample`` maps a name to an
    array with one value per training image, in TrainSet order (e.g. CDD's confidence scores and
    high-confidence membership). The runner, which holds the injected flags, turns those into
    diagnostics; the method never sees the flags.
    """

    def __call__(
        self,
        epoch: int,
        scalars: Mapping[str, float],
        per_sample: Mapping[str, np.ndarray] | None = None,
    ) -> None: ...


def mean_by_group(per_sample: Mapping[str, np.ndarray], injected: np.ndarray) -> dict[str, float]:
    """Mean of each per-sample array over the injected and over the normal training images
    (``<name>/mean_injected``, ``<name>/mean_normal``); arrays of another length are skipped."""
    injected = np.asarray(injected, dtype=bool)
    out = {}
    for name, values in per_sample.items():
        values = np.asarray(values, dtype=np.float64).reshape(-1)
        if values.shape[0] != injected.shape[0]:
            continue
        if injected.any():
            out[f"{name}/mean_injected"] = float(values[injected].mean())
        if (~injected).any():
            out[f"{name}/mean_normal"] = float(values[~injected].mean())
    return out


class Method(abc.ABC):
    """Base class of every anomaly detection method.

    Subclasses set ``name`` and ``Config`` (a frozen dataclass whose defaults are the paper's
    values) and implement ``fit``, ``predict``, ``state_dict`` and ``load_state_dict``. The other
    class attributes have defaults; set them so reports and tools need no special case:

    - ``display_name``: the report's column title (default: ``name``);
    - ``paper_name``: the CDD paper's column label of this method, whose published values the
      report shows beside ours (None: not in the paper);
    - ``column_rank``: position among the report's columns, the paper's order (RD 10,
      ReContrast 20, URD 30, SoftPatch 40, PatchCore 50, InReaCh 60, FUN-AD 70, CDD 90); a new
      method defaults to 80, after the baselines and before CDD;
    - ``paper_setup``: config values of the paper's own runs (e.g. ``{"epochs": 200}``); a
      record whose resolved config differs is flagged as not paper-comparable;
    - ``smoke_overrides``: config overrides that make a run take seconds on a CPU at 64 px
      (benchmarks, smoke checks), never a paper setting;
    - ``category_overrides``: config defaults that the official code sets per dataset and
      category (``{"mvtec": {"cable": {"iterations": 10000}, "*": {...}}}``; ``"*"`` is the
      dataset's default, a category's own entry wins). They apply to a run of that dataset
      and category for every field its spec does not set (:func:`resolve_config`).
    """

    name: ClassVar[str]
    Config: ClassVar[type]
    display_name: ClassVar[str | None] = None
    paper_name: ClassVar[str | None] = None
    column_rank: ClassVar[int] = 80
    paper_setup: ClassVar[Mapping[str, Any]] = {}
    smoke_overrides: ClassVar[Mapping[str, Any]] = {}
    category_overrides: ClassVar[Mapping[str, Mapping[str, Mapping[str, Any]]]] = {}

    @classmethod
    def defaults_for(cls, dataset: str | None, category: str | None) -> dict[str, Any]:
        """The ``category_overrides`` that apply to ``dataset``/``category`` (may be empty)."""
        table = cls.category_overrides.get(dataset or "", {})
        return {**table.get("*", {}), **table.get(category or "", {})}

    @classmethod
    def weights_check(cls, config: Any, teacher_weights: str
                      ) -> tuple[Hashable, Callable[[], object]] | None:
        """What ``fit`` will load that may be unavailable (a download offline, a wrong file):
        a key (equal keys load the same thing) and a function that loads it or raises a
        one-line UserError; None when there is nothing to check. The driver calls it for the
        runs that will train, once per key, before any of them starts."""
        return None

    @classmethod
    def geometry_check(cls, config: Any, image_size: int, resize_size: int) -> None:
        """Raise a one-line UserError when this method cannot run on images cropped to
        ``image_size`` (e.g. a network that halves the resolution five times needs multiples
        of 32). The driver calls it for the runs that will train, before any of them starts,
        so the sweep stops with exit 2 instead of failing each run; ``fit`` may check again.
        The default accepts every size."""
        return None

    @classmethod
    def config_from_dict(cls, values: Mapping[str, Any]) -> Any:
        """The config saved in a state_dict or record (JSON lists back to tuples, types checked)."""
        return build_config(cls.Config, values, cls.name)

    @classmethod
    def label(cls) -> str:
        """The report's column title."""
        return cls.display_name or cls.name

    @classmethod
    def diagnostics(cls, per_sample: Mapping[str, np.ndarray], injected: np.ndarray,
                    config: Any) -> dict[str, float]:
        """What one epoch's per-sample logs (``fit``'s observer) say about the injected images.

        Runs in the runner, which holds the injected flags; ``fit`` never sees them. The
        default is :func:`mean_by_group`; a method overrides it with what its logs mean.
        """
        return mean_by_group(per_sample, injected)

    def __init__(
        self,
        config: Any = None,
        *,
        teacher_weights: str = "imagenet",
        device: str | torch.device = "cpu",
        seed: int = 0,
    ):
        self.config = config if config is not None else self.Config()
        self.teacher_weights = teacher_weights
        self.device = torch.device(device)
        self.seed = int(seed)

    @abc.abstractmethod
    def fit(self, train: TrainSet, observer: EpochObserver | None = None) -> None:
        """Train on ``train`` (the noisy training set, unlabeled)."""

    @abc.abstractmethod
    def predict(self, images: torch.Tensor, batch_size: int = 32) -> Prediction:
        """Score uint8 images (N, 3, H, W); maps come back at (H, W)."""

    @abc.abstractmethod
    def state_dict(self) -> dict[str, Any]:
        """Everything needed to predict again after :meth:`load_state_dict`."""

    @abc.abstractmethod
    def load_state_dict(self, state: Mapping[str, Any]) -> None: ...

    def describe(self) -> dict[str, Any]:
        """Provenance that travels with every result (teacher weights, backbone, ...)."""
        return {
            "method": self.name,
            "teacher_weights": self.teacher_weights,
            "config": dataclasses.asdict(self.config),
        }


# --------------------------------------------------------------------------------------------
# Registry of methods and of their named variants (ablation rows, protocols).

_METHODS: dict[str, type[Method]] = {}


@dataclass(frozen=True)
class MethodVariant:
    """A named configuration of a registered method, e.g. one row of an ablation table.

    ``label``: its report column title when it should not share the method's (default: the
    method's ``display_name``).
    """

    name: str
    method: str
    overrides: Mapping[str, Any] = field(default_factory=dict)
    description: str = ""
    label: str | None = None


_VARIANTS: dict[str, MethodVariant] = {}


def register_method(cls: type[Method]) -> type[Method]:
    """Class decorator: make a Method available by its ``name``."""
    if not dataclasses.is_dataclass(getattr(cls, "Config", None)):
        raise TypeError(f"{cls.__name__}.Config must be a dataclass")
    if cls.name in _METHODS and _METHODS[cls.name] is not cls:
        raise ValueError(f"method {cls.name!r} registered twice")
    _METHODS[cls.name] = cls
    return cls


def register_variant(
    name: str, method: str, overrides: Mapping[str, Any] | None = None, description: str = "",
    label: str | None = None,
) -> MethodVariant:
    """Register a named config of ``method`` (validated now, so a typo fails at import)."""
    if name in _METHODS or (name in _VARIANTS and _VARIANTS[name].method != method):
        raise ValueError(f"variant name {name!r} is already taken")
    variant = MethodVariant(name, method, dict(overrides or {}), description, label)
    make_config(method, variant.overrides)  # validate field names and types
    _VARIANTS[name] = variant
    return variant


def available_methods() -> list[str]:
    return sorted(_METHODS)


def available_variants() -> list[MethodVariant]:
    return [_VARIANTS[k] for k in sorted(_VARIANTS)]


def get_method_class(name: str) -> type[Method]:
    try:
        return _METHODS[name]
    except KeyError:
        known = ", ".join(available_methods() + [v.name for v in available_variants()])
        raise UserError(
            f"unknown method {name!r}; known methods and variants: {known} "
            f"(run `run_benchmark.py list`)"
        ) from None


def get_variant(name: str) -> MethodVariant | None:
    return _VARIANTS.get(name)


def is_known(name: str) -> bool:
    """Whether ``name`` is a registered method or variant."""
    return name in _METHODS or name in _VARIANTS


def resolve_method(name: str) -> tuple[str, dict[str, Any]]:
    """Map a method or variant name to (registered method name, config overrides)."""
    variant = _VARIANTS.get(name)
    if variant is not None:
        return variant.method, dict(variant.overrides)
    get_method_class(name)
    return name, {}


def resolve_config(name: str, overrides: Mapping[str, Any] | None = None, *,
                   dataset: str | None = None, category: str | None = None) -> tuple[str, Any]:
    """(registered method, its full typed config) for a method or variant name: the one place
    a run's config is resolved. Lowest first: the config's defaults, the method's own per
    dataset/category defaults (``category_overrides``), the variant's overrides, ``overrides``
    (a spec's config)."""
    method, variant_overrides = resolve_method(name)
    per_category = get_method_class(method).defaults_for(dataset, category)
    return method, make_config(method, {**per_category, **variant_overrides,
                                        **dict(overrides or {})})


@dataclass(frozen=True)
class MethodFacts:
    """What reports need to know of a method or variant name (from its method's class)."""

    label: str  # column title
    paper_name: str | None  # the paper's column label, None when the paper has no column
    rank: int  # column order
    paper_setup: Mapping[str, Any]  # config values of the paper's runs
    description: str = ""  # a variant's description


def method_facts(name: str) -> MethodFacts:
    """Report facts of a method or variant name; a name not registered here (a record of a
    plugin not loaded) keeps its own name, the default rank and no paper setup."""
    variant = _VARIANTS.get(name)
    cls = _METHODS.get(variant.method if variant else name)
    if cls is None:
        return MethodFacts(name, None, Method.column_rank, {})
    label = (variant.label if variant and variant.label else None) or cls.label()
    return MethodFacts(label, cls.paper_name, cls.column_rank, dict(cls.paper_setup),
                       variant.description if variant else "")


# Former names of the variant API, kept so that plugins written against them keep working.
MethodPreset = MethodVariant
register_preset = register_variant
available_presets = available_variants
get_preset = get_variant


# --------------------------------------------------------------------------------------------
# Typed configs: overrides (from variants, sweep YAML or `--set key=value`) are checked against the
# dataclass fields, so a typo or a wrong type stops with one line instead of a silent default.


def config_fields(method: str) -> list[dataclasses.Field]:
    return list(dataclasses.fields(get_method_class(method).Config))


def make_config(method: str, overrides: Mapping[str, Any] | None = None) -> Any:
    """Build ``method``'s Config with ``overrides`` applied and type-checked."""
    return build_config(get_method_class(method).Config, overrides, method)


def build_config(cls: type, overrides: Mapping[str, Any] | None, method: str) -> Any:
    """Config dataclass ``cls`` from ``overrides``, each value coerced to its field's type
    (strings from the command line, lists from JSON become tuples)."""
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    values = {}
    for key, value in (overrides or {}).items():
        if key not in names:
            raise UserError(
                f"{method} has no config field {key!r}; fields: {', '.join(sorted(names))}"
            )
        values[key] = coerce_value(value, hints[key], f"{method}.{key}")
    return cls(**values)


def coerce_value(value: Any, annotation: Any, where: str) -> Any:
    """Convert ``value`` (possibly a string from the command line) to ``annotation``."""
    origin = typing.get_origin(annotation)
    args = typing.get_args(annotation)
    if annotation is Any:
        return value
    if origin in (typing.Union, getattr(__import__("types"), "UnionType", object)):
        if value is None or (isinstance(value, str) and value.lower() in ("none", "null")):
            if type(None) in args:
                return None
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return coerce_value(value, arg, where)
            except UserError as err:
                errors.append(str(err))
        raise UserError(f"bad value {value!r} for {where}: expected {_type_name(annotation)}")
    if origin is typing.Literal:
        for arg in args:
            try:
                candidate = coerce_value(value, type(arg), where)
            except UserError:
                continue
            if candidate == arg:
                return arg
        raise UserError(
            f"bad value {value!r} for {where}: expected one of {', '.join(map(repr, args))}"
        )
    if origin in (tuple, list):
        items = value
        if isinstance(value, str):
            text = value.strip().strip("[]()")
            items = [v.strip() for v in text.split(",") if v.strip()] if text else []
        if not isinstance(items, (list, tuple)):
            raise UserError(f"bad value {value!r} for {where}: expected {_type_name(annotation)}")
        if origin is tuple and args and args[-1] is not Ellipsis:
            if len(items) != len(args):
                raise UserError(
                    f"bad value {value!r} for {where}: expected {len(args)} values"
                )
            return tuple(coerce_value(v, a, where) for v, a in zip(items, args))
        inner = args[0] if args else Any
        converted = [coerce_value(v, inner, where) for v in items]
        return tuple(converted) if origin is tuple else converted
    if annotation is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "1", "yes", "on"):
            return True
        if isinstance(value, str) and value.lower() in ("false", "0", "no", "off"):
            return False
        raise UserError(f"bad value {value!r} for {where}: expected true or false")
    if annotation is int:
        if isinstance(value, bool):
            raise UserError(f"bad value {value!r} for {where}: expected an integer")
        try:
            as_float = float(value)
        except (TypeError, ValueError):
            raise UserError(f"bad value {value!r} for {where}: expected an integer") from None
        if not as_float.is_integer():
            raise UserError(f"bad value {value!r} for {where}: expected an integer")
        return int(as_float)
    if annotation is float:
        if isinstance(value, bool):
            raise UserError(f"bad value {value!r} for {where}: expected a number")
        try:
            number = float(value)
        except (TypeError, ValueError):
            raise UserError(f"bad value {value!r} for {where}: expected a number") from None
        if not math.isfinite(number):
            # No config field means "unbounded" by inf, and NaN compares false with every
            # bound a config checks: both would pass silently or fail deep inside a run.
            raise UserError(f"{where}={value} must be a finite number, not NaN or infinite")
        return number
    if annotation is str:
        if not isinstance(value, str):
            raise UserError(f"bad value {value!r} for {where}: expected a string")
        return value
    return value


def _type_name(annotation: Any) -> str:
    return getattr(annotation, "__name__", None) or str(annotation).replace("typing.", "")


def build_method(
    name: str,
    overrides: Mapping[str, Any] | None = None,
    *,
    teacher_weights: str = "imagenet",
    device: str | torch.device = "cpu",
    seed: int = 0,
    dataset: str | None = None,
    category: str | None = None,
) -> Method:
    """Instantiate a method (or variant) by name with config overrides applied on top, and the
    method's own defaults for ``dataset``/``category`` below them (:func:`resolve_config`)."""
    method, config = resolve_config(name, overrides, dataset=dataset, category=category)
    cls = get_method_class(method)
    return cls(config, teacher_weights=teacher_weights, device=device, seed=seed)
