"""Imports the modules that register the built-in methods.

Adding a method = one module under ``methods/`` + its name in ``BUILTIN_MODULES``.
"""

import importlib

BUILTIN_MODULES = ("methods.rd", "methods.cdd", "methods.softpatch", "methods.urd")


def load_builtin_methods() -> None:
    for module in BUILTIN_MODULES:
        importlib.import_module(module)
