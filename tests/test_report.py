"""Reports from records: the golden table, the marking rule, missing runs, deltas, figures, CLI."""

import csv
import hashlib
import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from bench.errors import UserError
from bench.paper import PAPER_CATEGORIES, PaperLookup
from bench.report import Cell, Grid, Stat, compute_marks, grid_markdown, render_report

DATA = Path(__file__).parent / "data" / "report"


def _metrics(i, p, pro, aupro=None):
    return {"i_auroc": i, "p_auroc": p, "pro_rd4ad": pro,
            "aupro": pro - 0.03 if aupro is None else aupro,
            "i_ap": None, "p_ap": None, "i_f1max": None}


def write_record(results, method, category, *, ratio=0.1, seed=0, dataset="mvtec", no=None,
                 ov=None, status="ok", image_size=224, weights="imagenet", epochs=200,
                 history=None, diagnostics=None, scores=None, config=None, resolved=None,
                 fingerprint=None):
    """One record (and optionally its scores.npz) in the layout of bench.records."""
    spec = {"method": method, "config": config or {}, "dataset": dataset, "category": category,
            "noise_ratio": ratio, "split_seed": 0, "train_seed": seed,
            "image_size": image_size, "resize_size": 256, "teacher_weights": weights}
    fp = fingerprint or hashlib.sha256(json.dumps(spec, sort_keys=True).encode()).hexdigest()
    no = no or (0.9, 0.95, 0.9)
    record = {
        "schema_version": 1, "fingerprint": fp, "status": status, "spec": spec,
        "error": None if status == "ok" else {"type": "RuntimeError", "message": "boom",
                                              "traceback": ""},
        "resolved_config": {"epochs": epochs, **(resolved or {})},
        "metrics": ({"no_overlap": _metrics(*no), "overlap": _metrics(*(ov or no)),
                     "train": {}} if status == "ok" else None),
        "environment": {"commit": "abc1234", "device": "cpu", "device_name": "cpu"},
        "provenance": {}, "history": history or {}, "diagnostics": diagnostics or {},
    }
    run = Path(results) / "runs" / fp
    run.mkdir(parents=True, exist_ok=True)
    (run / "record.json").write_text(json.dumps(record))
    if scores is not None:
        np.savez(run / "scores.npz", **scores)
    return fp


def fake_scores(rng, n_test=10, n_train=12, size=16, drop=()):
    labels = np.array([0, 1] * (n_test // 2), np.uint8)
    masks = np.zeros((n_test, size, size), np.uint8)
    masks[labels == 1, 4:9, 5:10] = 1
    arrays = {
        "test_keys": np.array([f"test/x/{i:03d}.png" for i in range(n_test)]),
        "test_scores": (rng.random(n_test) + labels).astype(np.float32),
        "test_labels": labels,
        "in_no_overlap": np.arange(n_test) >= 2,
        "test_maps": (rng.random((n_test, size, size)) + masks).astype(np.float16),
        "test_masks": masks,
        "test_images": rng.integers(0, 255, (n_test, size, size, 3), dtype=np.uint8),
        "train_keys": np.array([f"train/{i:03d}.png" for i in range(n_train)]),
        "train_scores": rng.random(n_train).astype(np.float32),
        "train_injected": np.arange(n_train) < 2,
    }
    return {k: v for k, v in arrays.items() if k not in drop}


# ---- golden ------------------------------------------------------------------------------


def test_golden_tables_match_the_committed_markdown(tmp_path):
    out = render_report(DATA / "results", tmp_path / "report", figures=False)
    assert out == tmp_path / "report" / "report.md"
    for name in ("main_mvtec_noise0.1_no_overlap.md", "ablation_table5_mvtec_noise0.1.md"):
        expected = (DATA / "expected" / name).read_text(encoding="utf-8")
        assert (tmp_path / "report" / "tables" / name).read_text(encoding="utf-8") == expected
    index = out.read_text(encoding="utf-8")
    assert "Paper-comparable setup" in index and "NOT PAPER-COMPARABLE" not in index
    assert "| mvtec-noise-0.1 | cable | softpatch | failed | CUDA out of memory |" in index
    tex = (tmp_path / "report" / "tables" / "main_mvtec_noise0.1_no_overlap.tex").read_text()
    assert r"\textbf{0.981$\pm$0.001}" in tex and "pro\\_rd4ad" in tex


# ---- marks -------------------------------------------------------------------------------


def _grid(values, decimals=3, axis="row", partial=()):
    cols = [f"m{i}" for i in range(len(values))]
    cells = {("r", "", c): Cell((None if v is None else Stat(v, None, 1),), c in partial)
             for c, v in zip(cols, values)}
    return Grid(stem="t", title="t", caption="t", row_header="Category", rows=["r"],
                groups=[("", cols)], metrics=("value",), cells=cells, decimals=decimals,
                mark_axis=axis)


def _marks(grid):
    return {k[2]: v for k, v in compute_marks(grid).items()}


def test_best_bold_second_underlined_with_ties():
    assert _marks(_grid([0.9, 0.95, 0.97, 0.96])) == {"m2": "best", "m3": "second"}
    # Ties share the mark; the second mark goes to the next distinct value.
    assert _marks(_grid([1.0, 1.0, 0.99, 0.99, 0.98])) == {
        "m0": "best", "m1": "best", "m2": "second", "m3": "second"}
    # Compared at the printed precision: 0.9996 prints as 1.000, a tie with 1.0.
    assert _marks(_grid([0.9996, 1.0, 0.9])) == {"m0": "best", "m1": "best", "m2": "second"}
    assert _marks(_grid([0.9996, 1.0, 0.9], decimals=4)) == {"m1": "best", "m0": "second"}
    # Missing cells, partial averages and lone values are not ranked.
    assert _marks(_grid([None, 0.8, 0.9, 0.99], partial={"m3"})) == {
        "m2": "best", "m1": "second"}
    assert _marks(_grid([0.8, None])) == {}
    text = grid_markdown(_grid([1.0, 1.0, 0.99, None]))
    assert text.splitlines()[2] == "| r | **1.000** | **1.000** | <u>0.990</u> | — |"


def test_column_marks_for_ablation_layout():
    rows = ["a", "b", "c"]
    cells = {(r, "", "I-AUC"): Cell((Stat(v, None, 1),)) for r, v in zip(rows, [0.5, 0.7, 0.6])}
    grid = Grid(stem="t", title="t", caption="t", row_header="Variant", rows=rows,
                groups=[("", ["I-AUC"])], metrics=("value",), cells=cells, mark_axis="column")
    assert {k[0]: v for k, v in compute_marks(grid).items()} == {"b": "best", "c": "second"}


# ---- missing runs, provenance, deltas -------------------------------------------------------


def test_missing_and_failed_runs_show_as_dash_and_are_listed(tmp_path):
    res = tmp_path / "res"
    write_record(res, "rd", "bottle", no=(0.9, 0.9, 0.9))
    write_record(res, "rd", "cable", no=(0.8, 0.8, 0.8))
    write_record(res, "cdd", "bottle", no=(0.95, 0.95, 0.95))
    write_record(res, "cdd", "cable", status="failed")
    write_record(res, "softpatch", "cable", no=(0.7, 0.7, 0.7))
    out = render_report(res, tmp_path / "out", figures=False)
    table = (tmp_path / "out" / "tables" / "main_mvtec_noise0.1_no_overlap.md").read_text()
    lines = table.splitlines()
    header = next(line for line in lines if line.startswith("| Category"))
    assert header == "| Category | RD | SoftPatch | CDD |"
    assert "| bottle | <u>0.900</u> / <u>0.900</u> / <u>0.900</u> | — / — / — |" in table
    assert "| cable | **0.800** / **0.800** / **0.800** | <u>0.700</u> / <u>0.700</u> / " \
           "<u>0.700</u> | — / — / — |" in table
    # Averages over one of two categories are marked and not ranked.
    assert "| **Average** | 0.850 / 0.850 / 0.850 | 0.700 / 0.700 / 0.700 \\* | " \
           "0.950 / 0.950 / 0.950 \\* |" in table
    assert "average over fewer categories" in table
    with open(tmp_path / "out" / "missing_runs.csv", newline="") as f:
        missing = {(r["category"], r["method"], r["status"]) for r in csv.DictReader(f)}
    assert missing == {("cable", "cdd", "failed"), ("bottle", "softpatch", "not run")}
    index = out.read_text()
    assert "2 table cell(s) have no complete run" in index


def test_runs_a_sweep_planned_but_never_made_are_listed(tmp_path):
    """A category no method reached is still a row: the sweep's plan names it."""
    from bench.driver import write_sweep_plan
    from bench.spec import RunSpec

    res = tmp_path / "res"
    planned = [RunSpec(method=m, config={}, dataset="mvtec", data_root="/data", category=c,
                       noise_ratio=0.1, split_seed=0, train_seed=0, image_size=224,
                       resize_size=256, teacher_weights="imagenet")
               for m in ("rd", "cdd") for c in ("bottle", "zipper")]
    write_record(res, "rd", "bottle", no=(0.9, 0.9, 0.9), fingerprint=planned[0].fingerprint)
    write_sweep_plan(res, "paper mvtec", "paper-mvtec", planned)
    assert (res / "sweeps" / "paper-mvtec.json").is_file()
    out = render_report(res, tmp_path / "out", figures=False)
    with open(tmp_path / "out" / "missing_runs.csv", newline="") as f:
        missing = {(r["category"], r["method"], r["status"]) for r in csv.DictReader(f)}
    assert missing == {("bottle", "cdd", "not run"), ("zipper", "rd", "not run"),
                       ("zipper", "cdd", "not run")}
    table = (tmp_path / "out" / "tables" / "main_mvtec_noise0.1_no_overlap.md").read_text()
    assert "| zipper | — / — / — | — / — / — |" in table
    index = out.read_text()
    assert "1 complete run(s), 0 failed, 3 planned by a sweep but not run" in index


def test_not_paper_comparable_is_loud(tmp_path):
    write_record(tmp_path / "res", "rd", "bottle", image_size=64, weights="random", epochs=2)
    index = render_report(tmp_path / "res", figures=False).read_text()
    line = next(ln for ln in index.splitlines() if "NOT PAPER-COMPARABLE" in ln)
    assert "teacher weights random" in line and "image size 64" in line and "epochs 2" in line
    assert (tmp_path / "res" / "report" / "tables").is_dir()
    # The paper's weights, size and epochs, but a smaller backbone and a step cap: still not.
    write_record(tmp_path / "res2", "rd", "bottle",
                 resolved={"backbone": "resnet18", "max_steps": 5})
    index = render_report(tmp_path / "res2", figures=False).read_text()
    line = next(ln for ln in index.splitlines() if "NOT PAPER-COMPARABLE" in ln)
    assert "backbone resnet18 (paper: wide_resnet50_2)" in line
    assert "training capped by max_steps=5" in line and "teacher weights" not in line


def test_deltas_against_the_paper_with_full_coverage(tmp_path):
    paper = PaperLookup()
    res = tmp_path / "res"
    for cat in PAPER_CATEGORIES["mvtec"]:
        no = [paper.get(("1",), "mvtec", 0.1, "no_overlap", cat, "RD", m) + 0.01
              for m in ("i_auroc", "p_auroc", "pro")]
        no[0] = min(no[0], 1.0)
        write_record(res, "rd", cat, no=tuple(no))
    render_report(res, tmp_path / "out", figures=False)
    with open(tmp_path / "out" / "tables" / "main_mvtec_noise0.1_no_overlap.csv") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 16 * 3
    for row in rows:
        if row["row"] == "Average":
            continue
        if row["metric"] != "i_auroc":
            assert float(row["delta"]) == pytest.approx(0.01, abs=1e-9), row
    avg = {r["metric"]: r for r in rows if r["row"] == "Average"}
    assert float(avg["pro_rd4ad"]["paper"]) == 0.916
    assert float(avg["pro_rd4ad"]["delta"]) == pytest.approx(0.01, abs=1.5e-3)  # paper rounds
    md = (tmp_path / "out" / "tables" / "main_mvtec_noise0.1_no_overlap.md").read_text()
    assert "### Δ (ours − paper)" in md and "| bottle | +0.003 / +0.010 / +0.010 |" in md
    # Other ratios have no paper cells, hence no delta section.
    write_record(res, "rd", "bottle", ratio=0.05)
    render_report(res, tmp_path / "out2", figures=False)
    md = (tmp_path / "out2" / "tables" / "main_mvtec_noise0.05_no_overlap.md").read_text()
    assert "Δ" not in md


def test_aupro_variant_is_named(tmp_path):
    write_record(tmp_path / "res", "rd", "bottle", no=(0.9, 0.9, 0.9, 0.777))
    render_report(tmp_path / "res", tmp_path / "out", pro="aupro", figures=False)
    md = (tmp_path / "out" / "tables" / "main_mvtec_noise0.1_no_overlap.md").read_text()
    assert "PRO = aupro" in md and "0.900 / 0.900 / 0.777" in md
    with pytest.raises(UserError, match="PRO variant"):
        render_report(tmp_path / "res", pro="pro")


# ---- figures -----------------------------------------------------------------------------


def _png_has_content(path):
    import matplotlib.image

    pixels = matplotlib.image.imread(path)
    return path.stat().st_size > 1000 and float(np.std(pixels)) > 0.01


def test_figures_are_drawn_and_missing_arrays_are_skipped(tmp_path):
    rng = np.random.default_rng(0)
    res = tmp_path / "res"
    for ratio in (0.0, 0.1):
        for seed in (0, 1):
            for method in ("rd", "cdd"):
                hist = {"loss": list(rng.random(4))} if method == "cdd" else None
                diag = {"confidence_auroc": [0.5, 0.6, 0.7, 0.8]} if method == "cdd" else None
                scores = fake_scores(rng) if (ratio, seed) == (0.1, 0) else None
                write_record(res, method, "bottle", ratio=ratio, seed=seed,
                             no=(0.9 + 0.01 * seed, 0.9, 0.8 - ratio), history=hist,
                             diagnostics=diag, scores=scores)
    # A method whose scores.npz lacks the images: histogram yes, map grid without it.
    write_record(res, "softpatch", "bottle", ratio=0.1,
                 scores=fake_scores(rng, drop=("test_images",)))
    # RD has a second category at ratio 0 only: its 0.1 point averages fewer categories.
    write_record(res, "rd", "carpet", ratio=0.0, seed=0, no=(0.7, 0.7, 0.6))
    out = render_report(res, tmp_path / "out")
    figs = tmp_path / "out" / "figures"
    stems = ["noise_curves_mvtec_px224_imagenet", "hist_mvtec_noise0.1_bottle",
             "maps_mvtec_noise0.1_bottle", "diagnostics_mvtec_noise0.1_cdd",
             "maps_injected_mvtec_noise0.1_bottle", "speed_accuracy_mvtec_noise0.1_no_overlap"]
    for stem in stems:
        assert _png_has_content(figs / f"{stem}.png"), stem
        pdf = (figs / f"{stem}.pdf").read_bytes()
        assert pdf.startswith(b"%PDF") and len(pdf) > 1000
    index = out.read_text()
    for stem in stems:
        assert f"figures/{stem}.png" in index
    assert "mvtec-noise-0 bottle cdd: no scores.npz" in index
    assert ("noise curves mvtec 224 px, rd at noise ratio 0.1: mean over 1 of 2 categories "
            "(hollow point; no result for carpet)") in index
    assert "cdd at noise ratio" not in index
    assert not list(figs.glob("*.tmp")) and not list(figs.glob(".*"))


def test_figures_without_any_map_arrays_are_noted(tmp_path):
    rng = np.random.default_rng(1)
    write_record(tmp_path / "res", "rd", "bottle",
                 scores=fake_scores(rng, drop=("test_maps", "test_images")))
    index = render_report(tmp_path / "res").read_text()
    assert "lacks test_images/test_maps/test_masks, so no anomaly-map grid" in index
    assert (tmp_path / "res" / "report" / "figures" / "hist_mvtec_noise0.1_bottle.png").is_file()


# ---- CLI ---------------------------------------------------------------------------------


def test_report_command_and_its_errors(tmp_path, capsys):
    import argparse

    from bench.commands import report as command

    parser = argparse.ArgumentParser()
    command.add_arguments(parser)
    res = tmp_path / "res"
    shutil.copytree(DATA / "results", res)
    args = parser.parse_args(["--results", str(res), "--out", str(tmp_path / "o"),
                              "--no-figures"])
    assert command.run(args) == 0
    assert (tmp_path / "o" / "report.md").is_file()
    assert str(tmp_path / "o" / "report.md") in capsys.readouterr().out
    args = parser.parse_args(["--results", str(res)])
    assert args.out is None and args.pro == "pro_rd4ad" and not args.no_figures
    with pytest.raises(UserError, match="does not exist") as err:
        command.run(parser.parse_args(["--results", str(tmp_path / "nope")]))
    assert "\n" not in str(err.value)
    (tmp_path / "empty").mkdir()
    with pytest.raises(UserError, match="no run records"):
        command.run(parser.parse_args(["--results", str(tmp_path / "empty")]))
    # --out under a regular file: one line through the CLI, exit 2.
    from bench.cli import main

    (tmp_path / "afile").write_text("x")
    capsys.readouterr()
    assert main(["report", "--results", str(res), "--out", str(tmp_path / "afile" / "o"),
                 "--no-figures"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "afile" in err[0] and err[0].startswith("error: ")


def test_columns_name_only_the_overrides_that_differ(tmp_path):
    from bench.report import load_runs

    res = tmp_path / "res"
    write_record(res, "rd", "bottle", config={"epochs": 200, "backbone": "resnet18"})
    write_record(res, "cdd", "bottle", config={"epochs": 200, "k_schedule": [2]})
    write_record(res, "cdd", "bottle", config={"epochs": 200, "k_schedule": [3]})
    labels = sorted(r.label for r in load_runs(res))
    assert labels == ["cdd[k_schedule=[2]]", "cdd[k_schedule=[3]]", "rd"]


def test_rerendering_drops_what_no_longer_exists(tmp_path):
    """A second rendering after a setting is gone leaves only this report's files."""
    rng = np.random.default_rng(0)
    res = tmp_path / "res"
    write_record(res, "rd", "bottle", ratio=0.1, scores=fake_scores(rng))
    write_record(res, "rd", "bottle", ratio=0.2, scores=fake_scores(rng))
    write_record(res, "cdd", "cable", status="failed")
    render_report(res, tmp_path / "out")
    first = {p.relative_to(tmp_path / "out") for p in (tmp_path / "out").rglob("*")
             if p.is_file()}
    render_report(res, tmp_path / "out")  # the same records: nothing lost
    assert {p.relative_to(tmp_path / "out") for p in (tmp_path / "out").rglob("*")
            if p.is_file()} == first
    shutil.rmtree(next(p for p in (res / "runs").iterdir()
                       if json.loads((p / "record.json").read_text())["spec"]["noise_ratio"]
                       == 0.2))
    for p in (res / "runs").iterdir():  # the failed run is fixed: nothing missing any more
        if json.loads((p / "record.json").read_text())["status"] == "failed":
            shutil.rmtree(p)
    render_report(res, tmp_path / "out")
    now = {p.relative_to(tmp_path / "out") for p in (tmp_path / "out").rglob("*")
           if p.is_file()}
    assert not any("noise0.2" in str(p) for p in now) and any("noise0.2" in str(p) for p in first)
    assert Path("missing_runs.csv") in first and Path("missing_runs.csv") not in now
    assert any("noise0.1" in str(p) for p in now if p.parts[0] == "tables")
    assert any(p.parts[0] == "figures" for p in now)


def test_a_curve_point_counts_each_cell_once(tmp_path):
    from bench.figures import curve_point
    from bench.report import load_runs

    res = tmp_path / "res"
    # Category a twice (a run and its copy under another teacher spelling), b once.
    write_record(res, "rd", "a", weights="random", no=(0.9, 0.9, 0.9))
    write_record(res, "rd", "a", weights="random:0", no=(0.9, 0.9, 0.9))
    write_record(res, "rd", "b", weights="random", no=(0.5, 0.5, 0.5))
    runs = load_runs(res)
    assert len({r.setting for r in runs}) == 1
    mean, std, present = curve_point(runs, "no_overlap", "i_auroc")
    assert mean == pytest.approx(0.7) and std == 0.0 and present == {"a", "b"}
    assert curve_point([], "no_overlap", "i_auroc") is None


# ---- uncertainty: intervals, Δ against the noise, paired comparisons, Friedman -------------

UNCERTAINTY = DATA / "results_uncertainty"


def _csv_rows(path):
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def test_golden_intervals_paired_differences_and_friedman(tmp_path):
    """Records with scores.npz (tests/data/report/make_uncertainty_records.py): the tables
    gain intervals, the Δ tables their noise marks, and the paired and Friedman tables."""
    out = render_report(UNCERTAINTY, tmp_path / "r", figures=False)
    expected_dir = DATA / "expected" / "uncertainty"
    names = sorted(p.name for p in expected_dir.glob("*.md"))
    assert len(names) == 4
    for name in names:
        got = (tmp_path / "r" / "tables" / name).read_text(encoding="utf-8")
        assert got == (expected_dir / name).read_text(encoding="utf-8"), name
    stem = tmp_path / "r" / "tables" / "main_mvtec_noise0.1_px64_random-0_no_overlap"
    tex = stem.with_name(stem.name + ".tex").read_text()
    assert r"$^\dagger$" in tex and "[0.417, 0.958]" in tex
    rows = _csv_rows(stem.with_name(stem.name + ".csv"))
    with_paper = [r for r in rows if r["paper"]]
    assert with_paper and all(r["paper_in_ci"] in ("yes", "no") for r in with_paper)
    for r in with_paper:  # the verdict is the interval's, allowing for the paper's rounding
        inside = float(r["ci_low"]) - 5e-4 <= float(r["paper"]) <= float(r["ci_high"]) + 5e-4
        assert (r["paper_in_ci"] == "yes") == inside, r
    index = out.read_text()
    assert "Resampled: 8 of 8 complete run(s)" in index
    assert "| table | outside (†) | inside | no interval |" in index
    assert "Against RD, No overlap" in index and "SoftPatch − RD" in index
    assert "RD − CDD" not in index  # a pair of references is shown once
    for kind in ("paired", "friedman"):
        for ext in ("md", "tex", "csv"):
            assert (tmp_path / "r" / "tables" / f"{kind}_mvtec_noise0.1_px64_random-0.{ext}"
                    ).is_file()


def test_a_cell_interval_is_the_record_value_plus_the_stored_spread(tmp_path):
    """Recomputed by hand from the run's scores.npz with a plain loop over the resamples."""
    from bench.metrics import image_auroc, pixel_auroc
    from bench.uncertainty import resample_indices

    render_report(UNCERTAINTY, tmp_path / "r", figures=False)
    rows = _csv_rows(tmp_path / "r" / "tables"
                     / "main_mvtec_noise0.1_px64_random-0_no_overlap.csv")
    run = next(p for p in (UNCERTAINTY / "runs").iterdir()
               if json.loads((p / "record.json").read_text())["spec"]["method"] == "rd"
               and json.loads((p / "record.json").read_text())["spec"]["category"] == "bottle")
    record = json.loads((run / "record.json").read_text())
    with np.load(run / "scores.npz") as z:
        arrays = {k: z[k] for k in z.files}
    keep = arrays["in_no_overlap"]
    sub = {k: v[keep] for k, v in arrays.items()}
    idx = resample_indices(sub["test_keys"], sub["test_labels"], 1000, seed=0)
    for metric, fn, args in (("i_auroc", image_auroc, ("test_scores", "test_labels")),
                             ("p_auroc", pixel_auroc, ("test_maps", "test_masks"))):
        stored = fn(*(sub[a] for a in args))
        reps = np.array([fn(*(sub[a][i] for a in args)) for i in idx])
        value = record["metrics"]["no_overlap"][metric]
        low, high = value + np.quantile(reps - stored, [0.025, 0.975])
        row = next(r for r in rows if r["row"] == "bottle" and r["column"] == "RD"
                   and r["metric"] == metric)
        assert float(row["mean"]) == value
        assert float(row["ci_low"]) == pytest.approx(max(low, 0.0), abs=1e-12)
        assert float(row["ci_high"]) == pytest.approx(min(high, 1.0), abs=1e-12)


def test_bootstrap_off_references_and_bad_options(tmp_path):
    render_report(UNCERTAINTY, tmp_path / "off", figures=False, bootstrap=0)
    md = (tmp_path / "off" / "tables" / "main_mvtec_noise0.1_px64_random-0_no_overlap.md")
    assert "interval over test images" not in md.read_text() and "†" not in md.read_text()
    assert "No bootstrap" in (tmp_path / "off" / "report.md").read_text()
    render_report(UNCERTAINTY, tmp_path / "sp", figures=False, bootstrap=50,
                  references=("SoftPatch",))
    paired = (tmp_path / "sp" / "tables" / "paired_mvtec_noise0.1_px64_random-0.md").read_text()
    assert "### Against SoftPatch" in paired and "### Against RD" not in paired
    render_report(UNCERTAINTY, tmp_path / "none", figures=False, bootstrap=50,
                  references=("no such method",))
    assert not (tmp_path / "none" / "tables" / "paired_mvtec_noise0.1_px64_random-0.md").exists()
    for bad in ({"bootstrap": -1}, {"bootstrap": True}, {"bootstrap_seed": 1.5},
                {"tsne_points": 3}):
        with pytest.raises(UserError):
            render_report(UNCERTAINTY, tmp_path / "bad", figures=False, **bad)


def test_speed_accuracy_and_critical_difference_figures(tmp_path):
    out = render_report(UNCERTAINTY, tmp_path / "r", bootstrap=100)
    figs = tmp_path / "r" / "figures"
    stems = ["speed_accuracy_mvtec_noise0.1_px64_random-0_no_overlap",
             "speed_accuracy_mvtec_noise0.1_px64_random-0_overlap",
             "cd_mvtec_noise0.1_px64_random-0"]
    index = out.read_text()
    for stem in stems:
        assert _png_has_content(figs / f"{stem}.png"), stem
        assert (figs / f"{stem}.pdf").read_bytes().startswith(b"%PDF")
        assert f"figures/{stem}.png" in index
    assert "fewer than 5 categories" in index


def test_the_paper_is_outside_only_beyond_its_rounding():
    from bench.report import Interval, delta_marks, paper_outside

    ci = Interval(0.9812, 0.99, 0.95, 1000)
    cells = {("r", "", c): Cell((Stat(0.985, None, 1),), intervals=(ci,)) for c in "abc"}
    cells[("r", "", "d")] = Cell((Stat(0.985, None, 1),))  # no interval
    grid = Grid(stem="t", title="t", caption="t", row_header="Category", rows=["r"],
                groups=[("", list("abcd"))], metrics=("value",), cells=cells,
                paper={("r", "", "a"): (0.981,), ("r", "", "b"): (0.980,),
                       ("r", "", "c"): (0.99,), ("r", "", "d"): (0.5,)})
    # 0.981 may stand for 0.9812 (printed to 3 decimals): inside; 0.980 cannot: outside.
    assert paper_outside(grid) == {("r", "", "a"): (False,), ("r", "", "b"): (True,),
                                   ("r", "", "c"): (False,), ("r", "", "d"): (None,)}
    assert delta_marks(grid) == {("r", "", "a"): ("",), ("r", "", "b"): ("†",),
                                 ("r", "", "c"): ("",), ("r", "", "d"): ("?",)}
