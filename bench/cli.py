"""Command-line entry point: ``run_benchmark.py <command> ...``.

Each command lives in its own module under :mod:`bench.commands` and exposes ``HELP`` (one line),
``add_arguments(parser)`` and ``run(args) -> int``. With no command at all, the demo runs.
User errors (:class:`bench.errors.UserError`) print one line to stderr and exit with code 2;
``--debug`` (before or after the command) also prints the traceback behind that line, e.g. the
one a plugin raised while it was imported.
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys
import traceback

from bench.errors import UserError

# Order is the order shown in --help.
COMMANDS = ("demo", "list", "synth", "splits", "run", "report", "regress", "toy")


class _Parser(argparse.ArgumentParser):
    """argparse that reports bad arguments as one line with exit code 2 (no usage dump)."""

    def error(self, message: str):  # noqa: D401
        self.exit(2, f"{self.prog}: error: {message} (see --help)\n")


def _command_modules():
    for name in COMMANDS:
        yield name, importlib.import_module(f"bench.commands.{name}")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="run_benchmark.py",
        description="Fully unsupervised anomaly detection benchmark (RD, CDD and baselines). "
        "With no command, runs the demo benchmark on synthetic data.",
    )
    debug_help = "also print the traceback behind an error line (for a bug report)"
    parser.add_argument("--debug", action="store_true", help=debug_help)
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)
    for name, module in _command_modules():
        p = sub.add_parser(name, help=module.HELP, description=module.HELP)
        module.add_arguments(p)
        # SUPPRESS: a --debug before the command is not reset by the command's parser.
        p.add_argument("--debug", action="store_true", default=argparse.SUPPRESS,
                       help=debug_help)
        p.set_defaults(_run=module.run)
    return parser


def _print_traceback(err: BaseException) -> None:
    """The traceback of ``err`` with the exceptions behind it, even those a one-line error
    hid with ``raise ... from None``."""
    seen, current = set(), err
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        current.__suppress_context__ = False
        current = current.__cause__ or current.__context__
    traceback.print_exception(type(err), err, err.__traceback__, file=sys.stderr)


def main(argv: list[str] | None = None) -> int:
    os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser()
    if not argv:
        argv = ["demo"]
    if argv == ["--debug"]:
        argv.append("demo")
    args = parser.parse_args(argv)
    if getattr(args, "_run", None) is None:
        parser.print_help()
        return 2
    debug = bool(getattr(args, "debug", False))
    try:
        return int(args._run(args) or 0)
    except UserError as err:
        print(f"error: {err}", file=sys.stderr)
        if debug:
            _print_traceback(err)
        return err.exit_code
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:
        # The reader went away (``regress ... | head``): stop quietly, as Unix tools do.
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        return 141
    except OSError as err:
        # A path that cannot be written or read (a file where a folder should be, no
        # permission, disk full): one line naming it. Errors without a path (a network
        # failure, a bug) keep their traceback.
        if not err.filename:
            raise
        print(f"error: {err.strerror or type(err).__name__} ({err.filename}); check the path "
              f"and its permissions", file=sys.stderr)
        if debug:
            _print_traceback(err)
        return 2
