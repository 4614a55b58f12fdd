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
    """Import the modules that register extra methods (``--plugin``), in workers too.

    A plugin that cannot be found, or whose code raises while it is imported (any exception,
    a ``sys.exit`` too), stops with one line naming it; the line's exception keeps the
    plugin's own traceback as its cause, which ``--debug`` prints.
    """
    from bench.errors import UserError

    for name in plugins:
        try:
            importlib.import_module(name)
        except ModuleNotFoundError as err:
            if err.name is not None and (name == err.name or name.startswith(err.name + ".")):
                raise UserError(f"cannot import plugin module {name!r}: no module named "
                                f"{err.name!r}; check the name and PYTHONPATH") from err
            raise UserError(f"plugin module {name!r} failed to import: {err}; install what it "
                            f"needs (--debug shows its traceback)") from err
        except KeyboardInterrupt:
            raise
        except BaseException as err:  # noqa: BLE001 - a plugin's own bug, said in one line
            detail = f"{type(err).__name__}: {err}" if str(err) else type(err).__name__
            raise UserError(f"plugin module {name!r} raised {detail} while being imported; fix "
                            f"the module (--debug shows its traceback)") from err
