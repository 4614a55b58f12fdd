"""Anomaly detection methods behind one interface (see :mod:`methods.base`).

Importing this package registers every built-in method.
"""

from methods.base import (  # noqa: F401
    EpochObserver,
    Method,
    MethodPreset,
    Prediction,
    TrainSet,
    available_methods,
    available_presets,
    build_method,
    get_method_class,
    get_preset,
    register_method,
    register_preset,
    resolve_method,
)
from methods.registry_loader import load_builtin_methods

load_builtin_methods()
