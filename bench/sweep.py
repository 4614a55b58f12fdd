"""Sweep presets: a YAML file in ``bench/presets/`` expanded into a list of :class:`RunSpec`.

A preset file holds::

    description: one line saying what the sweep reproduces
    dataset: mvtec | visa | synthetic
    data_root: optional default folder (``--data-root`` wins; else ./data/<dataset>)
    categories: all | [bottle, cable, ...]
    methods:                      # names of registered methods or method variants
      - rd
      - name: cdd
        config: {epochs: 100}     # per-method overrides
      - name: softpatch
        optional: true            # skipped (with a note) when the method is not registered
      - name: urd
        image_size: 256           # this method's own geometry (e.g. its official resolution)
        resize_size: 256
    noise_ratios: [0.1]
    seeds: [0]                    # each seed s runs with split seed s and training seed s
    split_seeds: [0]              # optional: then runs = split_seeds x seeds (training seeds)
    image_size: 224               # center crop
    resize_size: 256
    teacher_weights: imagenet     # imagenet | random | path to a state_dict
    config: {backbone: wide_resnet50_2, epochs: 200}   # defaults for every method with the field

Config precedence, lowest first: the method's own defaults for the run's dataset and category
(``category_overrides``, applied when a run's config is resolved), the preset's ``config``
defaults (applied to each method that has the field), the variant's registered overrides (an
ablation row stays what it is),
the method entry's ``config``, then ``--set`` from the command line (``--set KEY=V`` applies to
every method with the field, like the preset's defaults; ``--set METHOD.KEY=V`` to one method;
a key that no method of the sweep has is an error). Every value is type-checked
against the method's config dataclass (:func:`methods.base.make_config`), and the spec keeps the
coerced values, so ``--set epochs=5`` and ``epochs: 5`` give the same fingerprint.

A method entry's ``image_size``/``resize_size`` replace the sweep's for that method; the
command line's ``--image-size``/``--resize-size`` replace both. Runs of another geometry land in
tables of their own (the report never mixes image sizes).

Runs are ordered category, noise ratio, seed, method: runs that share data sit together.
"""

from __future__ import annotations

import importlib
import itertools
import math
import os
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from bench.errors import UserError
from bench.spec import RunSpec, canonical_value
from datasets import DATASETS
from methods.base import config_fields, is_known, make_config, resolve_method

PRESETS_DIR = Path(__file__).resolve().parent / "presets"
_PRESET_KEYS = {
    "description", "dataset", "data_root", "categories", "methods", "noise_ratios", "seeds",
    "split_seeds", "image_size", "resize_size", "teacher_weights", "config",
}
_METHOD_KEYS = {"name", "config", "optional", "image_size", "resize_size"}
MAX_SEED = 2**32 - 1  # numpy's legacy seeding takes 0..2**32-1, its Generator no negatives


@dataclass(frozen=True)
class MethodEntry:
    """One method of a sweep: a registered method or variant name, plus its own overrides."""

    name: str
    config: Mapping[str, Any] = field(default_factory=dict)
    optional: bool = False
    image_size: int | None = None  # None: the sweep's
    resize_size: int | None = None


@dataclass(frozen=True)
class Preset:
    """A parsed sweep preset (see the module docstring for the YAML keys)."""

    name: str
    path: Path
    description: str
    dataset: str
    categories: tuple[str, ...] | str  # explicit names or "all"
    methods: tuple[MethodEntry, ...]
    noise_ratios: tuple[float, ...]
    seeds: tuple[int, ...]
    split_seeds: tuple[int, ...] | None
    image_size: int
    resize_size: int
    teacher_weights: str
    config: Mapping[str, Any]
    data_root: str | None = None


def list_presets() -> list[str]:
    """Names of the bundled presets (file stems under ``bench/presets``)."""
    return sorted(p.stem for p in PRESETS_DIR.glob("*.yaml"))


def preset_path(name: str) -> Path:
    """The YAML file of a bundled preset name, or ``name`` itself when it is a YAML path."""
    candidate = Path(name)
    if candidate.suffix in (".yaml", ".yml") and candidate.is_file():
        return candidate
    path = PRESETS_DIR / f"{name}.yaml"
    if not path.is_file():
        raise UserError(
            f"unknown preset {name!r}; presets: {', '.join(list_presets())} "
            f"(or give the path of a .yaml file)"
        )
    return path


def load_preset(name: str) -> Preset:
    """Read and validate a preset by name (or YAML path)."""
    path = preset_path(name)
    try:
        raw = yaml.load(path.read_text(encoding="utf-8"), Loader=_UniqueKeyLoader)
    except UnicodeDecodeError as err:
        raise UserError(f"preset {path} is not UTF-8 text (byte {err.object[err.start]:#04x} at "
                        f"position {err.start}); save it as UTF-8") from None
    except (OSError, yaml.YAMLError) as err:
        raise UserError(f"cannot read preset {path}: {err}; fix the YAML") from None
    where = f"preset {path}"
    if not isinstance(raw, dict):
        raise UserError(f"{where} must be a mapping of keys (description, dataset, ...)")
    unknown = sorted(set(raw) - _PRESET_KEYS)
    if unknown:
        raise UserError(
            f"{where}: unknown key(s) {', '.join(unknown)}; allowed: {', '.join(sorted(_PRESET_KEYS))}"
        )
    for key in ("description", "dataset", "categories", "methods", "noise_ratios", "seeds",
                "image_size", "resize_size", "teacher_weights"):
        if key not in raw:
            raise UserError(f"{where}: missing key {key!r}; add it")
    dataset = str(raw["dataset"])
    if dataset not in DATASETS:
        raise UserError(f"{where}: dataset {dataset!r} is not one of {', '.join(DATASETS)}")
    categories = raw["categories"]
    if categories != "all":
        categories = tuple(str(c) for c in _as_list(categories, where, "categories"))
    config = raw.get("config") or {}
    if not isinstance(config, dict):
        raise UserError(f"{where}: 'config' must be a mapping of field: value")
    return Preset(
        name=path.stem,
        path=path,
        description=str(raw["description"]).strip(),
        dataset=dataset,
        categories=categories,
        methods=tuple(_method_entry(m, where) for m in _as_list(raw["methods"], where, "methods")),
        noise_ratios=tuple(_number(v, float, where, "noise_ratios")
                           for v in _as_list(raw["noise_ratios"], where, "noise_ratios")),
        seeds=tuple(_number(v, int, where, "seeds") for v in _as_list(raw["seeds"], where, "seeds")),
        split_seeds=(tuple(_number(v, int, where, "split_seeds")
                           for v in _as_list(raw["split_seeds"], where, "split_seeds"))
                     if raw.get("split_seeds") is not None else None),
        image_size=_number(raw["image_size"], int, where, "image_size", minimum=1),
        resize_size=_number(raw["resize_size"], int, where, "resize_size", minimum=1),
        teacher_weights=str(raw["teacher_weights"]),
        config=dict(config),
        data_root=str(raw["data_root"]) if raw.get("data_root") else None,
    )


class _UniqueKeyLoader(yaml.SafeLoader):
    """PyYAML's safe loader, except that a key given twice in one mapping is an error: PyYAML
    keeps the last value in silence, and a preset that sets ``noise_ratios`` twice means one
    of them."""

    def construct_mapping(self, node, deep=False):
        seen = set()
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=deep)
            try:
                duplicate = key in seen
                seen.add(key)
            except TypeError:  # an unhashable key: the base class says so
                break
            if duplicate:
                raise yaml.constructor.ConstructorError(
                    None, None, f"key {key!r} is given twice (line {key_node.start_mark.line + 1}); "
                    f"keep one", key_node.start_mark)
        return super().construct_mapping(node, deep=deep)


def _as_list(value: Any, where: str, key: str) -> list:
    if isinstance(value, (list, tuple)) and value:
        return list(value)
    raise UserError(f"{where}: {key!r} must be a non-empty list")


def _number(value: Any, kind: type, where: str, key: str, minimum: float | None = None):
    expected = "an integer" if kind is int else "a number"
    if isinstance(value, bool) or isinstance(value, (list, dict)):
        raise UserError(f"{where}: bad value {value!r} in {key!r}; expected {expected}")
    try:
        as_float = float(value)
    except (TypeError, ValueError):
        raise UserError(f"{where}: bad value {value!r} in {key!r}; expected {expected}") from None
    if not math.isfinite(as_float) or (kind is int and not as_float.is_integer()):
        raise UserError(f"{where}: bad value {value!r} in {key!r}; expected {expected}")
    number = int(as_float) if kind is int else as_float
    if minimum is not None and number < minimum:
        raise UserError(f"{where}: bad value {value!r} in {key!r}; expected at least {minimum:g}")
    return number


def _method_entry(item: Any, where: str) -> MethodEntry:
    if isinstance(item, str):
        return MethodEntry(item)
    if isinstance(item, dict) and "name" in item:
        unknown = sorted(set(item) - _METHOD_KEYS)
        if unknown:
            raise UserError(f"{where}: method entry {item['name']!r} has unknown key(s) "
                            f"{', '.join(unknown)}; allowed: {', '.join(sorted(_METHOD_KEYS))}")
        config = item.get("config") or {}
        if not isinstance(config, dict):
            raise UserError(f"{where}: 'config' of method {item['name']!r} must be a mapping")
        geometry = {key: _number(item[key], int, where, f"{item['name']}.{key}", minimum=1)
                    for key in ("image_size", "resize_size") if item.get(key) is not None}
        return MethodEntry(str(item["name"]), dict(config), bool(item.get("optional", False)),
                           **geometry)
    raise UserError(f"{where}: each method is a name or a mapping with 'name'; got {item!r}")


def parse_sets(pairs: Iterable[str]) -> dict[str | None, dict[str, str]]:
    """``--set key=value`` (every method) / ``--set method.key=value`` -> {method|None: {k: v}}."""
    out: dict[str | None, dict[str, str]] = {}
    for pair in pairs or ():
        key, sep, value = pair.partition("=")
        key = key.strip()
        if not sep or not key:
            raise UserError(f"bad --set {pair!r}; write key=value or method.key=value")
        method, dot, field_name = key.rpartition(".")
        out.setdefault(method if dot else None, {})[field_name] = value.strip()
    return out


def default_data_root(dataset: str) -> Path:
    return Path("data") / dataset


def resolve_categories(dataset: str, root: Path, wanted: Sequence[str] | str) -> list[str]:
    """Categories to run: ``wanted`` checked against the folders present, or all of them."""
    from datasets import list_categories

    found = list_categories(dataset, root)
    if wanted == "all":
        return list(found)
    missing = [c for c in wanted if c not in found]
    if missing:
        raise UserError(
            f"unknown category {missing[0]!r} for {dataset} at {root}; found: {', '.join(found)}"
        )
    return list(wanted)


def expand(
    preset: Preset,
    *,
    data_root: str | os.PathLike | None = None,
    categories: Sequence[str] | None = None,
    noise_ratios: Sequence[float] | None = None,
    seeds: Sequence[int] | None = None,
    methods: Sequence[str] | None = None,
    teacher_weights: str | None = None,
    sets: Iterable[str] = (),
    check_data: bool = True,
) -> list[RunSpec]:
    """The runs of ``preset`` with command-line overrides applied.

    ``check_data`` resolves ``categories: all`` and checks requested categories against the data
    folder; without it, explicit category names are taken as they are (handy to count runs).
    """
    importlib.import_module("methods")  # registers the built-in methods

    root = Path(data_root or preset.data_root or default_data_root(preset.dataset))
    root = root.expanduser().resolve()
    wanted = list(categories) if categories else preset.categories
    if check_data:
        cats = resolve_categories(preset.dataset, root, wanted)
    elif wanted == "all":
        raise UserError(f"preset {preset.name!r} uses 'categories: all': give --categories")
    else:
        cats = list(wanted)

    entries = _select_methods(preset, methods)
    set_map = parse_sets(sets)
    entry_names = {e.name for e in entries} | {resolve_method(e.name)[0] for e in entries}
    for target in set_map:
        if target is not None and target not in entry_names:
            raise UserError(f"--set names method {target!r}, which is not in this sweep; "
                            f"methods: {', '.join(e.name for e in entries)}")
    # One config per entry: a method listed twice with different configs runs both (the
    # report tells them apart by the config keys that differ).
    configs = [_method_config(e, preset, set_map) for e in entries]
    _check_defaults_used(preset, entries)
    _check_global_sets_used(set_map.get(None, {}), entries)

    ratios = [float(r) for r in (noise_ratios if noise_ratios is not None else preset.noise_ratios)]
    for ratio in ratios:
        if not 0.0 <= ratio < 1.0:  # NaN fails this too
            raise UserError(f"noise ratio {ratio} is outside [0, 1); give e.g. 0.1")
    train_seeds = [int(s) for s in (seeds if seeds is not None else preset.seeds)]
    split_seeds = list(preset.split_seeds) if preset.split_seeds is not None else []
    for seed in train_seeds + split_seeds:
        if not 0 <= seed <= MAX_SEED:
            raise UserError(f"seed {seed} is outside 0..{MAX_SEED}; numpy and torch generators "
                            f"take seeds in that range")
    if preset.split_seeds is not None and seeds is None:
        seed_pairs = list(itertools.product(preset.split_seeds, train_seeds))
    else:
        seed_pairs = [(s, s) for s in train_seeds]
    weights = teacher_weights or preset.teacher_weights

    specs = []
    for category, ratio, (split_seed, train_seed), (entry, config) in itertools.product(
        cats, ratios, seed_pairs, list(zip(entries, configs))
    ):
        specs.append(RunSpec(
            method=entry.name, config=config, dataset=preset.dataset,
            data_root=str(root), category=category, noise_ratio=ratio, split_seed=split_seed,
            train_seed=train_seed, image_size=entry.image_size or preset.image_size,
            resize_size=entry.resize_size or preset.resize_size,
            teacher_weights=weights,
        ))
    return _dedupe(specs)


def _select_methods(preset: Preset, wanted: Sequence[str] | None) -> list[MethodEntry]:
    """The preset's method entries (or ``--methods``), dropping optional unregistered ones."""
    entries = list(preset.methods)
    if wanted:  # every entry of each name asked for (a method may be listed twice)
        entries = [e for name in dict.fromkeys(wanted)
                   for e in ([e for e in entries if e.name == name] or [MethodEntry(name)])]
    selected = []
    for entry in entries:
        known = is_known(entry.name)
        if not known and entry.optional and not wanted:
            continue
        resolve_method(entry.name)  # unknown name -> one-line UserError
        selected.append(entry)
    if not selected:
        raise UserError(f"preset {preset.name!r}: no registered method to run")
    return selected


def _method_config(entry: MethodEntry, preset: Preset, set_map) -> dict[str, Any]:
    """Merged, type-checked overrides of one method entry (see precedence in the docstring)."""
    base, variant_overrides = resolve_method(entry.name)
    fields = {f.name for f in config_fields(base)}
    merged = {k: v for k, v in preset.config.items() if k in fields}
    merged.update(variant_overrides)
    for key in entry.config:
        if key not in fields:
            raise UserError(f"preset {preset.path}: method {entry.name!r} has no config field "
                            f"{key!r}; fields: {', '.join(sorted(fields))}")
    merged.update(entry.config)
    for target in (None, base, entry.name):
        for key, value in set_map.get(target, {}).items():
            if key not in fields:
                if target is None:  # a sweep-wide --set skips methods without the field
                    continue
                raise UserError(f"--set {target}.{key}: method {entry.name!r} ({base}) has no "
                                f"config field {key!r}; fields: {', '.join(sorted(fields))}")
            merged[key] = value
    config = make_config(base, merged)
    return {key: canonical_value(getattr(config, key)) for key in sorted(merged)}


def _check_global_sets_used(sets: Mapping[str, Any], entries: list[MethodEntry]) -> None:
    """A sweep-wide ``--set KEY`` that no method of the sweep has is a typo: say so."""
    fields = set()
    for entry in entries:
        fields |= {f.name for f in config_fields(resolve_method(entry.name)[0])}
    unused = sorted(set(sets) - fields)
    if unused:
        names = ", ".join(e.name for e in entries)
        raise UserError(f"--set {unused[0]}: no method of this sweep ({names}) has a config field "
                        f"{unused[0]!r}; see `run_benchmark.py list` for each method's fields")


def _check_defaults_used(preset: Preset, entries: list[MethodEntry]) -> None:
    """A sweep-wide default that no method in the sweep has is a typo: say so."""
    fields = set()
    for entry in entries:
        base, _ = resolve_method(entry.name)
        fields |= {f.name for f in config_fields(base)}
    unused = sorted(set(preset.config) - fields)
    if unused:
        raise UserError(f"preset {preset.path}: config key(s) {', '.join(unused)} match no field "
                        f"of the sweep's methods; fix the spelling or drop them")


def _dedupe(specs: list[RunSpec]) -> list[RunSpec]:
    """Drop repeated runs (e.g. a method listed twice) keeping the first, in order."""
    seen, out = set(), []
    for spec in specs:
        if spec.fingerprint not in seen:
            seen.add(spec.fingerprint)
            out.append(spec)
    return out
