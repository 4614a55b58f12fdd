"""The README's "Adding a method" section, run as written: its module, its two commands.

A toy method registered through ``--plugin`` gets its own report column (title and place from
its class), and its per-sample logs become diagnostics, with no line of ``bench/`` naming it.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def _section() -> str:
    text = (ROOT / "README.md").read_text(encoding="utf-8")
    start = text.index("## Adding a method")
    return text[start:text.index("\n## ", start + 1)]


def _blocks(section: str, language: str) -> list[str]:
    return re.findall(rf"```{language}\n(.*?)```", section, flags=re.S)


def test_the_readme_method_runs_through_a_sweep_into_the_report(tmp_path):
    from datasets import generate_synthetic

    section = _section()
    (module,) = _blocks(section, "python")
    assert module.startswith("# my_method.py\n")
    (tmp_path / "my_method.py").write_text(module, encoding="utf-8")
    # The demo's data, small: 10 normal training images, so ratio 0.1 injects one.
    generate_synthetic(tmp_path / "data" / "synthetic", seed=0, size=64, n_train=10,
                       n_test_good=3, n_test_anomalous=4, categories=["brick"])
    (commands,) = _blocks(section, "bash")
    lines = [line for line in commands.splitlines() if line.strip()]
    assert len(lines) == 2
    env = {**os.environ, "MLFLOW_DISABLE_TELEMETRY": "true", "CUDA_VISIBLE_DEVICES": ""}
    for line in lines:
        line = line.replace("python run_benchmark.py",
                            f"{sys.executable} {ROOT / 'run_benchmark.py'}")
        done = subprocess.run(line, shell=True, cwd=tmp_path, env=env, capture_output=True,
                              text=True, timeout=600)
        assert done.returncode == 0, done.stderr[-2000:]

    report = (tmp_path / "results" / "mine" / "report" / "report.md").read_text()
    table = next((tmp_path / "results" / "mine" / "report" / "tables").glob("main_*_no_overlap.md"))
    header = next(ln for ln in table.read_text().splitlines() if ln.startswith("| Category"))
    assert header.split("|")[2:4] == [" RD ", " Mean distance "]  # its title, after RD
    assert "mean-distance" not in header and "Mean distance" in report
    records = [json.loads(p.read_text()) for p in
               (tmp_path / "results" / "mine" / "runs").glob("*/record.json")]
    mine = next(r for r in records if r["spec"]["method"] == "mean-distance")
    assert mine["status"] == "ok"
    assert {"distance/mean_injected", "distance/mean_normal"} <= set(mine["diagnostics"])
    assert mine["metrics"]["no_overlap"]["i_auroc"] is not None
