"""Imports the modules that register the built-in methods.

Adding a method = one module under ``methods/`` + its name in ``BUILTIN_MODULES``.
A module listed here that is not present yet is skipped, so the registry works while methods
are being added.
"""

import importlib
import importlib.util

BUILTIN_MODULES = ("methods.rd", "methods.cdd", "methods.softpatch")


def load_builtin_methods() -> None:
    for module in BUILTIN_MODULES:
        if importlib.util.find_spec(module) is not None:
            importlib.import_module(module)
