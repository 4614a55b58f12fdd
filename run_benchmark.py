#!/usr/bin/env python
"""FUAD benchmark harness. ``python run_benchmark.py --help`` lists the commands;
with no arguments it runs the demo benchmark on synthetic data."""

import sys

from bench.cli import main

if __name__ == "__main__":
    sys.exit(main())
