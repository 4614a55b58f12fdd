"""Anomaly detection methods behind one interface (see :mod:`methods.base`).

Importing this package registers every built-in method.
"""

from methods.base import (  # noqa: F401
    EpochObserver,
    Method,
    MethodFacts,
    MethodPreset,
    MethodVariant,
    Prediction,
    TrainSet,
    available_methods,
    available_presets,
    available_variants,
    build_method,
    get_method_class,
    get_preset,
    get_variant,
    is_known,
    method_facts,
    register_method,
    register_preset,
    register_variant,
    resolve_config,
    resolve_method,
)
from methods.registry_loader import load_builtin_methods

load_builtin_methods()
