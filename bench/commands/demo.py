"""``run_benchmark.py`` with no arguments (or ``demo``): the whole benchmark in minutes on CPU.

Writes the synthetic dataset if it is absent (default ``data/synthetic``, seed 0, 128 px),
runs the ``demo`` preset (RD and CDD, two categories, three noise ratios) into
``results/demo``, renders the report, and prints where the results, tables, figures and the
MLflow store are, with the ``mlflow ui`` command to browse them. Rerunning resumes: finished
runs are kept. The teacher is randomly initialised unless ``--teacher-weights imagenet``, and
the output says plainly that such numbers are not comparable with the paper.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

from bench.commands.run import add_sweep_arguments, execute, with_image_size

HELP = "run the demo benchmark on synthetic data (the default command)"
DEFAULT_DATA = Path("data") / "synthetic"
DEFAULT_RESULTS = Path("results") / "demo"
PRESET = "demo"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_sweep_arguments(parser, results_default=DEFAULT_RESULTS, selection=False)
    parser.set_defaults(data_root=str(DEFAULT_DATA))


def run(args: argparse.Namespace) -> int:
    from bench.sweep import expand, load_preset
    from datasets import generate_synthetic

    started = time.perf_counter()
    preset = with_image_size(load_preset(PRESET), args.image_size, args.resize_size)
    root = Path(args.data_root or DEFAULT_DATA)
    if not (root.is_dir() and any(root.iterdir())):
        print(f"writing the synthetic dataset to {root} (seed 0) ...", flush=True)
    # Keeps an existing tree made with the same parameters; writes it otherwise.
    generate_synthetic(root, seed=0, categories=None)
    specs = expand(preset, data_root=root, teacher_weights=args.teacher_weights)
    code = execute(preset, specs, args)
    weights = specs[0].teacher_weights if specs else preset.teacher_weights
    if weights.startswith("random"):
        print("note: the teacher was randomly initialised (seeded), so these numbers show the "
              "harness working, not the paper's results; rerun with --teacher-weights imagenet "
              "(needs the torchvision weights) for a pretrained teacher.")
    print(f"demo finished in {time.perf_counter() - started:.0f} s")
    return code
