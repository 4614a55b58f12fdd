"""The toy experiment of the paper's appendix A.2 (Figs. A2-A4), as data roots and a figure.

Reading of A.2 (docs/toy-experiment.md gives the reasons):

(a) per category, a toy training set of 40 normal and 4 anomalous images (noise ratio 0.1),
    one method trained on all 44 the plain way; anomaly maps of the 4 anomalous training images
    beside anomalous test images not used for training;
(b) the same 44 images in two domains: 50 % of the normal images in both, the other normal
    images and the anomalous ones split evenly; one student trained per domain, and the maps
    of each anomalous training image by the student of the *other* domain (its out-of-domain
    map, the pseudo-normal target of Cross-Domain Distillation) beside its own domain's.

No part of this needs a change to the methods or the split rule: :func:`build_toy_root` writes
three MVTec-layout categories per source category (links to the source files),

    <out>/<category>-toy/       train/good = the 40 normals + the 4 anomalous images
    <out>/<category>-toy-d1/    train/good = the shared 20 normals + 10 + 2 anomalous
    <out>/<category>-toy-d2/    train/good = the shared 20 normals + the other 10 + 2
    each with test/ and ground_truth/ = the category's whole test set

and ``<out>/toy.json`` says which anomalous test image sits in which training set. The
anomalous training images are placed in ``train/good`` unlabelled, so a sweep runs them at noise
ratio 0 (``bench/presets/toy-a2.yaml``) and every method trains on exactly this set; the test
set holds them too, so their maps are the trained model's maps of its own training images.

By default the 4 anomalous images are two images of each of two defect types, one of each type
in each domain ("paired" selection): every out-of-domain anomaly then has an anomaly of its own
type inside the other student's domain, the case A.2 discusses ("out-of-domain data matching
in-domain anomalous patterns"). ``selection="random"`` draws the 4 at random instead. Every
draw is a seeded rank (sha256), as the noisy split's.
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import os
import shutil
import statistics
import warnings
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from bench.errors import UserError
from bench.records import write_json_atomic

TOY_FILE = "toy.json"
TOY_SCHEMA = 1
ALL_SUFFIX = "-toy"
DOMAIN_SUFFIXES = ("-toy-d1", "-toy-d2")
PAPER_TOY_CATEGORIES = ("cable", "metal_nut", "transistor")  # appendix A.2
SELECTIONS = ("paired", "random")
MAX_HELD_OUT = 4  # held-out anomalous test images shown beside the training ones


def _rank(*parts) -> str:
    return hashlib.sha256("|".join(str(p) for p in parts).encode()).hexdigest()


def _link(source: Path, target: Path, copy: bool) -> None:
    target.parent.mkdir(parents=True, exist_ok=True)
    if target.is_symlink() or target.exists():
        target.unlink()
    if copy:
        shutil.copy2(source, target)
    else:
        os.symlink(Path(source).resolve(), target)


def _test_path(sample) -> str:
    """``test/<defect>/<file name>``: where a test image sits inside a toy category."""
    return f"test/{sample.defect}/{Path(sample.path).name}"


def build_toy_root(dataset: str, source: str | os.PathLike, out: str | os.PathLike,
                   categories, *, normals: int = 40, anomalous: int = 4, shared: float = 0.5,
                   selection: str = "paired", seed: int = 0, copy: bool = False) -> Path:
    """Write the toy categories of ``categories`` under ``out`` and ``out/toy.json``."""
    from datasets import load_category

    if selection not in SELECTIONS:
        raise UserError(f"toy selection {selection!r} is unknown; use one of "
                        f"{', '.join(SELECTIONS)}")
    for name, value, low in (("--normals", normals, 2), ("--anomalous", anomalous, 2)):
        if isinstance(value, bool) or not isinstance(value, int) or value < low:
            raise UserError(f"toy {name} must be an integer >= {low}, got {value!r}")
    if anomalous % 2:
        raise UserError(f"toy --anomalous {anomalous} must be even: the anomalous images are "
                        "split evenly between two domains")
    if not (isinstance(shared, float | int) and 0.0 <= shared < 1.0):
        raise UserError(f"toy --shared {shared!r} must be a share in [0, 1) of the normals")
    if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
        raise UserError(f"toy --seed {seed!r} must be a non-negative integer")
    out = Path(out).expanduser()
    if Path(source).expanduser().resolve() == out.resolve():
        raise UserError(f"toy --out {out} is the data root itself; choose another folder")
    manifest = {"schema": TOY_SCHEMA, "dataset": dataset, "source": str(source),
                "seed": seed, "normals": normals, "anomalous": anomalous, "shared": shared,
                "selection": selection, "categories": {}}
    for category in categories:
        data = load_category(dataset, source, category)
        where = f"{dataset} {category}"
        if len(data.train) < normals:
            raise UserError(f"toy {where}: {len(data.train)} normal training images, fewer than "
                            f"--normals {normals}; lower it")
        picked = sorted(data.train, key=lambda s: _rank("toy-normal", dataset, category, seed,
                                                        s.key))[:normals]
        chosen = _pick_anomalous(data.test_anomalous, anomalous, selection, dataset, category,
                                 seed, where)
        n_shared = int(round(shared * normals))
        shared_normals, rest = picked[:n_shared], picked[n_shared:]
        domains = [shared_normals + rest[0::2], shared_normals + rest[1::2]]
        domain_anomalous = [chosen[0::2], chosen[1::2]]
        names = {"all": f"{category}{ALL_SUFFIX}",
                 "domains": [f"{category}{s}" for s in DOMAIN_SUFFIXES]}
        trees = [(names["all"], picked, chosen)] + [
            (name, normal, anom)
            for name, normal, anom in zip(names["domains"], domains, domain_anomalous)]
        for name, normal, anom in trees:
            _write_category(out / name, normal, anom, data.test, copy)
        manifest["categories"][category] = {
            **names,
            "train_normal": [s.key for s in picked],
            "shared_normal": [s.key for s in shared_normals],
            "train_anomalous": [
                {"test_path": _test_path(s), "defect": s.defect, "domain": d}
                for d, part in enumerate(domain_anomalous) for s in part],
        }
    write_json_atomic(out / TOY_FILE, manifest)
    return out


def _pick_anomalous(anomalous, count: int, selection: str, dataset: str, category: str,
                    seed: int, where: str) -> list:
    """``count`` anomalous test images, ordered so that [0::2] and [1::2] are the domains."""
    ranked = sorted(anomalous, key=lambda s: _rank("toy-anomalous", dataset, category, seed,
                                                   s.key))
    if selection == "random":
        if len(ranked) < count:
            raise UserError(f"toy {where}: {len(ranked)} anomalous test images, fewer than "
                            f"--anomalous {count}")
        return ranked[:count]
    by_defect = defaultdict(list)
    for sample in ranked:
        by_defect[sample.defect].append(sample)
    types = sorted((d for d, items in by_defect.items() if len(items) >= 2),
                   key=lambda d: _rank("toy-defect", dataset, category, seed, d))
    if len(types) < count // 2:
        raise UserError(f"toy {where}: paired selection needs {count // 2} defect types with "
                        f"two images each, found {len(types)}; use --selection random")
    out = []
    for defect in types[:count // 2]:
        out += by_defect[defect][:2]  # one to each domain
    return out


def _write_category(target: Path, normal, anomalous, test, copy: bool) -> None:
    if target.exists():
        shutil.rmtree(target)
    for sample in normal:
        _link(sample.path, target / "train" / "good" / f"normal-{Path(sample.path).name}", copy)
    for sample in anomalous:
        name = f"anomalous-{sample.defect}-{Path(sample.path).name}"
        _link(sample.path, target / "train" / "good" / name, copy)
    for sample in test:
        _link(sample.path, target / _test_path(sample), copy)
        if sample.mask_path is not None:
            mask = Path(sample.mask_path)
            _link(mask, target / "ground_truth" / sample.defect
                  / f"{Path(sample.path).stem}_mask{mask.suffix}", copy)


# --------------------------------------------------------------------------------------------
# Reading the runs back


@dataclass
class ToyGroup:
    """The runs of one source category of one toy root, in one setting."""

    setting: object
    category: str  # the source category
    info: dict  # its toy.json entry
    all_runs: dict = field(default_factory=dict)  # label -> run on <cat>-toy
    domain_runs: list = field(default_factory=lambda: [{}, {}])  # [label -> run] per domain


def _load_toy(root: str | None, cache: dict) -> dict | None:
    if not root:
        return None
    if root not in cache:
        try:
            cache[root] = json.loads((Path(root) / TOY_FILE).read_text(encoding="utf-8"))
        except (OSError, ValueError):
            cache[root] = None
    return cache[root]


def toy_groups(runs, notes: list[str]) -> list[ToyGroup]:
    """Runs on toy categories, grouped by (setting, source category); one seed (the smallest)
    stands for a method."""
    cache: dict = {}
    groups: dict[tuple, ToyGroup] = {}
    unreadable = set()
    for run in sorted((r for r in runs if r.complete), key=lambda r: (r.label, r.seed)):
        if not run.category.endswith((ALL_SUFFIX, *DOMAIN_SUFFIXES)):
            continue
        root = (run.record.get("spec") or {}).get("data_root")
        toy = _load_toy(root, cache)
        if toy is None:
            unreadable.add(root or "")
            continue
        for source, info in (toy.get("categories") or {}).items():
            names = [info.get("all"), *(info.get("domains") or [])]
            if run.category not in names:
                continue
            group = groups.setdefault((run.setting, source, root),
                                      ToyGroup(run.setting, source, info))
            if run.category == names[0]:
                group.all_runs.setdefault(run.label, run)
            else:
                group.domain_runs[names.index(run.category) - 1].setdefault(run.label, run)
    for root in sorted(unreadable):
        where = f"under {root}" if root else "(the records name no data root)"
        notes.append(f"toy experiment: no readable {TOY_FILE} {where}, so the runs on its toy "
                     "categories get no toy figure or table")
    return [groups[k] for k in sorted(groups, key=lambda k: (k[0].order, k[1], k[2]))]


def _tail(key: str) -> str:
    """``test/<defect>/<name>`` of a record's test key (``<toy category>/test/...``)."""
    parts = Path(str(key)).parts
    return "/".join(parts[-3:])


@dataclass
class _Column:
    title: str
    run: object
    domain: int | None  # None: trained on all 44
    data: dict
    range: tuple[float, float] = (0.0, 1.0)  # min and max of its maps (the colour scale)
    index: dict = field(default_factory=dict)  # test path -> row of its arrays


def _columns(group: ToyGroup, load) -> list[_Column]:
    from methods.base import method_facts

    def title(label):
        name = method_facts(label.split("[", 1)[0]).label
        _, _, rest = label.partition("[")
        return f"{name}[{rest}" if rest else name

    out = []
    for label, run in sorted(group.all_runs.items()):
        out.append(_Column(f"(a) {title(label)}, all 44", run, None, load(run)))
    for d, runs in enumerate(group.domain_runs):
        for label, run in sorted(runs.items()):
            out.append(_Column(f"(b) {title(label)}, domain {d + 1} student", run, d, load(run)))
    need = {"test_keys", "test_maps", "test_masks", "test_images", "test_labels"}
    return [c for c in out if c.data is not None and need <= c.data.keys()]


def _rows(group: ToyGroup, columns: list[_Column]) -> list[tuple[str, int | None]]:
    """(test path, training domain or None for held out): the training anomalies by domain,
    then up to MAX_HELD_OUT held-out anomalous images, those of the training defects first."""
    train = [(a["test_path"], int(a["domain"])) for a in group.info.get("train_anomalous", [])]
    common = None
    for column in columns:
        tails = {_tail(k) for k, lab in zip(column.data["test_keys"], column.data["test_labels"])
                 if lab}
        common = tails if common is None else common & tails
    common = common or set()
    train = sorted((t for t in train if t[0] in common), key=lambda t: (t[1], t[0]))
    defects = {t.split("/")[1] for t, _ in train}
    held = sorted(common - {t for t, _ in train},
                  key=lambda t: (t.split("/")[1] not in defects, _rank("toy-show", t)))
    return train + [(t, None) for t in held[:MAX_HELD_OUT]]


def _role(row_domain: int | None, column: _Column) -> str:
    if row_domain is None:
        return "held out"
    if column.domain is None:
        return "in training"
    return "in domain" if column.domain == row_domain else "out of domain"


def toy_figure(group: ToyGroup, out_dir: Path, notes: list[str], load) -> list:
    """Figs. A2-A4: image, ground truth and each model's map of the toy rows."""
    from bench.figures import _plt, _slug, save_figure

    columns = _columns(group, load)
    title = f"{group.setting.title}, {group.category}"
    if not columns:
        notes.append(f"toy experiment {title}: no run with stored maps, so no toy figure")
        return []
    rows = _rows(group, columns)
    if not rows:
        notes.append(f"toy experiment {title}: no anomalous image shared by the runs")
        return []
    plt = _plt()
    ncols = 2 + len(columns)
    fig, axes = plt.subplots(len(rows), ncols, figsize=(1.8 * ncols, 1.9 * len(rows)),
                             squeeze=False, layout="constrained")
    for column in columns:
        maps = column.data["test_maps"].astype(np.float32)
        column.range = (float(maps.min()), float(maps.max()))
        column.index = {_tail(k): i for i, k in enumerate(column.data["test_keys"])}
    for r, (tail, domain) in enumerate(rows):
        first = columns[0]
        i0 = first.index[tail]
        image = first.data["test_images"][i0]
        axes[r][0].imshow(image)
        axes[r][1].imshow(first.data["test_masks"][i0], cmap="gray", vmin=0, vmax=1)
        for c, column in enumerate(columns):
            lo, hi = column.range
            amap = (column.data["test_maps"][column.index[tail]].astype(np.float32) - lo) / max(
                hi - lo, 1e-12)
            ax = axes[r][2 + c]
            ax.imshow(image)
            ax.imshow(amap, cmap="jet", alpha=0.5, vmin=0, vmax=1)
            role = _role(domain, column)
            ax.text(0.02, 0.98, role, transform=ax.transAxes, fontsize=6, va="top",
                    color="white", bbox={"facecolor": "black", "alpha": 0.55, "pad": 1,
                                         "linewidth": 0})
        for ax in axes[r]:
            ax.set_xticks([])
            ax.set_yticks([])
        where = "held out" if domain is None else f"train, domain {domain + 1}"
        axes[r][0].set_ylabel(f"{'/'.join(tail.split('/')[1:])}\n({where})", fontsize=6)
    for c, text in enumerate(["image", "ground truth", *(col.title for col in columns)]):
        axes[0][c].set_title(text, fontsize=7)
    fig.suptitle(f"Toy experiment (appendix A.2, Figs. A2-A4-like): {title}", fontsize=9)
    stem = out_dir / f"toy_{group.setting.slug}_{_slug(group.category)}"
    save_figure(fig, stem)
    return [(f"Toy experiment (Figs. A2-A4-like): {title}", stem)]


ROLES = ("in training", "in domain", "out of domain", "held out")


def toy_table(group: ToyGroup, load) -> list[dict]:
    """Per model and role: mean per-image pixel AUROC of the anomalous images (localisation)
    and mean share of normal test images scoring below them (detection), from the stored
    maps and scores."""
    from bench.metrics import MetricWarning, pixel_auroc

    columns = _columns(group, load)
    train = {a["test_path"]: int(a["domain"]) for a in group.info.get("train_anomalous", [])}
    out = []
    for column in columns:
        d = column.data
        scores = d.get("test_scores")
        normal_scores = None if scores is None else np.sort(scores[~d["test_labels"].astype(bool)])
        values = defaultdict(lambda: ([], []))
        for i, (key, label) in enumerate(zip(d["test_keys"], d["test_labels"])):
            if not label:
                continue
            tail = _tail(key)
            role = _role(train.get(tail), column)
            mask = d["test_masks"][i].astype(bool)
            if mask.any() and not mask.all():
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore", MetricWarning)
                    values[role][0].append(pixel_auroc(d["test_maps"][i:i + 1],
                                                       d["test_masks"][i:i + 1]))
            if normal_scores is not None and normal_scores.size:
                values[role][1].append(float(np.searchsorted(normal_scores, scores[i]))
                                       / normal_scores.size)
        for role in ROLES:
            if role not in values:
                continue
            pix, det = values[role]
            out.append({"model": column.title, "role": role, "images": max(len(pix), len(det)),
                        "pixel_auroc": statistics.fmean(pix) if pix else None,
                        "normals_below": statistics.fmean(det) if det else None})
    return out


TOY_TABLE_NOTE = (
    "Per model and role of the anomalous images: mean per-image pixel AUROC of the map (from "
    "the stored 64 px maps) and mean share of normal test images that score below the image "
    "(1 = detected above every normal). Roles: in training = one of the 4 anomalous training "
    "images, for the model trained on all 44; in domain / out of domain = a training anomaly "
    "of the student's own / the other domain; held out = never in any training set.")


def _fmt(value) -> str:
    return "—" if value is None else f"{value:.3f}"


def toy_markdown(title: str, rows: list[dict]) -> str:
    lines = [f"## Toy experiment (appendix A.2): {title}", "", TOY_TABLE_NOTE, "",
             "| model | role | images | pixel AUROC | normals below |", "|---|---|:-:|:-:|:-:|"]
    lines += [f"| {r['model']} | {r['role']} | {r['images']} | {_fmt(r['pixel_auroc'])} | "
              f"{_fmt(r['normals_below'])} |" for r in rows]
    return "\n".join(lines) + "\n"


def toy_latex(title: str, rows: list[dict], tex) -> str:
    lines = [r"\begin{table}[t]", r"\centering",
             rf"\caption{{{tex(f'Toy experiment (appendix A.2): {title}. ' + TOY_TABLE_NOTE)}}}",
             r"\begin{tabular}{llccc}", r"\toprule",
             r"model & role & images & pixel AUROC & normals below \\", r"\midrule"]
    lines += [" & ".join(tex(v) for v in (r["model"], r["role"], str(r["images"]),
                                           _fmt(r["pixel_auroc"]), _fmt(r["normals_below"])))
              + r" \\" for r in rows]
    lines += [r"\bottomrule", r"\end{tabular}", r"\end{table}"]
    return "\n".join(lines) + "\n"


def toy_csv(group: ToyGroup, rows: list[dict]) -> str:
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(["dataset", "image_size", "teacher_weights", "category", "model", "role",
                     "images", "pixel_auroc", "normals_below"])
    s = group.setting
    for r in rows:
        writer.writerow([s.dataset, s.image_size, s.teacher_weights, group.category, r["model"],
                         r["role"], r["images"],
                         "" if r["pixel_auroc"] is None else repr(r["pixel_auroc"]),
                         "" if r["normals_below"] is None else repr(r["normals_below"])])
    return buf.getvalue()
