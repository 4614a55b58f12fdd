"""The paper's published values, loaded from ``bench/paper_values/table*.csv`` (package data,
so an installed harness has them too).

The CSVs are a transcription of the CDD paper's Tables 1, 3, 4, 5, 6 and A1-A8 in long format,
one value per line::

    table, dataset, noise_ratio, protocol, category, method, metric, value, mark, pro_variant, note

- ``metric`` is ``i_auroc``, ``p_auroc``, ``pro`` or ``average`` (the ablation tables' mean of
  the three); ``category`` is ``average`` for the paper's Average rows and for the ablation
  tables, which only report averages over the 15 MVTec AD categories.
- ``value`` is empty where the paper's cell is empty (Table A4, toothbrush, Overlap, CDD).
- ``mark`` is the emphasis as printed (``best`` bold, ``second`` underlined); the paper is not
  consistent about it, so reports recompute marks instead of trusting these.
- ``pro_variant``: the paper does not say which PRO it reports; RD-family code computes the
  RD4AD per-image PRO, hence ``unspecified (likely pro_rd4ad)``.
- Ablation rows (Tables 4, 5, 6, A1, A2) use the row label as ``method``.

Table 2 has no body in the paper's text; :func:`load_paper_values` derives it from the Overlap
columns of Tables A3-A5, which hold the same numbers.
"""

from __future__ import annotations

import csv
import math
import re
from functools import lru_cache
from pathlib import Path

from bench.errors import UserError

PAPER_DIR = Path(__file__).resolve().parent / "paper_values"
PAPER_TABLES = ("1", "3", "4", "5", "6", "A1", "A2", "A3", "A4", "A5", "A6", "A7", "A8")
COLUMNS = ("table", "dataset", "noise_ratio", "protocol", "category", "method", "metric",
           "value", "mark", "pro_variant", "note")
PRO_VARIANT = "unspecified (likely pro_rd4ad)"
# The noise ratio at which the paper reports each dataset.
PAPER_RATIOS = {"mvtec": 0.1, "visa": 0.05}
# Category lists as the paper's tables order them.
PAPER_CATEGORIES = {
    "mvtec": ("bottle", "cable", "capsule", "carpet", "grid", "hazelnut", "leather", "metal_nut",
              "pill", "screw", "tile", "toothbrush", "transistor", "wood", "zipper"),
    "visa": ("candle", "capsules", "cashew", "chewinggum", "fryum", "macaroni1", "macaroni2",
             "pcb1", "pcb2", "pcb3", "pcb4", "pipe_fryum"),
}
# Ablation tables: the variant-name prefix whose records feed each table, and per paper row the
# normalised variant suffixes that mean that row (lower case, letters and digits only), e.g.
# ``cdd-t5-k2332`` -> suffix ``k2332`` -> row ``K={2,3,3,2}``.
ABLATION_PREFIXES = {"4": "cdd-t4-", "5": "cdd-t5-", "6": "cdd-t6-", "A1": "cdd-a1-",
                     "A2": "cdd-a2-"}
ABLATION_ROW_ALIASES: dict[str, dict[str, tuple[str, ...]]] = {
    "4": {
        "RD": ("rd", "baseline", "row1", "1"),
        "D.C. + P.N.": ("dcpn", "dc", "row2", "2"),
        "+ Conf.G.": ("dccgpn", "confg", "dcpnconfg", "cg", "row3", "3"),
        "+ Conf.D.": ("dccgpncd", "confd", "cd", "row4", "4"),
        "+ F.P.": ("dccgpnfpcd", "fp", "row5", "5"),
        "+ Reg. (CDD)": ("reg", "full", "cdd", "row6", "6"),
    },
    "5": {
        "K=2": ("k2", "2"),
        "K=3": ("k3", "3"),
        "K=4": ("k4", "4"),
        "K={2,3,3,2}": ("k2332", "2332", "dynamic", "kdynamic"),
        "K={2,3,4,3,2}": ("k23432", "23432"),
    },
    "6": {
        "All": ("all",),
        "Next": ("next",),
        "Consensual": ("consensual", "consensus", "cons"),
    },
    "A1": {
        "r_normal=0.0": ("r0", "r00", "rnormal0", "rnormal00", "0", "00"),
        "r_normal=0.1": ("r01", "rnormal01", "01"),
        "r_normal=0.3": ("r03", "rnormal03", "03"),
        "r_normal=0.5": ("r05", "rnormal05", "05"),
        "r_normal=0.7": ("r07", "rnormal07", "07"),
    },
    "A2": {
        "lambda=0.0": ("lambda0", "lam0", "l0", "zero", "0", "00", "lambda00"),
        "lambda=1.0": ("lambda1", "lam1", "l1", "one", "1", "10", "lambda10", "const"),
        "lambda=e/E": ("linear", "lambdalinear", "lin", "ee", "lambdaee"),
        "lambda=S-curve": ("scurve", "sshape", "s", "lambdascurve", "sigmoid", "paper"),
    },
}


def _normalise(text: str) -> str:
    return re.sub(r"[^a-z0-9]", "", text.lower())


def ablation_table_of(method: str) -> str | None:
    """The ablation table a variant name belongs to (``cdd-t5-k3`` -> ``"5"``), or None."""
    for table, prefix in ABLATION_PREFIXES.items():
        if method.startswith(prefix) and len(method) > len(prefix):
            return table
    return None


def ablation_row_of(method: str) -> str | None:
    """The paper row label a variant name stands for, or None when no alias matches."""
    table = ablation_table_of(method)
    if table is None:
        return None
    suffix = _normalise(method[len(ABLATION_PREFIXES[table]):])
    for row, aliases in ABLATION_ROW_ALIASES[table].items():
        if suffix in aliases:
            return row
    return None


@lru_cache(maxsize=4)
def paper_rows(paper_dir: str | None = None) -> tuple[dict, ...]:
    """Every transcribed value as a dict (``value`` a float, NaN where the paper's cell is
    empty; ``noise_ratio`` a float), Table 2 included."""
    rows = []
    for table in PAPER_TABLES:
        path = Path(paper_dir or PAPER_DIR) / f"table{table}.csv"
        try:
            with open(path, encoding="utf-8", newline="") as f:
                reader = csv.DictReader(f)
                if tuple(reader.fieldnames or ()) != COLUMNS:
                    raise UserError(
                        f"paper values: {path} has columns {reader.fieldnames}, expected "
                        f"{list(COLUMNS)}; reinstall fuad-bench or restore bench/paper_values/ "
                        "from the repository"
                    )
                for row in reader:
                    row["value"] = float(row["value"]) if row["value"] else math.nan
                    row["noise_ratio"] = float(row["noise_ratio"])
                    rows.append(row)
        except FileNotFoundError:
            raise UserError(
                f"paper values missing: {path} not found; reinstall fuad-bench or restore "
                "bench/paper_values/ from the repository"
            ) from None
    # Table 2's body is not in the paper's text; it equals the Overlap columns of A3-A5.
    for row in list(rows):
        if row["table"] in ("A3", "A4", "A5") and row["protocol"] == "overlap":
            rows.append({**row, "table": "2",
                         "note": row["note"] or "Table 2 body taken from Tables A3-A5 (Overlap)"})
    return tuple(rows)


def load_paper_values(paper_dir: str | Path | None = None):
    """All transcribed values as a pandas DataFrame (columns :data:`COLUMNS`)."""
    import pandas as pd  # only here: the report itself does not need pandas

    return pd.DataFrame(list(paper_rows(str(paper_dir) if paper_dir else None)),
                        columns=list(COLUMNS))


class PaperLookup:
    """Fast access to single paper cells by their coordinates."""

    def __init__(self, paper_dir: str | Path | None = None):
        self._cells: dict[tuple, float] = {}
        for row in paper_rows(str(paper_dir) if paper_dir else None):
            key = (row["table"], row["dataset"], round(row["noise_ratio"], 6), row["protocol"],
                   row["category"], row["method"], row["metric"])
            self._cells[key] = row["value"]

    def get(self, tables: tuple[str, ...], dataset: str, noise_ratio: float, protocol: str,
            category: str, method: str, metric: str) -> float | None:
        """The first of ``tables`` that has the cell, as a float; None when none has it.

        ``metric`` ``pro_rd4ad`` and ``aupro`` both read the paper's ``pro``; a cell the paper
        left empty counts as absent (None).
        """
        if metric in ("pro_rd4ad", "aupro"):
            metric = "pro"
        for table in tables:
            value = self._cells.get(
                (table, dataset, round(float(noise_ratio), 6), protocol, category, method, metric)
            )
            if value is not None:
                return None if math.isnan(value) else value
        return None
