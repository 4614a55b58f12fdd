"""Imports the modules that register methods: the built-in ones, and plugins by name.

Adding a method = one module under ``methods/`` + its name in ``BUILTIN_MODULES``; or, without
touching the repository, a module of your own imported with ``--plugin MODULE``.
"""

import importlib
from collections.abc import Iterable

BUILTIN_MODULES = ("methods.rd", "methods.cdd", "methods.softpatch", "methods.recontrast",
                   "methods.urd", "methods.inreach", "methods.funad")


def load_builtin_methods() -> None:
    for module in BUILTIN_MODULES:
        importlib.import_module(module)


def import_plugins(plugins: Iterable[str]) -> None:
    """Import the modules that register extra methods (``--plugin``), in workers too."""
    from bench.errors import UserError

    for name in plugins:
        try:
            importlib.import_module(name)
        except ImportError as err:
            raise UserError(f"cannot import plugin module {name!r}: {err}; check PYTHONPATH"
                            ) from None
