"""Regression checks (bench.regress and the ``regress`` command) on hand-written records."""

from __future__ import annotations

import argparse
import json
import shutil
import sys

import pytest

from bench import regress
from bench.cli import main
from bench.commands import regress as command
from bench.errors import UserError
from bench.identity import regress_group_key
from bench.records import (
    METRIC_NAMES,
    PROTOCOLS,
    RECORD_FILE,
    SCHEMA_VERSION,
    load_record,
    run_dir,
    write_json_atomic,
)
from bench.spec import RunSpec

BASE = {"i_auroc": 0.90, "p_auroc": 0.95, "aupro": 0.80, "pro_rd4ad": 0.82, "i_ap": 0.92,
        "p_ap": 0.40, "i_f1max": 0.88}
GROUPS = [(m, c) for m in ("rd", "cdd") for c in ("a", "b")]
SEEDS = (0, 1, 2)


def spec_of(method, category, seed, noise=0.1, config=None):
    return RunSpec(method=method, config=config or {"epochs": 2}, dataset="synthetic",
                   data_root=f"/somewhere/{seed}", category=category, noise_ratio=noise,
                   split_seed=seed, train_seed=seed, image_size=64, resize_size=73,
                   teacher_weights="random")


def write_run(results, method, category, seed, shift=0.0, status="ok", **spec_kw):
    """One record; metric values spread over seeds by 0.01 per seed, shifted by ``shift``."""
    spec = spec_of(method, category, seed, **spec_kw)
    values = {m: v - 0.01 * seed + shift for m, v in BASE.items()}
    record = {
        "schema_version": SCHEMA_VERSION, "fingerprint": spec.fingerprint, "status": status,
        "error": None if status == "ok" else {"type": "RuntimeError", "message": "boom\ntrace"},
        "spec": spec.to_dict(), "environment": {"commit": "abc123"},
        "metrics": {p: dict(values) for p in (*PROTOCOLS, "train")} if status == "ok" else None,
    }
    write_json_atomic(run_dir(results, spec.fingerprint) / RECORD_FILE, record)
    return spec


def write_sweep(results, shift=0.0):
    for method, category in GROUPS:
        for seed in SEEDS:
            write_run(results, method, category, seed, shift=shift)


def edit_metric(results, spec, protocol, metric, value):
    path = run_dir(results, spec.fingerprint) / RECORD_FILE
    record = load_record(path)
    record["metrics"][protocol][metric] = value
    write_json_atomic(path, record)


@pytest.fixture
def sweep(tmp_path):
    """A results folder and a baseline written from it by ``regress --update``."""
    results = tmp_path / "results"
    write_sweep(results)
    baseline = tmp_path / "baselines" / "ci.json"
    assert check(results, baseline, "--update") == 0
    return results, baseline


def test_cli_dispatches_regress(sweep, capsys):
    results, baseline = sweep
    capsys.readouterr()
    assert main(["regress", "--results", str(results), "--baseline", str(baseline)]) == 0
    assert capsys.readouterr().out.rstrip().endswith("PASS")
    assert main(["regress", "--results", str(results), "--baseline", str(results / "no")]) == 2


def run_command(argv):
    """The regress command alone, with the CLI's handling of user errors (exit code 2)."""
    parser = argparse.ArgumentParser(prog="regress")
    command.add_arguments(parser)
    try:
        return command.run(parser.parse_args(argv))
    except UserError as err:
        print(f"error: {err}", file=sys.stderr)
        return err.exit_code


def check(results, baseline, *extra):
    return run_command(["--results", str(results), "--baseline", str(baseline), *extra])


def test_equal_results_pass(sweep, capsys):
    results, baseline = sweep
    capsys.readouterr()
    assert check(results, baseline) == 0
    out = capsys.readouterr().out
    assert out.rstrip().endswith("PASS")
    # 4 groups x 2 protocols x 7 metrics = 56, all ok, with the baseline vs now table.
    assert "56 comparisons" in out and "0 regressed" in out
    assert "rd[epochs=2] synthetic/a r0.1" in out and "+0.0000" in out


def test_same_runs_elsewhere_match_by_spec_not_path(sweep, tmp_path):
    # Another data_root changes nothing; the group key is the spec without root and seeds.
    results, baseline = sweep
    spec = spec_of("rd", "a", 0)
    assert regress_group_key(spec.to_dict()) == regress_group_key(
        spec.replace(data_root="/elsewhere", split_seed=7, train_seed=8).to_dict())
    assert regress_group_key(spec.to_dict()) != regress_group_key(
        spec.replace(noise_ratio=0.2).to_dict())


def test_injected_drop_fails_naming_the_metric(sweep, capsys):
    results, baseline = sweep
    for seed in SEEDS:
        edit_metric(results, spec_of("cdd", "b", seed), "overlap", "p_auroc",
                    BASE["p_auroc"] - 0.01 * seed - 0.1)
    capsys.readouterr()
    assert check(results, baseline) == 1
    out = capsys.readouterr().out
    assert "REGRESSED: cdd[epochs=2] synthetic/b r0.1 overlap p_auroc" in out
    assert out.count("REGRESSED:") == 1 and out.rstrip().endswith("FAIL")
    assert "-0.1000" in out  # the delta column
    assert check(results, baseline, "--metrics", "i_auroc", "aupro") == 0  # not compared


def test_drop_within_seed_variance_passes_and_k_is_configurable(sweep, capsys):
    # Seeds spread by 0.01 around 0.79, so std = 0.01: the lowest run after a 0.015 drop
    # (0.765) is within 3 std of the mean but not within 1.
    results, baseline = sweep
    for seed in SEEDS:
        edit_metric(results, spec_of("rd", "a", seed), "no_overlap", "aupro",
                    BASE["aupro"] - 0.01 * seed - 0.015)
    assert check(results, baseline) == 0
    capsys.readouterr()
    assert check(results, baseline, "--k", "1") == 1
    assert "run (2, 2) at 0.7650 below mean - k*std" in capsys.readouterr().out


def test_one_bad_run_fails_the_run_rule_not_the_mean_rule(sweep, capsys):
    # One seed drops by 0.05 (below 0.89 - 3 * 0.01); the group mean drops by only 0.017.
    results, baseline = sweep
    edit_metric(results, spec_of("cdd", "a", 1), "overlap", "i_auroc", BASE["i_auroc"] - 0.06)
    capsys.readouterr()
    assert check(results, baseline) == 1
    out = capsys.readouterr().out
    assert "run (1, 1) at 0.8400 below mean - k*std" in out and "rule run" in out
    assert out.count("REGRESSED:") == 1
    assert check(results, baseline, "--rule", "mean") == 0
    assert "rule mean" in capsys.readouterr().out
    # The rule is stored in the baseline by --update and read back from it.
    assert check(results, baseline, "--update", "--rule", "mean") == 0
    assert regress.load_baseline(baseline)["rule"] == "mean"
    assert check(results, baseline) == 0


def test_missing_failed_and_extra_runs_are_reported(sweep, capsys):
    results, baseline = sweep
    shutil.rmtree(run_dir(results, spec_of("rd", "b", 2).fingerprint))
    write_run(results, "cdd", "a", 1, status="failed")  # overwrites the ok record
    write_run(results, "cdd", "a", 5)  # a seed the baseline lacks
    write_run(results, "cdd", "c", 0)  # a whole group the baseline lacks
    capsys.readouterr()
    assert check(results, baseline) == 1
    out = capsys.readouterr().out
    assert "missing runs (in the baseline, no complete result now): 2" in out
    assert "rd[epochs=2] synthetic/b r0.1 seeds (2, 2)" in out
    assert "cdd[epochs=2] synthetic/a r0.1 seeds (1, 1)" in out
    assert "failed runs: 1" in out and "boom" in out and "trace" not in out
    assert "extra runs (not in the baseline): 2" in out
    assert "synthetic/c r0.1 seeds (0, 0)" in out and "synthetic/a r0.1 seeds (5, 5)" in out
    assert "0 regressed" in out
    # Means are compared over the seeds both have, so a missing seed shifts nothing.
    rows = [line for line in out.splitlines() if line.startswith(("rd[epochs=2] synthetic/b",
                                                                  "cdd[epochs=2] synthetic/a"))]
    assert len(rows) == 28 and all("+0.0000" in line for line in rows)
    assert check(results, baseline, "--allow-missing") == 0
    # Extra seeds have no baseline value to be compared with, but floors hold for every run.
    capsys.readouterr()
    assert check(results, baseline, "--allow-missing", "--floor", "i_auroc=0.86") == 1
    out = capsys.readouterr().out
    assert "run (5, 5) at 0.8500 below floor 0.86" in out


def test_update_round_trip(sweep, tmp_path):
    results, baseline = sweep
    data = regress.load_baseline(baseline)
    assert data["k"] == 3.0 and data["min_tolerance"] == regress.DEFAULT_MIN_TOLERANCE
    assert data["metrics"] == list(METRIC_NAMES) and len(data["groups"]) == 4
    group = next(g for g in data["groups"] if g["key"]["method"] == "rd"
                 and g["key"]["category"] == "a")
    assert group["seeds"] == [(0, 0), (1, 1), (2, 2)]
    assert "split_seed" not in group["key"] and "data_root" not in group["key"]
    stat = group["stats"]["no_overlap"]["i_auroc"]
    assert stat["n"] == 3
    assert stat["mean"] == pytest.approx(0.89)
    assert stat["std"] == pytest.approx(0.01)
    assert [p.name for p in baseline.parent.iterdir()] == ["ci.json"]  # no temp files left
    # Rewriting from shifted results with new settings keeps floors and takes the new stats.
    write_sweep(results, shift=-0.05)
    assert check(results, baseline, "--update", "--k", "2", "--floor", "i_auroc=0.5") == 0
    new = regress.load_baseline(baseline)
    assert new["k"] == 2.0 and new["floors"] == {"i_auroc": 0.5}
    new_group = next(g for g in new["groups"] if g["key"] == group["key"])
    assert new_group["stats"]["no_overlap"]["i_auroc"]["mean"] == pytest.approx(0.84)
    assert check(results, baseline) == 0
    # The same baseline as YAML reads back identically.
    yaml_path = tmp_path / "b.yaml"
    regress.write_baseline(yaml_path, regress.load_baseline(baseline))
    assert regress.load_baseline(yaml_path)["groups"] == new["groups"]
    assert check(results, yaml_path) == 0


def test_absolute_floor(sweep, capsys):
    results, baseline = sweep
    assert check(results, baseline, "--floor", "p_ap=0.35") == 0
    capsys.readouterr()
    assert check(results, baseline, "--floor", "p_ap=0.385") == 1  # runs 0.40, 0.39, 0.38
    assert "run (2, 2) at 0.3800 below floor 0.385" in capsys.readouterr().out
    assert check(results, baseline, "--floor", "p_ap=0.385", "--rule", "mean") == 0
    capsys.readouterr()
    assert check(results, baseline, "--floor", "p_ap=0.395", "--rule", "mean") == 1  # mean 0.39
    assert "mean below floor 0.395" in capsys.readouterr().out


def test_update_replaces_a_broken_baseline(sweep, capsys):
    results, baseline = sweep
    baseline.write_text("{not json")
    assert check(results, baseline) == 2
    capsys.readouterr()
    assert check(results, baseline, "--update") == 0
    captured = capsys.readouterr()
    assert "is not valid json" in captured.err and "writing a new baseline" in captured.err
    assert check(results, baseline) == 0


def test_zero_std_uses_min_tolerance(tmp_path, capsys):
    results, baseline = tmp_path / "r", tmp_path / "b.json"
    spec = write_run(results, "rd", "a", 0)
    assert check(results, baseline, "--update") == 0
    assert regress.load_baseline(baseline)["groups"][0]["stats"]["overlap"]["p_auroc"]["std"] == 0
    edit_metric(results, spec, "overlap", "p_auroc", BASE["p_auroc"] - 1e-9)  # float noise
    assert check(results, baseline) == 0
    edit_metric(results, spec, "overlap", "p_auroc", BASE["p_auroc"] - 0.01)
    capsys.readouterr()
    assert check(results, baseline) == 1
    assert "below mean - min tolerance" in capsys.readouterr().out
    assert check(results, baseline, "--min-tol", "0.02") == 0


def test_metric_that_became_undefined_regresses(sweep, capsys):
    results, baseline = sweep
    for seed in SEEDS:
        edit_metric(results, spec_of("rd", "a", seed), "no_overlap", "pro_rd4ad", None)
    capsys.readouterr()
    assert check(results, baseline, "--json", str(results / "cmp.json")) == 1
    assert "no value now" in capsys.readouterr().out
    report = json.loads((results / "cmp.json").read_text())
    assert report["passed"] is False
    bad = [r for r in report["rows"] if r["status"] == regress.REGRESSED]
    assert [(r["protocol"], r["metric"]) for r in bad] == [("no_overlap", "pro_rd4ad")]


def test_stat_of_ignores_missing_values():
    stat = regress.Stat.of([0.8, None, 0.82, float("nan"), 0.84])
    assert (stat.n, stat.mean) == (3, pytest.approx(0.82))
    assert stat.std == pytest.approx(0.02)
    assert regress.Stat.of([None]).to_dict() == {"mean": None, "std": None, "n": 0}


@pytest.mark.parametrize("setup,args,match", [
    (None, [], "does not exist; create it"),
    ("{not json", [], "is not valid json"),
    ('{"schema": "other"}', [], "is not a fuad-bench-baseline/1 file"),
    (None, ["--update", "--floor", "p_ap"], "is not METRIC=VALUE"),
    (None, ["--update", "--k", "-1"], "must be a number >= 0"),
])
def test_bad_input_is_one_line_exit_2(tmp_path, capsys, setup, args, match):
    results = tmp_path / "r"
    write_run(results, "rd", "a", 0)
    baseline = tmp_path / "b.json"
    if setup is not None:
        baseline.write_text(setup)
    capsys.readouterr()
    assert check(results, baseline, *args) == 2
    err = capsys.readouterr().err.strip()
    assert match in err and "\n" not in err


def test_missing_results_folder_is_a_user_error(tmp_path, capsys):
    assert check(tmp_path / "nothing", tmp_path / "b.json") == 2
    assert "does not exist" in capsys.readouterr().err
