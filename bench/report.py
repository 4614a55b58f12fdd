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

Uncertainty (docs/report.md): every cell of a run with a ``scores.npz`` gets a 95 % bootstrap
interval over test images (:mod:`bench.uncertainty`), each Δ cell a mark saying whether the
paper's value lies inside it, and every setting ``paired_<setting>`` (each method against the
references, RD and CDD by paper name) and ``friedman_<setting>`` tables
(:mod:`bench.comparisons`). Runs on the toy categories of appendix A.2 (:mod:`bench.toy`) get
their own table and figure.
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
from bench.stats import Interval, Stat
from bench.uncertainty import DEFAULT_REPLICATES, LEVEL, interval, mean_deviations

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
    # Bootstrap deviations over test images per (protocol, metric), (B,) arrays: replicate
    # minus the value on the stored arrays (bench.uncertainty); empty without scores.npz.
    deviations: dict = field(default_factory=dict)

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
    # 95 % bootstrap intervals over test images, one per metric (None: not available)
    intervals: tuple[Interval | None, ...] | None = None

    def interval(self, m: int) -> Interval | None:
        return self.intervals[m] if self.intervals else None


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


def _grid_header(grid: Grid) -> list[str]:
    """A grid table's Markdown header and alignment rows."""
    titles = _column_titles(grid)
    return ["| " + " | ".join([grid.row_header, *titles]) + " |",
            "|" + "|".join(["---"] + [":-:"] * len(titles)) + "|"]


def grid_markdown(grid: Grid) -> str:
    """The grid as a Markdown table: bold best, ``<u>`` second, ``—`` missing, ``*`` partial."""
    marks = compute_marks(grid)
    lines = _grid_header(grid)
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


def values_markdown(grid: Grid, values: dict, signed: bool, marks: dict | None = None) -> str:
    """A grid-shaped Markdown table of plain numbers (paper values or deltas); ``marks`` maps
    a cell to one suffix per metric (the Δ tables' noise marks)."""
    lines = _grid_header(grid)
    for row in grid.rows:
        out = [row]
        for group, cols in grid.groups:
            for col in cols:
                vals = values.get((row, group, col)) or (None,) * len(grid.metrics)
                suffixes = (marks or {}).get((row, group, col)) or ("",) * len(vals)
                out.append(" / ".join(
                    MISSING if v is None else (f"{v:+.{grid.decimals}f}" if signed
                                               else _fmt(v, grid.decimals)) + suffix
                    for v, suffix in zip(vals, suffixes)))
        lines.append("| " + " | ".join(out) + " |")
    return "\n".join(lines) + "\n"


# Noise marks of the Δ tables: the paper's value against our 95 % interval over test images.
OUTSIDE_MARK = "†"  # outside: the gap is more than another test sample would explain
NO_INTERVAL_MARK = "?"  # this cell has no interval (its runs have no usable scores.npz)


def has_intervals(grid: Grid) -> bool:
    return any(c.intervals and any(ci is not None for ci in c.intervals)
               for c in grid.cells.values())


def paper_outside(grid: Grid) -> dict[tuple[str, str, str], tuple[bool | None, ...]]:
    """Per cell and metric with a paper value: True when the paper's value lies outside our
    interval even allowing for its rounding (half a unit of the printed last digit), False
    when inside, None without an interval."""
    slack = 0.5 * 10 ** -grid.decimals
    out = {}
    for key in grid.keys():
        paper = grid.paper.get(key)
        if paper is None:
            continue
        cell = grid.cell(key)
        verdicts = []
        for m, p in enumerate(paper):
            ci = cell.interval(m)
            if p is None or ci is None or cell.stats[m] is None:
                verdicts.append(None)
            else:
                verdicts.append(p + slack < ci.low or p - slack > ci.high)
        out[key] = tuple(verdicts)
    return out


def delta_marks(grid: Grid) -> dict[tuple[str, str, str], tuple[str, ...]]:
    """Suffixes for the Δ cells: ``†`` outside the interval, ``?`` no interval, none inside;
    no marks at all when the grid has no interval anywhere."""
    if not has_intervals(grid):
        return {}
    outside = paper_outside(grid)
    deltas = grid_deltas(grid)
    marks = {}
    for key, verdicts in outside.items():
        marks[key] = tuple(
            "" if d is None else (OUTSIDE_MARK if v else "" if v is False else NO_INTERVAL_MARK)
            for v, d in zip(verdicts, deltas.get(key, (None,) * len(verdicts))))
    return marks


def _fmt_interval(ci: Interval | None, decimals: int) -> str:
    return MISSING if ci is None else f"[{_fmt(ci.low, decimals)}, {_fmt(ci.high, decimals)}]"


def _seed_suffix(cell: Cell) -> str:
    """``(3 seeds)`` for a cell over several seeds."""
    n = max((s.n for s in cell.stats if s is not None), default=0)
    return f" ({n} seeds)" if n > 1 else ""


def intervals_markdown(grid: Grid) -> str:
    """The grid's 95 % intervals in its layout, with the number of seeds where > 1."""
    lines = _grid_header(grid)
    for row in grid.rows:
        out = [f"**{row}**" if row == AVERAGE else row]
        for group, cols in grid.groups:
            for col in cols:
                cell = grid.cell((row, group, col))
                text = " / ".join(_fmt_interval(cell.interval(m), grid.decimals)
                                  for m in range(len(grid.metrics)))
                if any(s is not None for s in cell.stats):
                    text += _seed_suffix(cell)
                out.append(text)
        lines.append("| " + " | ".join(out) + " |")
    return "\n".join(lines) + "\n"


def interval_caption(level: float = LEVEL) -> str:
    return (f"{level * 100:g} % bootstrap interval over test images (percentile, stratified "
            "by label, regions resampled with their image; a cell over several seeds: the "
            "interval of the seed mean; `—`: no scores.npz to resample). It says how far the "
            "number could move with another test sample, not with another training seed "
            "(that is the ± std).")


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
                  "Δ": r"$\Delta$", "χ": r"$\chi$", "²": r"$^2$", "α": r"$\alpha$",
                  "–": "--", "†": r"$^\dagger$", "∞": r"$\infty$"}


def _tex(text: str) -> str:
    return "".join(_LATEX_ESCAPES.get(c, c) for c in str(text))


def grid_latex(grid: Grid, cell_text=None, caption: str | None = None) -> str:
    """The grid as a booktabs LaTeX table (bold best, underlined second); ``cell_text(key)``
    replaces the cells' own text (then nothing is marked)."""
    marks = compute_marks(grid) if cell_text is None else {}
    ncols = sum(len(cols) for _, cols in grid.groups)
    caption = grid.caption if caption is None else caption
    lines = [r"\begin{table}[t]", r"\centering", rf"\caption{{{_tex(caption)}}}",
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
                if cell_text is not None:
                    out.append(cell_text((row, group, col)))
                    continue
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
                     "paper", "delta", "ci_low", "ci_high", "ci_level", "ci_replicates",
                     "paper_in_ci"])
    outside = paper_outside(grid)
    for key in grid.keys():
        cell = grid.cell(key)
        paper = grid.paper.get(key) or (None,) * len(grid.metrics)
        delta = deltas.get(key) or (None,) * len(grid.metrics)
        verdicts = outside.get(key) or (None,) * len(grid.metrics)
        for m, metric in enumerate(grid.metrics):
            stat = cell.stats[m]
            ci = cell.interval(m)
            writer.writerow([
                grid.stem, setting.dataset, f"{setting.noise_ratio:g}", setting.image_size,
                setting.teacher_weights, key[0], key[1], key[2], metric,
                "" if stat is None else repr(stat.mean),
                "" if stat is None or stat.std is None else repr(stat.std),
                0 if stat is None else stat.n, int(cell.partial), marks.get((*key, m), ""),
                "" if paper[m] is None else repr(paper[m]),
                "" if delta[m] is None else repr(delta[m]),
                "" if ci is None else repr(ci.low), "" if ci is None else repr(ci.high),
                "" if ci is None else repr(ci.level), "" if ci is None else ci.replicates,
                "" if verdicts[m] is None else ("no" if verdicts[m] else "yes"),
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
    intervals = has_intervals(grid)
    if intervals:
        parts += [f"### {LEVEL * 100:g} % interval over test images\n",
                  interval_caption() + "\n", intervals_markdown(grid)]
    if any(any(v is not None for v in vals) for vals in grid.paper.values()):
        parts += ["### Paper\n", values_markdown(grid, grid.paper, signed=False),
                  "### Δ (ours − paper)\n",
                  values_markdown(grid, grid_deltas(grid), signed=True, marks=delta_marks(grid))]
        if intervals:
            parts.append(f"{OUTSIDE_MARK} the paper's value lies outside our interval (allowing "
                         f"for its rounding): more than another test sample would explain; "
                         f"unmarked: inside the noise; {NO_INTERVAL_MARK} no interval.\n")
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

    def __init__(self, runs: list[Run], metrics: tuple[str, ...], level: float = LEVEL):
        self.level = level
        self.values: dict[tuple[str, str, str, str], dict[tuple[int, int], float]] = (
            defaultdict(dict))
        # The same keys -> {seed: bootstrap deviations (B,) or None}.
        self.deviations: dict[tuple[str, str, str, str], dict[tuple[int, int], object]] = (
            defaultdict(dict))
        for run in runs:
            if not run.complete:
                continue
            for protocol in PROTOCOLS:
                for metric in metrics:
                    value = run.value(protocol, metric)
                    if value is not None:
                        key = (run.label, run.category, protocol, metric)
                        self.values[key][run.seed] = value
                        self.deviations[key][run.seed] = run.deviations.get((protocol, metric))

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

    def cell_deviations(self, label, category, protocol, metric):
        """Bootstrap deviations of a cell's mean over seeds; None unless every seed has them."""
        per_seed = self.deviations.get((label, category, protocol, metric), {})
        return mean_deviations(per_seed.values()) if per_seed else None

    def average_deviations(self, label, categories, protocol, metric):
        """Deviations of the average over the categories that have a value."""
        present = [c for c in categories if self.values.get((label, c, protocol, metric))]
        return mean_deviations(self.cell_deviations(label, c, protocol, metric)
                               for c in present)

    def interval(self, label, category, protocol, metric) -> Interval | None:
        stat = self.stat(label, category, protocol, metric)
        dev = self.cell_deviations(label, category, protocol, metric)
        return None if stat is None or dev is None else interval(stat.mean, dev, self.level)

    def average_interval(self, label, categories, protocol, metric,
                         stat: Stat | None) -> Interval | None:
        dev = self.average_deviations(label, categories, protocol, metric)
        return None if stat is None or dev is None else interval(stat.mean, dev, self.level)


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
    average_intervals: dict[tuple[str, str, str], Interval | None]
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
        average_intervals = {key: cube.average_interval(key[0], categories, key[1], key[2],
                                                        stat)
                             for key, (stat, _) in averages.items()}
        return cls(
            setting=setting, metrics=metrics, labels=labels, columns=_columns(labels),
            categories=categories, cube=cube, averages=averages,
            average_intervals=average_intervals,
            pro_text=f"PRO = {PRO_DESCRIPTIONS[pro]}.",
            seed_text=(f"Mean ± std over seeds (split_seed, train_seed) {seeds}."
                       if len(seeds) > 1 else ""),
            coverage=_coverage_note(setting, categories), paper=paper)

    @property
    def notes(self) -> list[str]:
        return [self.coverage] if self.coverage else []

    def cell(self, label: str, category: str, protocol: str, metrics) -> Cell:
        """One category's cell (or the Average row's) with its intervals."""
        if category == AVERAGE:
            avg = [self.averages[(label, protocol, m)] for m in metrics]
            return Cell(tuple(a[0] for a in avg), any(a[1] for a in avg),
                        tuple(self.average_intervals[(label, protocol, m)] for m in metrics))
        return Cell(tuple(self.cube.stat(label, category, protocol, m) for m in metrics),
                    intervals=tuple(self.cube.interval(label, category, protocol, m)
                                    for m in metrics))

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
    return _setting_grids(_SettingTables.of(setting, runs, pro, paper))


def _setting_grids(tables: _SettingTables) -> list[Grid]:
    return [*(_main_grid(tables, protocol) for protocol in PROTOCOLS), _summary_grid(tables),
            *(_per_metric_grid(tables, metric) for metric in tables.metrics)]


def _main_grid(t: _SettingTables, protocol: str) -> Grid:
    """Tables 1 and 2-like: categories x methods, I-AUC / P-AUC / PRO cells, for a protocol."""
    cells, paper_cells = {}, {}
    for label, col in zip(t.labels, t.columns):
        for cat in [*t.categories, AVERAGE]:
            cells[(cat, "", col)] = t.cell(label, cat, protocol, t.metrics)
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
                cells[(row, "", col)] = t.cell(label, AVERAGE, protocol, (metric,))
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
            for cat in [*t.categories, AVERAGE]:
                cells[(cat, group, col)] = t.cell(label, cat, protocol, (metric,))
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
            stats, intervals, deviations = [], [], []
            partial = False
            for metric in metrics:
                stat, part = cube.average(label, categories, protocol, metric)
                stats.append(stat)
                intervals.append(cube.average_interval(label, categories, protocol, metric,
                                                       stat))
                deviations.append(cube.average_deviations(label, categories, protocol, metric))
                partial |= part
            average = _mean_of_metrics(cube, label, categories, protocol, metrics)
            stats.append(average)
            combined = mean_deviations(deviations)
            intervals.append(None if average is None or combined is None
                             else interval(average.mean, combined, cube.level))
            for col, stat, ci in zip(cols, stats, intervals):
                cells[(row, "", col)] = Cell((stat,), partial, (ci,))
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
# Uncertainty: bootstrap over test images, paired comparisons, the Friedman test.


@dataclass
class BootstrapSummary:
    """What the bootstrap of a report did, for the index."""

    replicates: int
    seed: int
    runs: int = 0  # complete runs resampled
    without_scores: list[str] = field(default_factory=list)  # runs without usable arrays
    full_resolution: int = 0  # runs whose pixel statistics are the record's own
    # metric -> stored-map value minus record value, per run without full-resolution arrays
    shifts: dict[str, list[float]] = field(default_factory=lambda: defaultdict(list))
    missing: set[str] = field(default_factory=set)  # what the arrays did not allow, why
    seconds: float = 0.0


def bootstrap_runs(runs: list[Run], scores_path, metrics: tuple[str, ...], replicates: int,
                   seed: int = 0) -> BootstrapSummary:
    """Attach bootstrap deviations (``Run.deviations``) to every complete run with a
    ``scores.npz``; the summary says how many, and how far the stored maps are from the
    record (pixel metrics)."""
    import time

    from bench.figures import load_scores
    from bench.uncertainty import bootstrap_run, run_statistics

    summary = BootstrapSummary(replicates, seed)
    if replicates <= 0:
        return summary
    started = time.perf_counter()
    for run in runs:
        if not run.complete:
            continue
        arrays = load_scores(scores_path(run))
        stats = None if arrays is None else run_statistics(arrays, metrics)
        if stats is None:
            summary.without_scores.append(f"{run.setting.title} {run.category} {run.label}")
            continue
        summary.runs += 1
        summary.full_resolution += stats.full_resolution
        summary.missing.update(stats.missing)
        for (protocol, metric), rep in bootstrap_run(stats, metrics, replicates, seed).items():
            run.deviations[(protocol, metric)] = rep.deviations
            recorded = run.value(protocol, metric)
            pixel = metric != "i_auroc" and (metric == "aupro" or not stats.full_resolution)
            if recorded is not None and pixel:
                summary.shifts[metric].append(rep.value - recorded)
    summary.seconds = time.perf_counter() - started
    return summary


def reference_labels(t: _SettingTables, references: Iterable[str]) -> list[tuple[str, str]]:
    """(reference name, label) for each reference present: the first column (paper order)
    whose method's paper name is the name, else whose title is."""
    out = []
    for name in references:
        found = [lb for lb in t.labels if _facts(lb).paper_name == name] or [
            lb for lb, col in zip(t.labels, t.columns) if col == name]
        if found:
            out.append((name, found[0]))
    return out


def paired_comparisons(t: _SettingTables, references: Iterable[str]) -> list[dict]:
    """Every method against every reference present: one row per (protocol, metric)."""
    from bench.comparisons import paired_difference

    rows = []
    title = dict(zip(t.labels, t.columns))
    done = []  # a pair of references is shown once, against the first of them
    for name, ref in reference_labels(t, references):
        done.append(ref)
        for label in t.labels:
            if label in done:
                continue
            for protocol in PROTOCOLS:
                for metric in t.metrics:
                    values, ref_values, dev, ref_dev = {}, {}, {}, {}
                    for cat in t.categories:
                        for lb, vals, devs in ((label, values, dev), (ref, ref_values, ref_dev)):
                            stat = t.cube.stat(lb, cat, protocol, metric)
                            if stat is not None:
                                vals[cat] = stat.mean
                                devs[cat] = t.cube.cell_deviations(lb, cat, protocol, metric)
                    result = paired_difference(label, ref, values, ref_values, dev, ref_dev,
                                               t.cube.level)
                    if result is not None:
                        rows.append({"reference": name, "reference_column": title[ref],
                                     "column": title[label], "protocol": protocol,
                                     "metric": metric, "result": result})
    return rows


def _signed(value: float) -> str:
    return f"{value:+.3f}"


def _paired_ci(ci) -> str:
    return MISSING if ci is None else f"[{_signed(ci[0])}, {_signed(ci[1])}]"


def _paired_cells(row: dict) -> dict[str, str]:
    r = row["result"]
    test = None if r.test_interval is None else (r.test_interval.low, r.test_interval.high)
    inside = r.inside_noise
    return {"delta": _signed(r.mean), "test_ci": _paired_ci(test),
            "noise": MISSING if inside is None else ("inside" if inside else "beyond"),
            "category_ci": _paired_ci(r.category_interval),
            "wtl": f"{r.wins}/{r.ties}/{r.losses}", "n": str(len(r.categories))}


PAIRED_HEADER = ("Method", "Protocol", "Metric", "Δ mean", "95 % CI, test images", "noise",
                 "95 % CI, categories", "W/T/L", "categories")


def paired_summary_markdown(rows: list[dict], protocol: str, reference: str,
                            metrics: tuple[str, ...]) -> str:
    """A compact table for report.md: methods x metrics, ``Δ [CI]``, bold beyond the noise."""
    mine = [r for r in rows if r["reference"] == reference and r["protocol"] == protocol]
    columns = list(dict.fromkeys(r["column"] for r in mine))
    if not columns:
        return ""
    lines = ["| " + " | ".join(["Method", *(METRIC_TITLES[m] for m in metrics)]) + " |",
             "|" + "|".join(["---"] + [":-:"] * len(metrics)) + "|"]
    for column in columns:
        cells = []
        for metric in metrics:
            row = next((r for r in mine if r["column"] == column and r["metric"] == metric), None)
            if row is None:
                cells.append(MISSING)
                continue
            c = _paired_cells(row)
            text = f"{c['delta']} {c['test_ci']}"
            cells.append(f"**{text}**" if c["noise"] == "beyond" else text)
        lines.append("| " + " | ".join([f"{column} − {mine[0]['reference_column']}", *cells])
                     + " |")
    return "\n".join(lines) + "\n"


PAIRED_EXPLANATION = (
    "Δ mean = mean over categories of (method − reference), each category's value the mean "
    "over its seeds. The test-image interval is the paired bootstrap (both methods resampled "
    "alike); *inside* the noise when it holds 0, *beyond* (bold in report.md) when it does not. "
    "The category interval (Student t) asks how the mean would move with other categories; "
    "W/T/L counts categories won, tied and lost at 3 decimals.")


def paired_document(setting: Setting, rows: list[dict]) -> str:
    lines = [f"## Paired differences against the references: {setting.title}", "",
             PAIRED_EXPLANATION, ""]
    for reference in dict.fromkeys(r["reference"] for r in rows):
        mine = [r for r in rows if r["reference"] == reference]
        lines += [f"### Against {mine[0]['reference_column']}", "",
                  "| " + " | ".join(PAIRED_HEADER) + " |",
                  "|" + "|".join(["---"] * 3 + [":-:"] * 6) + "|"]
        for row in mine:
            c = _paired_cells(row)
            lines.append("| " + " | ".join([
                row["column"], PROTOCOL_TITLES[row["protocol"]], METRIC_TITLES[row["metric"]],
                c["delta"], c["test_ci"], c["noise"], c["category_ci"], c["wtl"], c["n"]]) + " |")
        lines.append("")
    return "\n".join(lines)


def paired_latex(setting: Setting, rows: list[dict]) -> str:
    out = []
    for reference in dict.fromkeys(r["reference"] for r in rows):
        mine = [r for r in rows if r["reference"] == reference]
        caption = (f"Paired differences against {mine[0]['reference_column']} on "
                   f"{setting.title}. {PAIRED_EXPLANATION}")
        lines = [r"\begin{table}[t]", r"\centering", rf"\caption{{{_tex(caption)}}}",
                 r"\resizebox{\linewidth}{!}{%", r"\begin{tabular}{lll" + "c" * 6 + "}",
                 r"\toprule", " & ".join(_tex(h) for h in PAIRED_HEADER) + r" \\", r"\midrule"]
        for row in mine:
            c = _paired_cells(row)
            lines.append(" & ".join(_tex(v) for v in (
                row["column"], PROTOCOL_TITLES[row["protocol"]], METRIC_TITLES[row["metric"]],
                c["delta"], c["test_ci"], c["noise"], c["category_ci"], c["wtl"], c["n"]))
                + r" \\")
        lines += [r"\bottomrule", r"\end{tabular}}", r"\end{table}"]
        out.append("\n".join(lines) + "\n")
    return "\n".join(out)


def paired_csv(setting: Setting, rows: list[dict]) -> str:
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(["dataset", "noise_ratio", "image_size", "teacher_weights", "reference",
                     "reference_column", "column", "protocol", "metric", "delta_mean",
                     "test_ci_low", "test_ci_high", "inside_noise", "category_ci_low",
                     "category_ci_high", "wins", "ties", "losses", "categories"])
    for row in rows:
        r = row["result"]
        ti, ci = r.test_interval, r.category_interval
        writer.writerow([
            setting.dataset, f"{setting.noise_ratio:g}", setting.image_size,
            setting.teacher_weights, row["reference"], row["reference_column"], row["column"],
            row["protocol"], row["metric"], repr(r.mean),
            "" if ti is None else repr(ti.low), "" if ti is None else repr(ti.high),
            "" if r.inside_noise is None else ("yes" if r.inside_noise else "no"),
            "" if ci is None else repr(ci[0]), "" if ci is None else repr(ci[1]),
            r.wins, r.ties, r.losses, " ".join(r.categories)])
    return buf.getvalue()


def friedman_tests(t: _SettingTables) -> dict[tuple[str, str], object]:
    """(protocol, metric) -> :class:`bench.comparisons.Friedman` over the categories where
    every method has a value; absent with fewer than 2 methods or categories."""
    import numpy as np

    from bench.comparisons import friedman

    out = {}
    for protocol in PROTOCOLS:
        for metric in t.metrics:
            rows, cats = [], []
            for cat in t.categories:
                stats = [t.cube.stat(lb, cat, protocol, metric) for lb in t.labels]
                if all(s is not None for s in stats):
                    rows.append([s.mean for s in stats])
                    cats.append(cat)
            if rows:
                result = friedman(np.asarray(rows), t.columns, cats)
                if result is not None:
                    out[(protocol, metric)] = result
    return out


FRIEDMAN_EXPLANATION = (
    "Friedman test over categories (blocks: categories where every method has a value; ranks "
    "1 = best, ties averaged; chi-square tie-corrected, with Iman–Davenport's F). Nemenyi's "
    "critical difference CD at α = 0.05: two methods whose average ranks differ by more than "
    "CD differ significantly (Demšar 2006); see the critical-difference diagram.")


def _p(value: float) -> str:
    if math.isnan(value):
        return MISSING
    if value == 0:
        return "0"
    return f"{value:.3g}" if value >= 1e-3 else f"{value:.1e}"


def _statistic(value: float) -> str:
    """A test statistic: ``∞`` for a perfect agreement of the ranks (Iman-Davenport's F)."""
    if math.isnan(value):
        return MISSING
    return "∞" if math.isinf(value) else f"{value:.2f}"


def friedman_rows(tests: dict) -> tuple[list[str], list[list[str]]]:
    columns = list(next(iter(tests.values())).methods)
    header = ["Protocol", "Metric", "N", "χ²_F", "p", "F_ID", "p (F)", "CD",
              *(f"rank {c}" for c in columns)]
    body = []
    for (protocol, metric), f in tests.items():
        body.append([PROTOCOL_TITLES[protocol], METRIC_TITLES[metric], str(len(f.categories)),
                     _statistic(f.statistic),
                     _p(f.p_value),
                     _statistic(f.iman_davenport),
                     _p(f.iman_davenport_p), f"{f.critical_difference:.2f}",
                     *(f"{r:.2f}" for r in f.average_ranks)])
    return header, body


def friedman_markdown(tests: dict) -> str:
    header, body = friedman_rows(tests)
    lines = ["| " + " | ".join(header) + " |",
             "|" + "|".join(["---", "---"] + [":-:"] * (len(header) - 2)) + "|"]
    lines += ["| " + " | ".join(row) + " |" for row in body]
    return "\n".join(lines) + "\n"


def friedman_document(setting: Setting, tests: dict) -> str:
    return "\n".join([f"## Friedman test and critical difference: {setting.title}", "",
                      FRIEDMAN_EXPLANATION, "", friedman_markdown(tests)])


def friedman_latex(setting: Setting, tests: dict) -> str:
    header, body = friedman_rows(tests)
    lines = [r"\begin{table}[t]", r"\centering",
             rf"\caption{{{_tex(f'Friedman test on {setting.title}. ' + FRIEDMAN_EXPLANATION)}}}",
             r"\resizebox{\linewidth}{!}{%", r"\begin{tabular}{ll" + "c" * (len(header) - 2) + "}",
             r"\toprule", " & ".join(_tex(h) for h in header) + r" \\", r"\midrule"]
    lines += [" & ".join(_tex(v) for v in row) + r" \\" for row in body]
    lines += [r"\bottomrule", r"\end{tabular}}", r"\end{table}"]
    return "\n".join(lines) + "\n"


def friedman_csv(setting: Setting, tests: dict) -> str:
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(["dataset", "noise_ratio", "image_size", "teacher_weights", "protocol",
                     "metric", "categories", "methods", "chi2", "p", "iman_davenport",
                     "iman_davenport_p", "cd", "alpha", "average_ranks"])
    for (protocol, metric), f in tests.items():
        writer.writerow([setting.dataset, f"{setting.noise_ratio:g}", setting.image_size,
                         setting.teacher_weights, protocol, metric, " ".join(f.categories),
                         " | ".join(f.methods), repr(f.statistic), repr(f.p_value),
                         repr(f.iman_davenport), repr(f.iman_davenport_p),
                         repr(f.critical_difference), f.alpha,
                         " | ".join(repr(r) for r in f.average_ranks)])
    return buf.getvalue()


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


DEFAULT_REFERENCES = ("RD", "CDD")  # paired comparisons: paper names of the reference methods


def render_report(results_dir: str | Path, out_dir: str | Path | None = None, *,
                  pro: str = "pro_rd4ad", figures: bool = True,
                  bootstrap: int = DEFAULT_REPLICATES, bootstrap_seed: int = 0,
                  references: Iterable[str] = DEFAULT_REFERENCES, tsne: bool = False,
                  data_root: str | None = None, tsne_categories: Iterable[str] | None = None,
                  tsne_points: int | None = None, device: str = "cpu") -> Path:
    """Render every table and figure the records allow; returns the path of ``report.md``.

    ``bootstrap`` replicates per run give the 95 % intervals over test images (0: none);
    ``references`` are the paper names the paired comparisons take as references; ``tsne``
    draws Fig. A1 from the teacher and the data (``data_root`` overrides the records' root).
    """
    results_dir = Path(results_dir)
    if pro not in PRO_VARIANTS:
        raise UserError(f"unknown PRO variant {pro!r}; use one of {', '.join(PRO_VARIANTS)}")
    for name, value in (("bootstrap", bootstrap), ("bootstrap seed", bootstrap_seed)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 0:
            raise UserError(f"{name} must be a non-negative integer, got {value!r}")
    if tsne_points is not None and (isinstance(tsne_points, bool)
                                    or not isinstance(tsne_points, int) or tsne_points < 10):
        raise UserError(f"t-SNE points must be an integer >= 10, got {tsne_points!r}")
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
    references = tuple(references)

    def scores_path(run: Run) -> Path:
        return run_dir(results_dir, run.fingerprint) / "scores.npz"

    if tsne and figures:
        from bench.worker import resolve_device

        device = resolve_device(device)
    boot = bootstrap_runs(runs, scores_path, ("i_auroc", "p_auroc", pro), bootstrap,
                          bootstrap_seed)
    by_setting: dict[Setting, list[Run]] = defaultdict(list)
    for run in runs:
        by_setting[run.setting].append(run)
    settings = sorted(by_setting, key=lambda s: s.order)
    table_links: list[tuple[Setting, Grid]] = []
    comparisons: list[tuple[Setting, _SettingTables, list[dict], dict]] = []
    summaries = []
    written: set[Path] = set()

    def write(path: Path, text: str) -> None:
        _write_text(path, text)
        written.add(path)

    for setting in settings:
        sruns = by_setting[setting]
        main_runs = [r for r in sruns if ablation_table_of(r.method) is None]
        grids = []
        if main_runs:
            tables = _SettingTables.of(setting, main_runs, pro, paper)
            grids += _setting_grids(tables)
            rows = paired_comparisons(tables, references)
            tests = friedman_tests(tables)
            comparisons.append((setting, tables, rows, tests))
            summaries.append(_summary_of(tables, main_runs, tests, pro))
            if rows:
                stem = tables_dir / f"paired_{setting.slug}"
                write(stem.parent / f"{stem.name}.md", paired_document(setting, rows))
                write(stem.parent / f"{stem.name}.tex", paired_latex(setting, rows))
                write(stem.parent / f"{stem.name}.csv", paired_csv(setting, rows))
            if tests:
                stem = tables_dir / f"friedman_{setting.slug}"
                write(stem.parent / f"{stem.name}.md", friedman_document(setting, tests))
                write(stem.parent / f"{stem.name}.tex", friedman_latex(setting, tests))
                write(stem.parent / f"{stem.name}.csv", friedman_csv(setting, tests))
        grids += build_ablation_grids(setting, sruns, pro, paper)
        for grid in grids:
            write(tables_dir / f"{grid.stem}.md", grid_document(grid))
            write(tables_dir / f"{grid.stem}.tex", grid_tex(grid))
            write(tables_dir / f"{grid.stem}.csv", grid_csv(grid, setting))
            table_links.append((setting, grid))

    figure_entries: list[tuple[str, Path]] = []
    figure_notes: list[str] = []
    toy = _toy_outputs(runs, tables_dir, figures_dir if figures else None, scores_path,
                       figure_entries, figure_notes, write)
    if figures:
        from bench import figures as figs

        entries, notes = figs.render_figures(runs, figures_dir, pro=pro,
                                             scores_path=scores_path, summaries=summaries)
        figure_entries = entries + figure_entries
        figure_notes = notes + figure_notes
        if tsne:
            figure_entries += figs.teacher_tsne(
                runs, figures_dir, figure_notes, data_root=data_root,
                categories=tsne_categories, points=tsne_points or figs.TSNE_POINTS,
                device=device)
        else:  # Fig. A1 of an earlier `report --tsne` stays: it needs the data to redraw
            figure_entries += _kept_tsne(figures_dir)

    missing = missing_runs(runs)
    if missing:
        write(out / "missing_runs.csv", _missing_csv(missing))
    index = _index(results_dir, out, runs, table_links, figure_entries, figure_notes, missing,
                   pro, boot=boot, comparisons=comparisons, toy=toy)
    path = out / "report.md"
    _write_text(path, index)
    written |= {stem.parent / f"{stem.name}.{ext}" for _, stem in figure_entries
                for ext in ("png", "pdf")}
    _remove_stale(out, written, [tables_dir] + ([figures_dir] if figures else []))
    return path


def _summary_of(t: _SettingTables, runs: list[Run], tests: dict, pro: str):
    """The setting's summary for Fig. 1(b) and the CD diagrams."""
    from bench.figures import MethodPoint, SettingSummary

    fps: dict[str, list[float]] = defaultdict(list)
    devices = set()
    for run in runs:
        if not run.complete:
            continue
        value = (run.record.get("timings") or {}).get("infer_images_per_s")
        if isinstance(value, (int, float)) and math.isfinite(value) and value > 0:
            fps[run.label].append(float(value))
            env = run.record.get("environment") or {}
            devices.add(str(env.get("device_name") or env.get("device") or "unknown"))
    points = {}
    for protocol in PROTOCOLS:
        points[protocol] = []
        for label, col in zip(t.labels, t.columns):
            (p_stat, p_part), (r_stat, r_part) = (t.averages[(label, protocol, "p_auroc")],
                                                  t.averages[(label, protocol, pro)])
            points[protocol].append(MethodPoint(
                title=col, p_auroc=None if p_stat is None else p_stat.mean,
                pro=None if r_stat is None else r_stat.mean,
                p_interval=t.average_intervals[(label, protocol, "p_auroc")],
                pro_interval=t.average_intervals[(label, protocol, pro)],
                partial=p_part or r_part,
                fps=statistics.fmean(fps[label]) if fps[label] else None))
    return SettingSummary(t.setting, pro, points, tests, tuple(sorted(devices)))


def _kept_tsne(figures_dir: Path) -> list[tuple[str, Path]]:
    from bench.figures import TSNE_PREFIX

    if not figures_dir.is_dir():
        return []
    return [(f"t-SNE of teacher features (Fig. A1-like), from an earlier rendering: "
             f"{p.stem[len(TSNE_PREFIX):]}", p.with_suffix(""))
            for p in sorted(figures_dir.glob(f"{TSNE_PREFIX}*.png"))
            if p.with_suffix(".pdf").is_file()]


def _toy_outputs(runs, tables_dir: Path, figures_dir: Path | None, scores_path, entries,
                 notes, write) -> list[tuple[str, Path]]:
    """The toy experiment's tables (and figures, when drawn): [(title, table stem)]."""
    from bench import toy
    from bench.figures import _slug, load_scores

    loaded: dict[str, dict | None] = {}

    def load(run):
        if run.fingerprint not in loaded:
            loaded[run.fingerprint] = load_scores(scores_path(run))
        return loaded[run.fingerprint]

    links = []
    for group in toy.toy_groups(runs, notes):
        title = f"{group.setting.title}, {group.category}"
        rows = toy.toy_table(group, load)
        if rows:
            stem = tables_dir / f"toy_{group.setting.slug}_{_slug(group.category)}"
            write(stem.parent / f"{stem.name}.md", toy.toy_markdown(title, rows))
            write(stem.parent / f"{stem.name}.tex", toy.toy_latex(title, rows, _tex))
            write(stem.parent / f"{stem.name}.csv", toy.toy_csv(group, rows))
            links.append((title, stem))
        if figures_dir is not None:
            entries += toy.toy_figure(group, figures_dir, notes, load)
    return links


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


def grid_tex(grid: Grid) -> str:
    """The ``.tex`` file of a table: ours, then the intervals (if any), then the Δ (if any),
    each Δ cell outside our interval marked with a dagger."""
    tex = grid_latex(grid)
    if has_intervals(grid):
        def interval_text(key):
            cell = grid.cell(key)
            text = " / ".join("--" if cell.interval(m) is None
                              else _fmt_interval(cell.interval(m), grid.decimals)
                              for m in range(len(grid.metrics)))
            return _tex(text + (_seed_suffix(cell) if any(cell.stats) else ""))

        tex += "\n" + grid_latex(grid, interval_text,
                                 f"{grid.title}: {interval_caption()}")
    if grid.paper:
        delta_grid = _delta_grid(grid)
        marks = delta_marks(grid)
        if not marks:
            return tex + "\n" + grid_latex(delta_grid)

        def delta_text(key):
            cell = delta_grid.cell(key)
            suffixes = marks.get(key) or ("",) * len(grid.metrics)
            return " / ".join(
                "--" if stat is None else _fmt(stat.mean, grid.decimals)
                + {OUTSIDE_MARK: r"$^\dagger$", NO_INTERVAL_MARK: "?"}.get(suffix, "")
                for stat, suffix in zip(cell.stats, suffixes))

        tex += "\n" + grid_latex(delta_grid, delta_text,
                                 f"{delta_grid.caption} Dagger: the paper's value lies outside "
                                 f"our {LEVEL * 100:g} % interval over test images.")
    return tex


def _missing_csv(missing: list[dict]) -> str:
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=["setting", "category", "method", "status",
                                             "detail"], lineterminator="\n")
    writer.writeheader()
    writer.writerows(missing)
    return buf.getvalue()


def _index(results_dir: Path, out: Path, runs: list[Run], tables: list[tuple[Setting, Grid]],
           figures: list[tuple[str, Path]], figure_notes: list[str], missing: list[dict],
           pro: str, boot: BootstrapSummary | None = None, comparisons=(),
           toy=()) -> str:
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
    lines += _uncertainty_lines(boot, tables)
    lines += _comparison_lines(comparisons, pro)
    if toy:
        lines += ["", "## Toy experiment (appendix A.2)", "",
                  "How the toy data and runs are read: docs/toy-experiment.md.", ""]
        for title, stem in toy:
            rel = _link(stem, out)
            lines.append(f"- [{title}]({rel}.md) ([LaTeX]({rel}.tex), [CSV]({rel}.csv))")
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
              "(MVTec AD at 0.1, VisA at 0.05).",
              f"- `[lo, hi]` = {LEVEL * 100:g} % bootstrap interval over test images (see "
              "Uncertainty); in a Δ table `†` = the paper's value lies outside it, `?` = no "
              "interval, unmarked = inside the noise.", ""]
    return "\n".join(lines)


def _uncertainty_lines(boot: BootstrapSummary | None, tables) -> list[str]:
    """The index's account of the intervals and of each Δ against the noise."""
    lines = ["", "## Uncertainty", ""]
    if boot is None or boot.replicates == 0:
        return lines + ["No bootstrap (`--bootstrap 0`): the tables carry no intervals."]
    complete = boot.runs + len(boot.without_scores)
    lines += [f"Every cell's {LEVEL * 100:g} % interval is a percentile bootstrap over test "
              f"images: {boot.replicates} resamples per run (seed {boot.seed}), stratified "
              "by label, each region resampled with its image, computed from `scores.npz` "
              "without retraining; runs on one test set share their resamples, so "
              "differences are paired. Across seeds the tables keep mean ± std and the "
              "number of seeds.", "",
              f"- Resampled: {boot.runs} of {complete} complete run(s) in {boot.seconds:.1f} s."]
    if boot.without_scores:
        shown = ", ".join(boot.without_scores[:5])
        more = f" and {len(boot.without_scores) - 5} more" if len(boot.without_scores) > 5 else ""
        lines.append(f"- No usable `scores.npz` (their cells have no interval): {shown}{more}.")
    for item in sorted(boot.missing):
        lines.append(f"- Not bootstrapped: {item}.")
    if boot.full_resolution:
        lines.append(f"- {boot.full_resolution} run(s) store full-resolution pixel statistics: "
                     "their P-AUC and PRO intervals are exact.")
    for metric, shifts in sorted(boot.shifts.items()):
        if not shifts:
            continue
        arr = [abs(v) for v in shifts]
        lines.append(
            f"- {METRIC_TITLES.get(metric, metric)} ({metric}) from the stored maps "
            f"(`scores.npz` keeps them downsampled, float16) differs from the record by median {statistics.median(arr):.4f}, at most "
            f"{max(arr):.4f} over {len(arr)} run/protocol value(s); its interval takes its "
            "spread from the stored maps and its centre from the record.")
    verdicts = []
    for _, grid in tables:
        outside = paper_outside(grid)
        flat = [v for vals in outside.values() for v in vals]
        known = [v for v in flat if v is not None]
        if not flat:
            continue
        verdicts.append(f"| [{grid.title}](tables/{grid.stem}.md) | {sum(known)} | "
                        f"{len(known) - sum(known)} | {len(flat) - len(known)} |")
    if verdicts:
        lines += ["", "Δ against the paper, cell by cell: is the paper's value inside our "
                  "interval (the gap within the noise of the test sample)?", "",
                  "| table | outside (†) | inside | no interval |", "|---|:-:|:-:|:-:|",
                  *verdicts]
    return lines


def _comparison_lines(comparisons, pro: str) -> list[str]:
    lines = []
    for setting, tables, rows, tests in comparisons:
        if not rows and not tests:
            continue
        if not lines:
            lines = ["", "## Paired comparisons and ranks", "", PAIRED_EXPLANATION, ""]
        lines += [f"### {setting.title}", ""]
        if rows:
            lines.append(f"- [Paired differences](tables/paired_{setting.slug}.md) "
                         f"([LaTeX](tables/paired_{setting.slug}.tex), "
                         f"[CSV](tables/paired_{setting.slug}.csv))")
        if tests:
            lines.append(f"- [Friedman test](tables/friedman_{setting.slug}.md) "
                         f"([LaTeX](tables/friedman_{setting.slug}.tex), "
                         f"[CSV](tables/friedman_{setting.slug}.csv))")
        for reference in dict.fromkeys(r["reference"] for r in rows):
            for protocol in PROTOCOLS:
                text = paired_summary_markdown(rows, protocol, reference, tables.metrics)
                if text:
                    lines += ["", f"Against {reference}, {PROTOCOL_TITLES[protocol]} "
                              "(Δ mean [test-image interval]; bold: beyond the noise):", "",
                              text]
        if tests:
            lines += ["", "Friedman test over categories (average ranks, 1 = best):", "",
                      friedman_markdown(tests)]
    return lines
