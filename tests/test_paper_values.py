"""The transcribed paper values (bench/paper_values/*.csv) against the paper itself.

Three layers: the shape of every table, cells typed by hand from the paper (the quirks of its
Markdown included), and a sample of cells across tables re-read from the paper's text by a
parser independent of the transcription.
"""

import math
import os
import random
import re
from pathlib import Path

import pytest

from bench.paper import (
    PAPER_CATEGORIES,
    PaperLookup,
    ablation_row_of,
    ablation_table_of,
    load_paper_values,
    paper_rows,
)

PAPER_MD = Path(os.environ.get(
    "FUAD_PAPER_MD", Path(__file__).resolve().parents[2] / "shared" / "paper" / "cdd-paper.md"))

M7 = ["RD", "ReContrast", "URD", "SoftPatch", "InReaCh", "FUN-AD", "CDD"]
M5 = ["RD", "SoftPatch", "InReaCh", "FUN-AD", "CDD"]
T1 = ["RD", "URD", "SoftPatch", "InReaCh", "FUN-AD", "CDD"]
PER_METRIC = {"A3": ("mvtec", "i_auroc", M7), "A4": ("mvtec", "p_auroc", M7),
              "A5": ("mvtec", "pro", M7), "A6": ("visa", "i_auroc", M5),
              "A7": ("visa", "p_auroc", M5), "A8": ("visa", "pro", M5)}


@pytest.fixture(scope="module")
def lookup():
    return PaperLookup()


def _count(table):
    return sum(1 for r in paper_rows() if r["table"] == table)


def test_every_table_is_complete():
    for table, (dataset, _, methods) in PER_METRIC.items():
        rows = len(PAPER_CATEGORIES[dataset]) + 1  # + Average
        assert _count(table) == rows * len(methods) * 2, table
    assert _count("1") == 16 * 6 * 3
    assert _count("2") == 16 * 7 * 3  # derived from A3-A5 Overlap
    assert _count("3") == 2 * 3 * 4
    assert {t: _count(t) for t in ("4", "5", "6", "A1", "A2")} == {
        "4": 6 * 4, "5": 5 * 4, "6": 3 * 4, "A1": 5 * 4, "A2": 4 * 4}
    frame = load_paper_values()
    assert set(frame.loc[frame.metric == "pro", "pro_variant"]) == {
        "unspecified (likely pro_rd4ad)"}
    assert set(frame.loc[frame.metric != "pro", "pro_variant"]) == {""}


def test_hand_checked_cells_and_markdown_quirks(lookup):
    g = lookup.get
    assert g(("1",), "mvtec", 0.1, "no_overlap", "cable", "SoftPatch", "p_auroc") == 0.984
    assert g(("1",), "mvtec", 0.1, "no_overlap", "average", "CDD", "pro") == 0.930
    # A3's Overlap columns have no CDD header; the 7th Overlap value is CDD.
    assert g(("A3",), "mvtec", 0.1, "overlap", "average", "CDD", "i_auroc") == 0.971
    assert g(("A3",), "mvtec", 0.1, "overlap", "screw", "CDD", "i_auroc") == 0.849
    # "SorPatch" / "InReCh" headers are SoftPatch / InReaCh.
    assert g(("A3",), "mvtec", 0.1, "no_overlap", "capsule", "InReaCh", "i_auroc") == 0.446
    # A4 toothbrush Overlap has an empty last cell: missing, not shifted.
    assert g(("A4",), "mvtec", 0.1, "overlap", "toothbrush", "CDD", "p_auroc") is None
    assert g(("A4",), "mvtec", 0.1, "overlap", "toothbrush", "FUN-AD", "p_auroc") == 0.984
    assert g(("2",), "mvtec", 0.1, "overlap", "transistor", "CDD", "pro") == 0.788
    # A6 misspells cashew as "casewh" and repeats two header columns.
    assert g(("A6",), "visa", 0.05, "overlap", "cashew", "CDD", "i_auroc") == 0.983
    assert not [r for r in paper_rows() if r["category"] == "casewh"]
    assert g(("3",), "visa", 0.05, "overlap", "average", "RD", "i_auroc") == 0.656
    assert g(("A8",), "visa", 0.05, "no_overlap", "pipe_fryum", "InReaCh", "aupro") == 0.962
    # Table 6 prints Next and Consensual in one merged row.
    assert g(("6",), "mvtec", 0.1, "no_overlap", "average", "Next", "i_auroc") == 0.9510
    assert g(("6",), "mvtec", 0.1, "no_overlap", "average", "Consensual", "average") == 0.9622
    assert g(("4",), "mvtec", 0.1, "no_overlap", "average", "+ Conf.D.", "i_auroc") == 0.9761
    assert g(("5",), "mvtec", 0.1, "no_overlap", "average", "K={2,3,3,2}", "pro") == 0.9297
    assert g(("A1",), "mvtec", 0.1, "no_overlap", "average", "r_normal=0.7", "average") == 0.9598
    assert g(("A2",), "mvtec", 0.1, "no_overlap", "average", "lambda=e/E", "i_auroc") == 0.9659
    # The first table that has the cell wins.
    assert g(("1", "A4"), "mvtec", 0.1, "no_overlap", "cable", "SoftPatch", "p_auroc") == 0.984
    assert g(("A4", "1"), "mvtec", 0.1, "no_overlap", "cable", "SoftPatch", "p_auroc") == 0.989


def test_ablation_preset_names_map_to_paper_rows():
    assert ablation_table_of("cdd-t5-k2332") == "5"
    assert ablation_row_of("cdd-t5-k2332") == "K={2,3,3,2}"
    assert ablation_row_of("cdd-t5-k3") == "K=3"
    assert ablation_row_of("cdd-t6-consensual") == "Consensual"
    assert ablation_row_of("cdd-a1-r0.5") == "r_normal=0.5"
    assert ablation_row_of("cdd-a2-linear") == "lambda=e/E"
    # The names bench/presets/table*.yaml and methods/cdd.py use, row by row.
    t4 = ["cdd-t4-rd", "cdd-t4-dc-pn", "cdd-t4-dc-cg-pn", "cdd-t4-dc-cg-pn-cd",
          "cdd-t4-dc-cg-pn-fp-cd", "cdd-t4-full"]
    assert [ablation_row_of(n) for n in t4] == [
        "RD", "D.C. + P.N.", "+ Conf.G.", "+ Conf.D.", "+ F.P.", "+ Reg. (CDD)"]
    assert [ablation_row_of(f"cdd-a1-r{r}") for r in (0.0, 0.1, 0.3, 0.5, 0.7)] == [
        "r_normal=0.0", "r_normal=0.1", "r_normal=0.3", "r_normal=0.5", "r_normal=0.7"]
    assert [ablation_row_of(f"cdd-a2-{t}") for t in ("zero", "one", "linear", "scurve")] == [
        "lambda=0.0", "lambda=1.0", "lambda=e/E", "lambda=S-curve"]
    assert ablation_row_of("cdd-t5-k23432") == "K={2,3,4,3,2}"
    assert ablation_row_of("cdd-t5-unknown") is None
    assert ablation_table_of("cdd") is None and ablation_table_of("cdd-t5-") is None


# ---- re-reading the paper ------------------------------------------------------------------

def _paper_lines():
    if not PAPER_MD.is_file():
        pytest.skip(f"paper text not found at {PAPER_MD} (set FUAD_PAPER_MD)")
    return PAPER_MD.read_text(encoding="utf-8").splitlines()


def _numbers_of_row(lines, table, first_field, nth=0):
    """The numbers of the ``nth`` row whose first tab field is ``first_field``, after the
    caption line of ``table``."""
    start = next(i for i, line in enumerate(lines) if line.startswith(f"Table {table}:"))
    seen = 0
    for line in lines[start + 1:start + 40]:
        if line.split("\t")[0].strip() == first_field:
            if seen == nth:
                return [float(x) for x in re.findall(r"\d\.\d{3,4}", line)]
            seen += 1
    raise AssertionError(f"row {first_field!r} not found in Table {table}")


def _sample_cells():
    """(table, dataset, ratio, protocol, category, method, metric, where-in-paper) tuples."""
    rng = random.Random(7)
    cells = []
    for table, (dataset, metric, methods) in PER_METRIC.items():
        cats = [*PAPER_CATEGORIES[dataset], "average"]
        ratio = 0.1 if dataset == "mvtec" else 0.05
        for _ in range(5):
            cat, pos = rng.choice(cats), rng.randrange(2 * len(methods))
            protocol = "no_overlap" if pos < len(methods) else "overlap"
            cells.append((table, dataset, ratio, protocol, cat, methods[pos % len(methods)],
                          metric, pos))
    metrics3 = ["i_auroc", "p_auroc", "pro"]
    for _ in range(8):
        cat = rng.choice([*PAPER_CATEGORIES["mvtec"], "average"])
        m, k = rng.randrange(6), rng.randrange(3)
        cells.append(("1", "mvtec", 0.1, "no_overlap", cat, T1[m], metrics3[k], 3 * m + k))
    abl = {"5": ["K=2", "K=3", "K=4", "K={2,3,3,2}", "K={2,3,4,3,2}"],
           "A1": ["r_normal=0.0", "r_normal=0.1", "r_normal=0.3", "r_normal=0.5",
                  "r_normal=0.7"],
           "A2": ["lambda=0.0", "lambda=1.0", "lambda=e/E", "lambda=S-curve"]}
    for table, labels in abl.items():
        for _ in range(3):
            row, k = rng.randrange(len(labels)), rng.randrange(4)
            cells.append((table, "mvtec", 0.1, "no_overlap", "average", labels[row],
                          [*metrics3, "average"][k], (row, k)))
    return cells


def test_sampled_cells_match_the_paper_text(lookup):
    lines = _paper_lines()
    first_fields = {"5": ["2", "3", "4", "{2,3,3,2}", "{2,3,4,3,2}"],
                    "A1": ["0.0", "0.1", "0.3", "0.5", "0.7"],
                    "A2": ["0.0", "1.0", "$e/E$", "S-shape Function"]}
    cells = _sample_cells()
    assert len(cells) >= 40
    for table, dataset, ratio, protocol, cat, method, metric, where in cells:
        ours = lookup.get((table,), dataset, ratio, protocol, cat, method, metric)
        if table in first_fields:
            row, k = where
            numbers = _numbers_of_row(lines, table, first_fields[table][row])
            expected = numbers[k]
        else:
            name = "Average" if cat == "average" else ("casewh" if (table, cat) == (
                "A6", "cashew") else cat)
            numbers = _numbers_of_row(lines, table, name)
            expected = numbers[where] if where < len(numbers) else None
        if expected is None:
            assert ours is None, (table, cat, method, metric)
        else:
            assert ours is not None and math.isclose(ours, expected), (
                table, cat, method, metric, ours, expected)


def test_table3_and_table4_rows_match_the_paper_text(lookup):
    lines = _paper_lines()
    start = next(i for i, line in enumerate(lines) if line.startswith("Table 3:"))
    body = [line for line in lines[start + 3:start + 9]]
    methods = ["RD", "SoftPatch", "InReaCh", "CDD"]
    for i, line in enumerate(body):
        protocol = "no_overlap" if i < 3 else "overlap"
        metric = ["i_auroc", "p_auroc", "pro"][i % 3]
        numbers = [float(x) for x in re.findall(r"\d\.\d{3}", line)]
        for method, value in zip(methods, numbers, strict=True):
            assert lookup.get(("3",), "visa", 0.05, protocol, "average", method,
                              metric) == value
    start = next(i for i, line in enumerate(lines) if line.startswith("Table 4:"))
    rows = [line for line in lines[start:start + 12] if line.startswith(("-", "✓"))]
    labels = ["RD", "D.C. + P.N.", "+ Conf.G.", "+ Conf.D.", "+ F.P.", "+ Reg. (CDD)"]
    for label, line in zip(labels, rows, strict=True):
        numbers = [float(x) for x in re.findall(r"\d\.\d{4}", line)]
        for metric, value in zip(["i_auroc", "p_auroc", "pro", "average"], numbers, strict=True):
            assert lookup.get(("4",), "mvtec", 0.1, "no_overlap", "average", label,
                              metric) == value


def test_every_registered_ablation_preset_has_a_paper_row():
    methods = pytest.importorskip("methods")
    presets = [p.name for p in methods.available_presets() if ablation_table_of(p.name)]
    assert presets, "no cdd-t4/t5/t6/a1/a2 presets registered"
    assert {name: ablation_row_of(name) for name in presets if ablation_row_of(name) is None} == {}
