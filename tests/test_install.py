"""The harness installed from a wheel (not an editable checkout) has its data: the paper's
values and the sweep presets load from the package, so a report shows the paper's columns."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
GOLDEN = ROOT / "tests" / "data" / "report" / "results"


def _clean_copy(target: Path) -> Path:
    """The project's source files in a fresh folder: a stale ``build/`` of the checkout could
    otherwise lend the wheel files the package data no longer lists."""
    ignore = shutil.ignore_patterns(".venv", ".git", "build", "*.egg-info", "__pycache__",
                                    "results", "data", "mlruns", "tests")
    shutil.copytree(ROOT, target, ignore=ignore)
    return target


def test_a_wheel_carries_the_data_and_renders_paper_values(tmp_path):
    wheels = tmp_path / "wheels"
    source = _clean_copy(tmp_path / "src")
    build = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q",
         "-w", str(wheels), str(source)],
        cwd=tmp_path, capture_output=True, text=True, timeout=600)
    assert build.returncode == 0, build.stderr[-2000:]
    (wheel,) = wheels.glob("fuad_bench-*.whl")
    with zipfile.ZipFile(wheel) as archive:
        names = set(archive.namelist())
        archive.extractall(tmp_path / "site")  # a pure-Python wheel: unpacking is installing
    assert {f"bench/paper_values/table{t}.csv" for t in ("1", "3", "A3", "A8")} <= names
    assert {"bench/presets/paper-mvtec.yaml", "bench/presets/ci.yaml"} <= names

    # From a folder outside the checkout, with the unpacked wheel first on the path.
    script = (
        "import bench, sys\n"
        "from bench.cli import main\n"
        "from bench.sweep import load_preset\n"
        f"assert bench.__file__.startswith({str(tmp_path / 'site')!r}), bench.__file__\n"
        "assert load_preset('paper-mvtec').dataset == 'mvtec'\n"
        f"sys.exit(main(['report', '--results', {str(GOLDEN)!r}, '--out', 'report', "
        "'--no-figures']))\n"
    )
    env = {**os.environ, "PYTHONPATH": str(tmp_path / "site"), "MLFLOW_DISABLE_TELEMETRY": "true"}
    done = subprocess.run([sys.executable, "-c", script], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    table = (tmp_path / "report" / "tables" / "main_mvtec_noise0.1_no_overlap.md").read_text()
    paper = table[table.index("### Paper"):table.index("### Δ")]
    # The paper's RD on bottle, Table 1: 0.997 / 0.983 / 0.955.
    assert "| bottle | 0.997 / 0.983 / 0.955 |" in paper
