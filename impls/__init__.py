"""Equivalent Stacked Hourglass implementations in PyTorch, TensorFlow and JAX behind one interface.

Importing this package imports no framework: `load(name)` imports one implementation on demand.
"""

from impls.base import PHASES, AbstractHourglassModel
from impls.config import PRESETS, ConfigError, HourglassConfig, get_preset
from impls.registry import (
    ALIASES,
    DEFAULT_IMPL,
    FRAMEWORKS,
    IMPLS,
    FrameworkNotInstalledError,
    UnknownFrameworkError,
    canonical_name,
    install_command,
    installed_frameworks,
    is_installed,
    load,
)
from impls.spec import count_flops, count_params, init_weights

__all__ = [
    "ALIASES",
    "DEFAULT_IMPL",
    "FRAMEWORKS",
    "IMPLS",
    "PHASES",
    "PRESETS",
    "AbstractHourglassModel",
    "ConfigError",
    "FrameworkNotInstalledError",
    "HourglassConfig",
    "UnknownFrameworkError",
    "canonical_name",
    "count_flops",
    "count_params",
    "get_preset",
    "init_weights",
    "install_command",
    "installed_frameworks",
    "is_installed",
    "load",
]
