"""``run_benchmark.py list``: datasets, categories found, methods with their config fields and
defaults, method variants and sweep presets."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import yaml

from bench.errors import UserError

HELP = ("show datasets (and categories found under --data-root), methods, method variants and "
        "sweep presets")
PRESETS_DIR = Path(__file__).resolve().parent.parent / "presets"


def add_arguments(p) -> None:
    from datasets import DATASETS

    p.add_argument("--dataset", choices=sorted(DATASETS), help="dataset whose categories to list")
    p.add_argument("--data-root", help="folder that holds the dataset's category folders")


def _default(field: dataclasses.Field) -> str:
    if field.default is not dataclasses.MISSING:
        return repr(field.default)
    if field.default_factory is not dataclasses.MISSING:  # type: ignore[misc]
        return repr(field.default_factory())  # type: ignore[misc]
    return "(required)"


def _type_name(field: dataclasses.Field) -> str:
    t = field.type
    return t if isinstance(t, str) else getattr(t, "__name__", str(t))


def category_lines(dataset: str, root: str) -> list[str]:
    """One line per category with its image counts."""
    from datasets import list_categories, load_category

    lines = []
    for category in list_categories(dataset, root):
        c = load_category(dataset, root, category).counts()
        lines.append(
            f"  {category:<16} train {c['train']:>4}   test good {c['test_good']:>4}   "
            f"test anomalous {c['test_anomalous']:>4}"
        )
    return lines


def method_lines() -> list[str]:
    import methods
    from methods.base import config_fields

    lines = []
    for name in methods.available_methods():
        lines.append(f"  {name}")
        for field in config_fields(name):
            lines.append(f"    {field.name}: {_type_name(field)} = {_default(field)}")
    if not lines:
        lines.append("  (none registered)")
    variants = methods.available_variants()
    lines.append("method variants (named configs; use them like methods):")
    for variant in variants:
        overrides = ", ".join(f"{k}={v!r}" for k, v in variant.overrides.items()) or "defaults"
        desc = f"  {variant.description}" if variant.description else ""
        lines.append(f"  {variant.name:<20} {variant.method}({overrides}){desc}")
    if not variants:
        lines.append("  (none registered)")
    return lines


def sweep_preset_lines(presets_dir: Path = PRESETS_DIR) -> list[str]:
    lines = []
    for path in sorted(presets_dir.glob("*.yaml")):
        try:
            data = yaml.safe_load(path.read_text(encoding="utf-8"))
        except (OSError, yaml.YAMLError) as err:
            lines.append(f"  {path.stem:<20} (unreadable: {type(err).__name__})")
            continue
        desc = data.get("description", "") if isinstance(data, dict) else ""
        lines.append(f"  {path.stem:<20} {' '.join(str(desc).split())}".rstrip())
    return lines or ["  (none)"]


def run(args) -> int:
    from datasets import DATASETS

    if (args.dataset is None) != (args.data_root is None):
        raise UserError("list: pass --dataset and --data-root together to list categories")
    out = ["datasets:"]
    out += [f"  {name:<10} {desc}" for name, desc in DATASETS.items()]
    if args.dataset is not None:
        out.append(f"categories of {args.dataset} under {args.data_root}:")
        out += category_lines(args.dataset, args.data_root)
    out.append("methods (config fields and defaults):")
    out += method_lines()
    out.append("sweep presets:")
    out += sweep_preset_lines()
    print("\n".join(out))
    return 0
