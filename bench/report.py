"""Paper-style tables, figures and a ``report.md`` index, computed from the results store.

``render_report(results_dir, out_dir=None)`` reads every record under ``results_dir/runs`` and
writes, under ``out_dir`` (default ``<results_dir>/report``)::

    report.md                    index: provenance first, then links to everything
    tables/<stem>.md|.tex|.csv   each table in the paper's layout, with paper values and deltas
    figures/<stem>.png|.pdf      noise-ratio curves, score histograms, map grids, diagnostics

Records are grouped by *setting* (dataset, noise ratio, image size, teacher weights) and, inside
a setting, by method and category; several seeds of one cell become ``mean ± std`` (sample std,
ddof 1). Per setting the report builds:

- ``main`` tables as in Tables 1 and 2: categories x methods, ``I-AUC / P-AUC / PRO`` cells, one
  table per protocol, with an Average row;
- a ``summary`` as in Table 3: (protocol, metric) x methods, the Average row of the above;
- ``per-metric`` tables as in Tables A3-A8: categories x (protocol, method) for one metric;
- ablation tables as in Tables 4, 5, 6, A1, A2 from variants named ``cdd-t4-*``, ``cdd-t5-*``,
  ``cdd-t6-*``, ``cdd-a1-*``, ``cdd-a2-*`` (No-overlap protocol, averages over categories).

"PRO" is the RD4AD per-image PRO (``pro_rd4ad``) by default, because RD-family papers report
that one; ``pro="aupro"`` switches to the official MVTec AUPRO. Every caption names the variant,
and the CSVs hold both.

Marks: in every row (ablation tables: every column) the best value is bold and the second-best
distinct value underlined, compared at the printed precision, so ties share a mark. A cell with
no value, or an average over fewer categories than its table has, takes no part in the ranking.

Where the paper has a cell (MVTec AD at 0.1, VisA at 0.05), each table file also holds the
paper's values in the same layout and the per-cell delta (ours - paper).
"""

from __future__ import annotations

import csv
import io
import json
import math
import statistics
from collections import defaultdict
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

from bench.errors import UserError
from bench.paper import (
    ABLATION_PREFIXES,
    ABLATION_ROW_ALIASES,
    PAPER_CATEGORIES,
    PAPER_RATIOS,
    PaperLookup,
    ablation_row_of,
    ablation_table_of,
)
from bench.records import (
    PROTOCOLS,
    is_complete,
    iter_records,
    json_ready,
    run_dir,
    write_bytes_atomic,
)
from bench.spec import same_teacher_name
from bench.stats import Stat

REPORT_DIR = "report"
PRO_VARIANTS = ("pro_rd4ad", "aupro")
PRO_DESCRIPTIONS = {
    "pro_rd4ad": "pro_rd4ad (RD4AD per-image PRO, FPR < 0.3; as RD-family papers report it)",
    "aupro": "aupro (official MVTec AUPRO up to FPR 0.3, normalised)",
}
PROTOCOL_TITLES = {"no_overlap": "No overlap", "overlap": "Overlap"}
METRIC_TITLES = {"i_auroc": "I-AUC", "p_auroc": "P-AUC", "pro_rd4ad": "PRO", "aupro": "PRO",
                 "average": "Average"}
# What the paper ran; anything else is flagged as not paper-comparable (with each method's
# own ``paper_setup``: epochs, backbone, caps).
PAPER_TEACHER_WEIGHTS = "imagenet"
PAPER_IMAGE_SIZE = 224
MISSING = "—"
AVERAGE = "Average"


# --------------------------------------------------------------------------------------------
# Runs: one flat entry per record.


@dataclass(frozen=True)
class Setting:
    """What makes numbers comparable: runs of different settings never share a table."""

    dataset: str
    noise_ratio: float
    image_size: int
    teacher_weights: str

    @property
    def order(self) -> tuple:
        """Reading order: dataset, then noise ratio numerically, then size and weights."""
        return (self.dataset, self.noise_ratio, self.image_size, self.teacher_weights)

    @property
    def slug(self) -> str:
        parts = [self.dataset, f"noise{self.noise_ratio:g}"]
        if self.image_size != PAPER_IMAGE_SIZE:
            parts.append(f"px{self.image_size}")
        if self.teacher_weights != PAPER_TEACHER_WEIGHTS:
            parts.append(_slugify(self.teacher_weights))
        return "_".join(parts)

    @property
    def title(self) -> str:
        text = f"{self.dataset}-noise-{self.noise_ratio:g}"
        extras = []
        if self.image_size != PAPER_IMAGE_SIZE:
            extras.append(f"{self.image_size} px")
        if self.teacher_weights != PAPER_TEACHER_WEIGHTS:
            extras.append(f"teacher {self.teacher_weights}")
        return f"{text} ({', '.join(extras)})" if extras else text

    @property
    def has_paper_values(self) -> bool:
        ratio = PAPER_RATIOS.get(self.dataset)
        return ratio is not None and math.isclose(self.noise_ratio, ratio)


@dataclass
class Run:
    """The parts of one record that the report uses."""

    fingerprint: str
    complete: bool
    method: str  # the spec's method or variant name
    label: str  # method plus config overrides, the column name
    setting: Setting
    category: str
    seed: tuple[int, int]  # (split_seed, train_seed)
    metrics: dict[str, dict[str, float | None]]
    record: dict
    error: str = ""

    def value(self, protocol: str, metric: str) -> float | None:
        value = (self.metrics.get(protocol) or {}).get(metric)
        if value is None or not isinstance(value, (int, float)) or math.isnan(value):
            return None
        return float(value)


def _slugify(text: str) -> str:
    out = "".join(c if c.isalnum() or c in "-." else "-" for c in str(text))
    return "-".join(p for p in out.split("-") if p) or "x"


def method_label(method: str, config: dict, varying: Iterable[str]) -> str:
    """The method name, plus the config overrides that tell its runs apart (``cdd[k=3]``)."""
    keys = sorted(k for k in varying)
    if not keys:
        return method
    inner = ",".join(f"{k}={config.get(k, '-')}" for k in keys)
    return f"{method}[{inner}]"


def _assign_labels(runs: list[Run]) -> None:
    """Label runs by method, adding only the overrides that differ between runs of one method
    in one setting (a sweep's shared ``epochs: 200`` is not worth a column title)."""
    configs: dict[tuple[Setting, str], list[dict]] = defaultdict(list)
    for run in runs:
        configs[(run.setting, run.method)].append(run.record["spec"].get("config") or {})
    varying: dict[tuple[Setting, str], set[str]] = {}
    for key, cfgs in configs.items():
        names = {k for c in cfgs for k in c}
        varying[key] = {k for k in names
                        if len({repr(c.get(k, "<unset>")) for c in cfgs}) > 1}
    for run in runs:
        config = run.record["spec"].get("config") or {}
        run.label = method_label(run.method, config, varying[(run.setting, run.method)])


def load_runs(results_dir: str | Path) -> list[Run]:
    """Every readable record under ``results_dir`` as a :class:`Run` (failed ones included),
    plus the runs a sweep planned that have no record yet."""
    runs = [run for run in map(_run_of, iter_records(results_dir)) if run is not None]
    runs += _planned_runs(results_dir, {r.fingerprint for r in runs})
    _assign_labels(runs)
    return runs


def _run_of(record: dict) -> Run | None:
    """The :class:`Run` of a record; None for a record without a usable spec."""
    spec = record.get("spec") or {}
    try:
        setting = Setting(
            dataset=str(spec["dataset"]),
            noise_ratio=float(spec["noise_ratio"]),
            image_size=int(spec.get("image_size", PAPER_IMAGE_SIZE)),
            teacher_weights=same_teacher_name(
                str(spec.get("teacher_weights", PAPER_TEACHER_WEIGHTS))),
        )
        category = str(spec["category"])
        method = str(spec["method"])
    except (KeyError, TypeError, ValueError):
        return None  # not a run record (no spec): nothing to place in a table
    error = record.get("error") or {}
    return Run(
        fingerprint=str(record.get("fingerprint", "")),
        complete=is_complete(record),
        method=method,
        label=method,
        setting=setting,
        category=category,
        seed=(int(spec.get("split_seed", 0)), int(spec.get("train_seed", 0))),
        metrics=record.get("metrics") or {},
        record=record,
        error=" ".join(str(error.get("message", "")).split()) if error else "",
    )


PLANNED = "planned"  # the record status of a run a sweep planned that has no record yet


def _planned_runs(results_dir: str | Path, known: set[str]) -> list[Run]:
    """Runs listed in ``<results>/sweeps/*.json`` (written by ``run``) that have no record."""
    from bench.spec import RunSpec

    out = []
    for path in sorted(Path(results_dir).glob("sweeps/*.json")):
        try:
            plan = json.loads(path.read_text(encoding="utf-8"))
            specs = [RunSpec.from_dict(item) for item in plan["specs"]]
        except (OSError, ValueError, KeyError, TypeError):
            continue  # a damaged plan only loses the "not run" rows
        for spec in specs:
            if spec.fingerprint not in known:
                known.add(spec.fingerprint)
                run = _run_of({"fingerprint": spec.fingerprint, "spec": spec.to_dict(),
                               "status": PLANNED})
                if run is not None:
                    out.append(run)
    return out


# --------------------------------------------------------------------------------------------
# Statistics and grids.


def stat_of(values: Iterable[float | None]) -> Stat | None:
    """Mean ± sample std over seeds (no std for one seed); None without any value."""
    stat = Stat.of(values)
    return stat if stat.n else None


@dataclass
class Cell:
    stats: tuple[Stat | None, ...]  # one per metric of the grid
    partial: bool = False  # an average over fewer categories than the table has


@dataclass
class Grid:
    """A table in the paper's layout: rows x (group, column), each cell one or more metrics."""

    stem: str
    title: str
    caption: str
    row_header: str
    rows: list[str]
    groups: list[tuple[str, list[str]]]  # (group title, column labels); one untitled group = flat
    metrics: tuple[str, ...]
    cells: dict[tuple[str, str, str], Cell]
    decimals: int = 3
    mark_axis: str = "row"  # compare across columns of a row ("column": across rows)
    notes: list[str] = field(default_factory=list)
    paper: dict[tuple[str, str, str], tuple[float | None, ...]] = field(default_factory=dict)
    kind: str = ""

    def keys(self) -> Iterable[tuple[str, str, str]]:
        for row in self.rows:
            for group, cols in self.groups:
                for col in cols:
                    yield row, group, col

    def cell(self, key: tuple[str, str, str]) -> Cell:
        return self.cells.get(key) or Cell((None,) * len(self.metrics))


def compute_marks(grid: Grid) -> dict[tuple[str, str, str, int], str]:
    """``best``/``second`` per (row, group, column, metric index); ties share the mark."""
    lines: list[list[tuple[str, str, str]]] = []
    if grid.mark_axis not in ("row", "column", "none"):
        raise ValueError(f"mark_axis must be row, column or none, not {grid.mark_axis!r}")
    if grid.mark_axis == "row":
        for row in grid.rows:
            for group, cols in grid.groups:
                lines.append([(row, group, col) for col in cols])
    else:
        for group, cols in grid.groups:
            for col in cols:
                lines.append([(row, group, col) for row in grid.rows])
    marks: dict[tuple[str, str, str, int], str] = {}
    if grid.mark_axis == "none":
        return marks
    for line in lines:
        for m in range(len(grid.metrics)):
            ranked = {}
            for key in line:
                cell = grid.cell(key)
                stat = cell.stats[m]
                if stat is not None and not cell.partial:
                    ranked[key] = round(stat.mean, grid.decimals)
            if len(ranked) < 2:
                continue  # nothing to compare with
            levels = sorted(set(ranked.values()), reverse=True)
            for key, value in ranked.items():
                if value == levels[0]:
                    marks[(*key, m)] = "best"
                elif len(levels) > 1 and value == levels[1]:
                    marks[(*key, m)] = "second"
    return marks


def _fmt(value: float, decimals: int) -> str:
    return f"{value:.{decimals}f}"


def _fmt_stat(stat: Stat | None, decimals: int, plus_minus: str) -> str:
    if stat is None:
        return MISSING
    text = _fmt(stat.mean, decimals)
    if stat.std is not None:
        text += f"{plus_minus}{_fmt(stat.std, decimals)}"
    return text


def _column_titles(grid: Grid) -> list[str]:
    titles = []
    for group, cols in grid.groups:
        titles.extend(f"{group}: {col}" if group else col for col in cols)
    return titles


def grid_markdown(grid: Grid) -> str:
    """The grid as a Markdown table: bold best, ``<u>`` second, ``—`` missing, ``*`` partial."""
    marks = compute_marks(grid)
    lines = ["| " + " | ".join([grid.row_header, *_column_titles(grid)]) + " |",
             "|" + "|".join(["---"] + [":-:"] * len(_column_titles(grid))) + "|"]
    for row in grid.rows:
        out = [f"**{row}**" if row == AVERAGE else row]
        for group, cols in grid.groups:
            for col in cols:
                cell = grid.cell((row, group, col))
                parts = []
                for m, stat in enumerate(cell.stats):
                    text = _fmt_stat(stat, grid.decimals, "±")
                    mark = marks.get((row, group, col, m))
                    if mark == "best":
                        text = f"**{text}**"
                    elif mark == "second":
                        text = f"<u>{text}</u>"
                    parts.append(text)
                text = " / ".join(parts)
                if cell.partial and any(s is not None for s in cell.stats):
                    text += " \\*"
                out.append(text)
        lines.append("| " + " | ".join(out) + " |")
    return "\n".join(lines) + "\n"


def values_markdown(grid: Grid, values: dict, signed: bool) -> str:
    """A grid-shaped Markdown table of plain numbers (paper values or deltas)."""
    lines = ["| " + " | ".join([grid.row_header, *_column_titles(grid)]) + " |",
             "|" + "|".join(["---"] + [":-:"] * len(_column_titles(grid))) + "|"]
    for row in grid.rows:
        out = [row]
        for group, cols in grid.groups:
            for col in cols:
                vals = values.get((row, group, col)) or (None,) * len(grid.metrics)
                out.append(" / ".join(
                    MISSING if v is None else (f"{v:+.{grid.decimals}f}" if signed
                                               else _fmt(v, grid.decimals))
                    for v in vals))
        lines.append("| " + " | ".join(out) + " |")
    return "\n".join(lines) + "\n"


def grid_deltas(grid: Grid) -> dict[tuple[str, str, str], tuple[float | None, ...]]:
    """Per cell and metric: our mean minus the paper's value, where both exist."""
    deltas = {}
    for key in grid.keys():
        paper = grid.paper.get(key)
        if paper is None:
            continue
        cell = grid.cell(key)
        deltas[key] = tuple(
            None if (s is None or p is None) else s.mean - p for s, p in zip(cell.stats, paper)
        )
    return deltas


_LATEX_ESCAPES = {"\\": r"\textbackslash{}", "&": r"\&", "%": r"\%", "$": r"\$", "#": r"\#",
                  "_": r"\_", "{": r"\{", "}": r"\}", "~": r"\textasciitilde{}",
                  "^": r"\textasciicircum{}", "±": r"$\pm$", "—": "--", "−": "-",
                  "Δ": r"$\Delta$"}


def _tex(text: str) -> str:
    return "".join(_LATEX_ESCAPES.get(c, c) for c in str(text))


def grid_latex(grid: Grid) -> str:
    """The grid as a booktabs LaTeX table (bold best, underlined second)."""
    marks = compute_marks(grid)
    ncols = sum(len(cols) for _, cols in grid.groups)
    lines = [r"\begin{table}[t]", r"\centering", rf"\caption{{{_tex(grid.caption)}}}",
             r"\resizebox{\linewidth}{!}{%", rf"\begin{{tabular}}{{l{'c' * ncols}}}", r"\toprule"]
    if len(grid.groups) > 1 or grid.groups[0][0]:
        head, rules, start = [""], [], 2
        for group, cols in grid.groups:
            head.append(rf"\multicolumn{{{len(cols)}}}{{c}}{{{_tex(group)}}}")
            rules.append(rf"\cmidrule(lr){{{start}-{start + len(cols) - 1}}}")
            start += len(cols)
        lines.append(" & ".join(head) + r" \\")
        lines.append(" ".join(rules))
    cols = [_tex(c) for _, cs in grid.groups for c in cs]
    lines.append(" & ".join([_tex(grid.row_header), *cols]) + r" \\")
    lines.append(r"\midrule")
    for row in grid.rows:
        if row == AVERAGE:
            lines.append(r"\midrule")
        out = [_tex(row)]
        for group, cs in grid.groups:
            for col in cs:
                cell = grid.cell((row, group, col))
                parts = []
                for m, stat in enumerate(cell.stats):
                    text = "--" if stat is None else _fmt_stat(stat, grid.decimals, r"$\pm$")
                    mark = marks.get((row, group, col, m))
                    if mark == "best":
                        text = rf"\textbf{{{text}}}"
                    elif mark == "second":
                        text = rf"\underline{{{text}}}"
                    parts.append(text)
                text = " / ".join(parts)
                if cell.partial and any(s is not None for s in cell.stats):
                    text += "$^*$"
                out.append(text)
        lines.append(" & ".join(out) + r" \\")
    lines += [r"\bottomrule", r"\end{tabular}}", r"\end{table}"]
    return "\n".join(lines) + "\n"


def grid_csv(grid: Grid, setting: Setting) -> str:
    """Long CSV: one line per (row, group, column, metric) with ours, the paper's and the delta."""
    marks = compute_marks(grid)
    deltas = grid_deltas(grid)
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(["table", "dataset", "noise_ratio", "image_size", "teacher_weights", "row",
                     "group", "column", "metric", "mean", "std", "n", "partial", "mark",
                     "paper", "delta"])
    for key in grid.keys():
        cell = grid.cell(key)
        paper = grid.paper.get(key) or (None,) * len(grid.metrics)
        delta = deltas.get(key) or (None,) * len(grid.metrics)
        for m, metric in enumerate(grid.metrics):
            stat = cell.stats[m]
            writer.writerow([
                grid.stem, setting.dataset, f"{setting.noise_ratio:g}", setting.image_size,
                setting.teacher_weights, key[0], key[1], key[2], metric,
                "" if stat is None else repr(stat.mean),
                "" if stat is None or stat.std is None else repr(stat.std),
                0 if stat is None else stat.n, int(cell.partial), marks.get((*key, m), ""),
                "" if paper[m] is None else repr(paper[m]),
                "" if delta[m] is None else repr(delta[m]),
            ])
    return buf.getvalue()


def grid_document(grid: Grid) -> str:
    """The Markdown file of one table: ours, then the paper's values and the deltas."""
    parts = [f"## {grid.title}\n", f"{grid.caption}\n", grid_markdown(grid)]
    notes = list(grid.notes)
    if any(c.partial and any(s is not None for s in c.stats) for c in grid.cells.values()):
        notes.append("\\* average over fewer categories than the table has (missing runs); "
                     "not ranked.")
    if notes:
        parts.append("\n".join(f"- {n}" for n in notes) + "\n")
    if any(any(v is not None for v in vals) for vals in grid.paper.values()):
        parts += ["### Paper\n", values_markdown(grid, grid.paper, signed=False),
                  "### Δ (ours − paper)\n", values_markdown(grid, grid_deltas(grid), signed=True)]
    return "\n".join(parts)


# --------------------------------------------------------------------------------------------
# Building the tables of one setting.


def _facts(label: str):
    """The method facts (:func:`methods.base.method_facts`) of a column label's method."""
    from methods.base import method_facts

    return method_facts(label.split("[", 1)[0])


def _method_order(label: str) -> tuple:
    # The paper's order (each method's ``column_rank``): baselines first, CDD last.
    return (_facts(label).rank, label)


def _category_order(dataset: str, categories: Iterable[str]) -> list[str]:
    known = PAPER_CATEGORIES.get(dataset, ())
    cats = set(categories)
    return [c for c in known if c in cats] + sorted(cats - set(known))


def _display(label: str) -> str:
    _, _, rest = label.partition("[")
    name = _facts(label).label
    return f"{name}[{rest}" if rest else name


def _columns(labels: list[str]) -> list[str]:
    """Column titles of ``labels``, unique: two labels with the same title (a method and a
    variant of it, say) keep their own names in brackets."""
    titles = [_display(lb) for lb in labels]
    return [f"{t} ({lb})" if titles.count(t) > 1 else t for t, lb in zip(titles, labels)]


class _Cube:
    """Values indexed by (label, category, protocol, metric) -> {seed: value}."""

    def __init__(self, runs: list[Run], metrics: tuple[str, ...]):
        self.values: dict[tuple[str, str, str, str], dict[tuple[int, int], float]] = (
            defaultdict(dict))
        for run in runs:
            if not run.complete:
                continue
            for protocol in PROTOCOLS:
                for metric in metrics:
                    value = run.value(protocol, metric)
                    if value is not None:
                        self.values[(run.label, run.category, protocol, metric)][run.seed] = value

    def stat(self, label, category, protocol, metric) -> Stat | None:
        return stat_of(self.values.get((label, category, protocol, metric), {}).values())

    def average(self, label, categories, protocol, metric) -> tuple[Stat | None, bool]:
        """Average over ``categories``: (stat, partial). The std is over seeds when every
        category has the same seeds (each seed's own average), else omitted."""
        per_cat = {c: self.values.get((label, c, protocol, metric), {}) for c in categories}
        present = {c: v for c, v in per_cat.items() if v}
        if not present:
            return None, False
        partial = len(present) < len(categories)
        seed_sets = {frozenset(v) for v in present.values()}
        if len(seed_sets) == 1:
            seeds = sorted(next(iter(seed_sets)))
            per_seed = [statistics.fmean(present[c][s] for c in present) for s in seeds]
            return stat_of(per_seed), partial
        means = [statistics.fmean(v.values()) for v in present.values()]
        n = min(len(v) for v in present.values())
        return Stat(statistics.fmean(means), None, n), partial


def _paper_tables(setting: Setting, protocol: str, metric: str, kind: str) -> tuple[str, ...]:
    """Which paper tables hold the cell, in order of preference, for this kind of table."""
    if not setting.has_paper_values:
        return ()
    per_metric = {"mvtec": {"i_auroc": "A3", "p_auroc": "A4", "pro_rd4ad": "A5", "aupro": "A5"},
                  "visa": {"i_auroc": "A6", "p_auroc": "A7", "pro_rd4ad": "A8", "aupro": "A8"}}
    a_table = per_metric[setting.dataset].get(metric)
    if kind == "per_metric":
        return (a_table,) if a_table else ()
    if setting.dataset == "mvtec":
        first = "1" if protocol == "no_overlap" else "2"
        return (first, a_table) if a_table else (first,)
    return ("3", a_table) if kind == "summary" and a_table else ((a_table,) if a_table else ())


@dataclass
class _SettingTables:
    """What every table of one setting shares: its methods (labels, in column order, and
    their column titles), categories, the values, the category averages and the caption
    texts."""

    setting: Setting
    metrics: tuple[str, ...]
    labels: list[str]
    columns: list[str]
    categories: list[str]
    cube: _Cube
    averages: dict[tuple[str, str, str], tuple[Stat | None, bool]]
    pro_text: str
    seed_text: str
    coverage: str
    paper: PaperLookup

    @classmethod
    def of(cls, setting: Setting, runs: list[Run], pro: str, paper: PaperLookup):
        metrics = ("i_auroc", "p_auroc", pro)
        labels = sorted({r.label for r in runs}, key=_method_order)
        categories = _category_order(setting.dataset, {r.category for r in runs})
        cube = _Cube(runs, metrics)
        seeds = sorted({r.seed for r in runs if r.complete})
        averages = {(label, protocol, metric): cube.average(label, categories, protocol, metric)
                    for label in labels for protocol in PROTOCOLS for metric in metrics}
        return cls(
            setting=setting, metrics=metrics, labels=labels, columns=_columns(labels),
            categories=categories, cube=cube, averages=averages,
            pro_text=f"PRO = {PRO_DESCRIPTIONS[pro]}.",
            seed_text=(f"Mean ± std over seeds (split_seed, train_seed) {seeds}."
                       if len(seeds) > 1 else ""),
            coverage=_coverage_note(setting, categories), paper=paper)

    @property
    def notes(self) -> list[str]:
        return [self.coverage] if self.coverage else []

    def paper_cell(self, kind: str, category: str, label: str, protocol: str,
                   metric_list) -> tuple[float | None, ...] | None:
        """The paper's values of one cell, from the tables that hold ``kind``'s cells; an
        average only where our categories are the paper's."""
        name = _facts(label).paper_name
        if name is None or (category == AVERAGE
                            and not _covers_paper(self.setting, self.categories)):
            return None
        s = self.setting
        vals = tuple(
            self.paper.get(_paper_tables(s, protocol, m, kind), s.dataset, s.noise_ratio,
                           protocol, "average" if category == AVERAGE else category, name, m)
            for m in metric_list)
        return vals if any(v is not None for v in vals) else None


def build_setting_grids(setting: Setting, runs: list[Run], pro: str,
                        paper: PaperLookup) -> list[Grid]:
    """Main (per protocol), summary and per-metric tables of one setting."""
    tables = _SettingTables.of(setting, runs, pro, paper)
    return [*(_main_grid(tables, protocol) for protocol in PROTOCOLS), _summary_grid(tables),
            *(_per_metric_grid(tables, metric) for metric in tables.metrics)]


def _main_grid(t: _SettingTables, protocol: str) -> Grid:
    """Tables 1 and 2-like: categories x methods, I-AUC / P-AUC / PRO cells, for a protocol."""
    cells, paper_cells = {}, {}
    for label, col in zip(t.labels, t.columns):
        for cat in t.categories:
            cells[(cat, "", col)] = Cell(tuple(t.cube.stat(label, cat, protocol, m)
                                               for m in t.metrics))
        avg = [t.averages[(label, protocol, m)] for m in t.metrics]
        cells[(AVERAGE, "", col)] = Cell(tuple(a[0] for a in avg), any(a[1] for a in avg))
        for cat in [*t.categories, AVERAGE]:
            pc = t.paper_cell("main", cat, label, protocol, t.metrics)
            if pc:
                paper_cells[(cat, "", col)] = pc
    number = "1" if protocol == "no_overlap" else "2"
    return Grid(
        stem=f"main_{t.setting.slug}_{protocol}",
        title=f"Table {number}-like: {PROTOCOL_TITLES[protocol]}, {t.setting.title}",
        caption=(f"I-AUC / P-AUC / PRO under the {PROTOCOL_TITLES[protocol]} protocol on "
                 f"{t.setting.title}; best in bold, second underlined. {t.pro_text} "
                 f"{t.seed_text}").strip(),
        row_header="Category", rows=[*t.categories, AVERAGE], groups=[("", t.columns)],
        metrics=t.metrics, cells=cells, paper=paper_cells, kind="main", notes=t.notes)


def _summary_grid(t: _SettingTables) -> Grid:
    """Table 3-like summary: (protocol, metric) x methods, averages only."""
    rows, cells, paper_cells = [], {}, {}
    for protocol in PROTOCOLS:
        for metric in t.metrics:
            row = f"{PROTOCOL_TITLES[protocol]} {METRIC_TITLES[metric]}"
            rows.append(row)
            for label, col in zip(t.labels, t.columns):
                stat, partial = t.averages[(label, protocol, metric)]
                cells[(row, "", col)] = Cell((stat,), partial)
                pc = t.paper_cell("summary", AVERAGE, label, protocol, (metric,))
                if pc:
                    paper_cells[(row, "", col)] = pc
    return Grid(
        stem=f"summary_{t.setting.slug}",
        title=f"Table 3-like summary: {t.setting.title}",
        caption=(f"Averages over categories on {t.setting.title}; best in bold, second "
                 f"underlined. {t.pro_text} {t.seed_text}").strip(),
        row_header="Setting / metric", rows=rows, groups=[("", t.columns)], metrics=("value",),
        cells=cells, paper=paper_cells, kind="summary", notes=t.notes)


def _per_metric_grid(t: _SettingTables, metric: str) -> Grid:
    """Tables A3-A8-like: one metric, both protocols side by side."""
    cells, paper_cells = {}, {}
    groups = [(PROTOCOL_TITLES[p], list(t.columns)) for p in PROTOCOLS]
    for protocol in PROTOCOLS:
        group = PROTOCOL_TITLES[protocol]
        for label, col in zip(t.labels, t.columns):
            for cat in t.categories:
                cells[(cat, group, col)] = Cell((t.cube.stat(label, cat, protocol, metric),))
            stat, partial = t.averages[(label, protocol, metric)]
            cells[(AVERAGE, group, col)] = Cell((stat,), partial)
            for cat in [*t.categories, AVERAGE]:
                pc = t.paper_cell("per_metric", cat, label, protocol, (metric,))
                if pc:
                    paper_cells[(cat, group, col)] = pc
    name = METRIC_TITLES[metric]
    return Grid(
        stem=f"per_metric_{t.setting.slug}_{metric}",
        title=f"Table A3-A8-like: {name} on {t.setting.title}",
        caption=(f"{name} under the No overlap and Overlap protocols on {t.setting.title}; "
                 f"best in bold, second underlined. "
                 f"{t.pro_text if metric == t.metrics[2] else ''} {t.seed_text}").strip(),
        row_header="Category", rows=[*t.categories, AVERAGE], groups=groups,
        metrics=("value",), cells=cells, paper=paper_cells, kind="per_metric", notes=t.notes)


def _covers_paper(setting: Setting, categories: list[str]) -> bool:
    """Whether an average over ``categories`` is the same quantity as the paper's Average."""
    return set(categories) == set(PAPER_CATEGORIES.get(setting.dataset, ()))


def _coverage_note(setting: Setting, categories: list[str]) -> str:
    known = PAPER_CATEGORIES.get(setting.dataset)
    if known and len([c for c in categories if c in known]) < len(known):
        return (f"This table covers {len(categories)} of the paper's {len(known)} "
                f"{setting.dataset} categories: its averages are not the paper's, so they get "
                "no paper value or delta.")
    return ""


def build_ablation_grids(setting: Setting, runs: list[Run], pro: str,
                         paper: PaperLookup) -> list[Grid]:
    """Tables 4, 5, 6, A1, A2-like grids from the ``cdd-t4-*`` ... ``cdd-a2-*`` variants."""
    metrics = ("i_auroc", "p_auroc", pro)
    by_table: dict[str, list[Run]] = defaultdict(list)
    for run in runs:
        table = ablation_table_of(run.method)
        if table:
            by_table[table].append(run)
    if not by_table:
        return []
    protocol = "no_overlap"
    cols = [METRIC_TITLES[m] for m in metrics] + [METRIC_TITLES["average"]]
    grids = []
    for table in (t for t in ABLATION_PREFIXES if t in by_table):
        truns = by_table[table]
        cube = _Cube(truns, metrics)
        categories = _category_order(setting.dataset, {r.category for r in truns})
        paper_order = list(ABLATION_ROW_ALIASES[table])
        labels = sorted({r.label for r in truns}, key=lambda lb: (
            paper_order.index(ablation_row_of(lb.split("[", 1)[0]))
            if ablation_row_of(lb.split("[", 1)[0]) in paper_order else len(paper_order), lb))
        rows, cells, paper_cells = [], {}, {}
        for label in labels:
            base = label.split("[", 1)[0]
            paper_row = ablation_row_of(base)
            shown = paper_row or _facts(base).description or label
            row = f"{shown} ({label})" if shown != label else label
            rows.append(row)
            stats = []
            partial = False
            for metric in metrics:
                stat, part = cube.average(label, categories, protocol, metric)
                stats.append(stat)
                partial |= part
            stats.append(_mean_of_metrics(cube, label, categories, protocol, metrics))
            for col, stat in zip(cols, stats):
                cells[(row, "", col)] = Cell((stat,), partial)
            if (paper_row and setting.has_paper_values and setting.dataset == "mvtec"
                    and _covers_paper(setting, categories)):
                for col, metric in zip(cols, [*metrics, "average"]):
                    value = paper.get((table,), "mvtec", setting.noise_ratio, protocol, "average",
                                      paper_row, metric)
                    if value is not None:
                        paper_cells[(row, "", col)] = (value,)
        notes = ["Rows are method variants; the paper row a variant matches comes from its name "
                 "(see docs/report.md). Averages over categories, No overlap protocol."]
        coverage = _coverage_note(setting, categories)
        if coverage:
            notes.insert(0, coverage)
        grids.append(Grid(
            stem=f"ablation_table{table}_{setting.slug}",
            title=f"Table {table}-like ablation: {setting.title}",
            caption=(f"Ablation (paper Table {table}) on {setting.title}, No overlap, averages "
                     f"over {len(categories)} categories; best in bold, second underlined per "
                     f"column. PRO = {PRO_DESCRIPTIONS[pro]}."),
            row_header="Variant", rows=rows, groups=[("", cols)], metrics=("value",),
            cells=cells, decimals=4, mark_axis="column", notes=notes, paper=paper_cells,
            kind="ablation"))
    return grids


def _mean_of_metrics(cube: _Cube, label, categories, protocol, metrics) -> Stat | None:
    """The ablation tables' Average column: mean of the three metrics, per seed."""
    per_seed: dict[tuple[int, int], list[float]] = defaultdict(list)
    for metric in metrics:
        for cat in categories:
            for seed, value in cube.values.get((label, cat, protocol, metric), {}).items():
                per_seed[seed].append(value)
    full = len(metrics) * len(categories)
    values = [statistics.fmean(v) for v in per_seed.values() if len(v) == full]
    if values:
        return stat_of(values)
    stats = [cube.average(label, categories, protocol, m)[0] for m in metrics]
    if any(s is None for s in stats):
        return None
    return Stat(statistics.fmean(s.mean for s in stats), None, min(s.n for s in stats))


# --------------------------------------------------------------------------------------------
# Provenance, missing runs and the index.


def provenance(runs: list[Run]) -> tuple[list[str], list[str]]:
    """(lines describing where the numbers come from, reasons they are not paper-comparable)."""
    done = [r for r in runs if r.complete] or runs
    commits, devices, weights, sizes, sweeps = set(), set(), set(), set(), set()
    epochs: dict[str, set] = defaultdict(set)
    backbones: set[str] = set()
    split_seeds, train_seeds = set(), set()
    for run in done:
        env = run.record.get("environment") or {}
        commit = str(env.get("commit") or "unknown")
        commits.add(commit + (" (uncommitted changes)" if env.get("dirty") else ""))
        device = env.get("device_name") or env.get("device") or "unknown"
        devices.add(str(device))
        weights.add(run.setting.teacher_weights)
        prov_weights = (run.record.get("provenance") or {}).get("teacher_weights")
        if prov_weights and same_teacher_name(str(prov_weights)) != run.setting.teacher_weights:
            weights.add(str(prov_weights))
        sizes.add(run.setting.image_size)
        # resolved_config has every field; a failed run only has the spec's overrides.
        cfg = run.record.get("resolved_config") or run.record["spec"].get("config") or {}
        if "epochs" in cfg:
            epochs[run.method].add(cfg["epochs"])
        if cfg.get("backbone"):
            backbones.add(str(cfg["backbone"]))
        split_seeds.add(run.seed[0])
        train_seeds.add(run.seed[1])
        if run.record.get("sweep"):
            sweeps.add(str(run.record["sweep"]))
    epoch_text = "; ".join(f"{m}: {', '.join(map(str, sorted(v, key=str)))}"
                           for m, v in sorted(epochs.items())) or "not recorded"
    lines = [
        f"Commit: {', '.join(sorted(commits))}",
        f"Teacher weights: {', '.join(sorted(weights))}",
        f"Backbone: {', '.join(sorted(backbones)) or 'not recorded'}",
        f"Image size: {', '.join(str(s) for s in sorted(sizes))} px",
        f"Epochs: {epoch_text}",
        f"Device: {', '.join(sorted(devices))}",
        f"Seeds: split {sorted(split_seeds)}, train {sorted(train_seeds)}",
    ]
    if sweeps:
        lines.append(f"Sweeps: {', '.join(sorted(sweeps))}")
    reasons = []
    bad_weights = sorted(w for w in {r.setting.teacher_weights for r in done}
                         if w != PAPER_TEACHER_WEIGHTS)
    if bad_weights:
        reasons.append(f"teacher weights {', '.join(bad_weights)} (paper: imagenet)")
    bad_sizes = sorted(s for s in sizes if s != PAPER_IMAGE_SIZE)
    if bad_sizes:
        reasons.append(f"image size {', '.join(map(str, bad_sizes))} (paper: 224)")
    return lines, reasons + _setup_departures(done)


def _setup_departures(runs: list[Run]) -> list[str]:
    """Where the runs' resolved configs leave the paper's setup, each method's own
    (``paper_setup``): ``epochs 12 (paper: 200)``, and the caps the paper did not set (a
    ``None`` there) as ``training capped by max_steps=2``."""
    differ: dict[tuple[str, str], set[str]] = {}  # (field, paper value) -> values, in order
    caps: set[str] = set()
    for run in runs:
        # resolved_config has every field; a failed run only has the spec's overrides.
        cfg = run.record.get("resolved_config") or run.record["spec"].get("config") or {}
        for name, paper_value in _facts(run.method).paper_setup.items():
            if name not in cfg:
                continue
            if paper_value is None:
                if cfg[name] is not None:
                    caps.add(f"{name}={cfg[name]}")
            elif json_ready(cfg[name]) != json_ready(paper_value):  # a JSON list is a tuple
                differ.setdefault((name, str(paper_value)), set()).add(str(cfg[name]))
    reasons = [f"{name} {', '.join(sorted(values))} (paper: {paper_value})"
               for (name, paper_value), values in differ.items()]
    if caps:
        reasons.append(f"training capped by {', '.join(sorted(caps))} (paper: full epochs)")
    return reasons


def missing_runs(runs: list[Run]) -> list[dict]:
    """Cells of the tables without a complete run: never-run combinations and failures."""
    out = []
    by_setting: dict[Setting, list[Run]] = defaultdict(list)
    for run in runs:
        by_setting[run.setting].append(run)
    for setting, sruns in sorted(by_setting.items(), key=lambda kv: kv[0].order):
        groups = [[r for r in sruns if ablation_table_of(r.method) is None]]
        for table in ABLATION_PREFIXES:
            groups.append([r for r in sruns if ablation_table_of(r.method) == table])
        for group in groups:
            if not group:
                continue
            labels = sorted({r.label for r in group}, key=_method_order)
            categories = _category_order(setting.dataset, {r.category for r in group})
            for label in labels:
                for cat in categories:
                    cell = [r for r in group if r.label == label and r.category == cat]
                    if any(r.complete for r in cell):
                        continue
                    failed = [r for r in cell if not r.complete
                              and r.record.get("status") != PLANNED]
                    out.append({
                        "setting": setting.title, "category": cat, "method": label,
                        "status": "failed" if failed else "not run",
                        "detail": failed[0].error if failed else "",
                    })
    return out


def _undefined_metrics(runs: list[Run]) -> list[str]:
    """One line per setting, category, method and protocol whose complete runs recorded
    metrics they could not compute (``undefined_metrics``, e.g. a test set without normal
    images), with the reason, however many seeds share it."""
    seen: dict[tuple, set[str]] = {}
    for run in runs:
        if not run.complete:
            continue
        for protocol in ("no_overlap", "overlap"):
            entry = (run.record.get("undefined_metrics") or {}).get(protocol)
            if isinstance(entry, dict):
                key = (run.setting.order, run.setting.title, run.category, run.label, protocol,
                       str(entry.get("reason", "")))
                seen.setdefault(key, set()).update(map(str, entry.get("metrics") or ()))
    return [f"{title} {category} {label}, {protocol.replace('_', ' ')}: "
            f"{', '.join(sorted(names))} ({reason})"
            for (_, title, category, label, protocol, reason), names in sorted(seen.items())]


def _write_text(path: Path, text: str) -> None:
    write_bytes_atomic(path, text.encode("utf-8"))


def _link(path: Path, base: Path) -> str:
    return path.relative_to(base).as_posix()


def render_report(results_dir: str | Path, out_dir: str | Path | None = None, *,
                  pro: str = "pro_rd4ad", figures: bool = True) -> Path:
    """Render every table and figure the records allow; returns the path of ``report.md``."""
    results_dir = Path(results_dir)
    if pro not in PRO_VARIANTS:
        raise UserError(f"unknown PRO variant {pro!r}; use one of {', '.join(PRO_VARIANTS)}")
    if not results_dir.is_dir():
        raise UserError(f"results folder {results_dir} does not exist; pass the folder that "
                        f"`run_benchmark.py run` wrote (it holds runs/)")
    runs = load_runs(results_dir)
    if not runs:
        raise UserError(f"no run records under {results_dir / 'runs'}; run a sweep first "
                        f"(`run_benchmark.py run ...`) or point --results at its folder")
    out = Path(out_dir) if out_dir is not None else results_dir / REPORT_DIR
    tables_dir, figures_dir = out / "tables", out / "figures"
    paper = PaperLookup()

    by_setting: dict[Setting, list[Run]] = defaultdict(list)
    for run in runs:
        by_setting[run.setting].append(run)
    settings = sorted(by_setting, key=lambda s: s.order)
    table_links: list[tuple[Setting, Grid]] = []
    for setting in settings:
        sruns = by_setting[setting]
        main_runs = [r for r in sruns if ablation_table_of(r.method) is None]
        grids = []
        if main_runs:
            grids += build_setting_grids(setting, main_runs, pro, paper)
        grids += build_ablation_grids(setting, sruns, pro, paper)
        for grid in grids:
            _write_text(tables_dir / f"{grid.stem}.md", grid_document(grid))
            tex = grid_latex(grid)
            if grid.paper:
                delta_grid = _delta_grid(grid)
                tex += "\n" + grid_latex(delta_grid)
            _write_text(tables_dir / f"{grid.stem}.tex", tex)
            _write_text(tables_dir / f"{grid.stem}.csv", grid_csv(grid, setting))
            table_links.append((setting, grid))

    figure_entries: list[tuple[str, Path]] = []
    figure_notes: list[str] = []
    if figures:
        from bench import figures as figs

        figure_entries, figure_notes = figs.render_figures(
            runs, figures_dir, pro=pro, scores_path=lambda r: run_dir(
                results_dir, r.fingerprint) / "scores.npz")

    missing = missing_runs(runs)
    if missing:
        _write_text(out / "missing_runs.csv", _missing_csv(missing))
    index = _index(results_dir, out, runs, table_links, figure_entries, figure_notes, missing,
                   pro)
    path = out / "report.md"
    _write_text(path, index)
    written = {tables_dir / f"{grid.stem}.{ext}" for _, grid in table_links
               for ext in ("md", "tex", "csv")}
    written |= {stem.parent / f"{stem.name}.{ext}" for _, stem in figure_entries
                for ext in ("png", "pdf")}
    if missing:
        written.add(out / "missing_runs.csv")
    _remove_stale(out, written, [tables_dir] + ([figures_dir] if figures else []))
    return path


def _remove_stale(out: Path, keep: set[Path], folders: list[Path]) -> None:
    """Delete what an earlier rendering left in ``folders`` (and a missing-runs list) that this
    one did not write (a table of a setting that is gone, say), so the folder, and what MLflow
    receives of it, is this report alone. Only the report's own folders are touched."""
    candidates = [out / "missing_runs.csv"]
    for folder in folders:
        if folder.is_dir():
            candidates += [p for p in folder.iterdir() if p.is_file()]
    for path in candidates:
        if path not in keep:
            path.unlink(missing_ok=True)


def _delta_grid(grid: Grid) -> Grid:
    """The per-cell delta as a grid of its own (for LaTeX); no marks."""
    deltas = grid_deltas(grid)
    cells = {k: Cell(tuple(None if v is None else Stat(v, None, 1) for v in vals))
             for k, vals in deltas.items()}
    return Grid(stem=f"{grid.stem}_delta", title=f"{grid.title}: Δ vs paper",
                caption=f"Delta (ours - paper) for: {grid.caption}", row_header=grid.row_header,
                rows=grid.rows, groups=grid.groups, metrics=grid.metrics, cells=cells,
                decimals=grid.decimals, mark_axis="none")


def _missing_csv(missing: list[dict]) -> str:
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=["setting", "category", "method", "status",
                                             "detail"], lineterminator="\n")
    writer.writeheader()
    writer.writerows(missing)
    return buf.getvalue()


def _index(results_dir: Path, out: Path, runs: list[Run], tables: list[tuple[Setting, Grid]],
           figures: list[tuple[str, Path]], figure_notes: list[str], missing: list[dict],
           pro: str) -> str:
    n_ok = sum(r.complete for r in runs)
    n_planned = sum(r.record.get("status") == PLANNED for r in runs)
    pending = f", {n_planned} planned by a sweep but not run" if n_planned else ""
    lines = ["# Benchmark report", "",
             f"Results: `{results_dir}` — {n_ok} complete run(s), "
             f"{len(runs) - n_ok - n_planned} failed{pending}.", ""]
    prov, reasons = provenance(runs)
    lines.append("## Provenance")
    lines.append("")
    if reasons:
        lines.append(f"> **NOT PAPER-COMPARABLE:** {'; '.join(reasons)}.")
    else:
        lines.append("> Paper-comparable setup: ImageNet teacher, 224 px, 200 epochs.")
    lines.append("")
    lines += [f"- {line}" for line in prov]
    lines += ["", f"\"PRO\" in every table is {PRO_DESCRIPTIONS[pro]}; the CSVs hold the "
              f"values shown and `--pro {'aupro' if pro == 'pro_rd4ad' else 'pro_rd4ad'}` "
              "renders the other variant. The paper does not name its PRO variant "
              "(see docs/report.md).", ""]
    lines += ["## Tables", ""]
    current = None
    for setting, grid in tables:
        if setting != current:
            current = setting
            paper_note = ("" if setting.has_paper_values
                          else " (no paper values at this dataset and ratio)")
            lines += ["", f"### {setting.title}{paper_note}", ""]
        stem = Path("tables") / grid.stem
        lines.append(f"- [{grid.title}]({stem.as_posix()}.md) "
                     f"([LaTeX]({stem.as_posix()}.tex), [CSV]({stem.as_posix()}.csv))")
        if grid.kind in ("summary", "ablation"):
            lines += ["", grid_markdown(grid)]
    lines += ["", "## Figures", ""]
    if figures:
        for title, path in figures:
            rel = _link(path, out)
            lines.append(f"- [{title}]({rel}.png) ([PDF]({rel}.pdf))")
    else:
        lines.append("No figures.")
    if figure_notes:
        lines += ["", "Notes on the figures:", ""] + [f"- {n}" for n in figure_notes]
    lines += ["", "## Missing and failed runs", ""]
    if missing:
        lines += [f"{len(missing)} table cell(s) have no complete run; they show as "
                  f"\"{MISSING}\" (list also in [missing_runs.csv](missing_runs.csv)).", "",
                  "| setting | category | method | status | detail |", "|---|---|---|---|---|"]
        for m in missing:
            detail = m["detail"].replace("|", "\\|")[:200]
            lines.append(f"| {m['setting']} | {m['category']} | {m['method']} | "
                         f"{m['status']} | {detail} |")
    else:
        lines.append("None: every table cell has a complete run.")
    undefined = _undefined_metrics(runs)
    if undefined:
        lines += ["", "## Metrics that could not be computed", "",
                  f"These cells show as \"{MISSING}\" although the runs are complete:", ""]
        lines += [f"- {line}" for line in undefined]
    lines += ["", "## Conventions", "",
              "- Bold = best, <u>underlined</u> = second-best distinct value in the row "
              "(ablation tables: in the column), compared at the printed precision; tied "
              "values share the mark.",
              "- `a±b` = mean ± sample standard deviation over seeds; `—` = no complete run; "
              "`*` = average over fewer categories than the table has (not ranked).",
              "- Δ = ours − paper, per cell, where the paper has the cell "
              "(MVTec AD at 0.1, VisA at 0.05).", ""]
    return "\n".join(lines)
