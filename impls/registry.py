"""Which frameworks exist, which are installed (without importing them), and lazy loading."""

from __future__ import annotations

import importlib
import importlib.util
from types import ModuleType

FRAMEWORKS: tuple[str, ...] = ("torch", "tensorflow", "jax")

ALIASES: dict[str, str] = {"pytorch": "torch", "tf": "tensorflow"}

# Each framework's execution modes, default first. Kept here, framework-free, so the runner can plan
# cells without importing a framework; each implementation module takes its own entry.
EXECUTIONS: dict[str, tuple[str, ...]] = {
    "torch": ("eager", "compile"),
    "tensorflow": ("eager", "function", "xla"),
    "jax": ("jit",),
}

# Each framework's implementation variants, the default ("idiomatic") first; like EXECUTIONS, kept here so
# the runner can plan cells without importing a framework. "idiomatic" is the network as the framework's
# users write it (torch.nn, tf.Module layers over tf.nn ops, Flax NNX); "tuned" is the same computation in
# the fastest formulation we found and can defend (README "Implementation variants"). A variant is a build
# option, never a different network: the equivalence tests build and check every one.
IMPLS: dict[str, tuple[str, ...]] = {
    "torch": ("idiomatic", "tuned"),
    "tensorflow": ("idiomatic", "tuned"),
    "jax": ("idiomatic", "tuned"),
}
DEFAULT_IMPL = "idiomatic"
# The phases in which a non-default variant differs from the default one. In the other phases it runs the
# default variant's code, so no run measures it there: its cell would time the idiomatic code again under
# another name, and the gap shown would be noise. A variant not named here differs in every phase.
IMPL_PHASES: dict[tuple[str, str], tuple[str, ...]] = {
    ("torch", "tuned"): ("forward",),  # folded batch norms are eval-mode only; training is torch.nn's own
}
# What each non-default variant changes, in a line (reports print it beside the variant's ratio).
IMPL_CHANGES: dict[tuple[str, str], str] = {
    ("torch", "tuned"): "eval-mode batch norms folded into the convolutions they follow (forward only)",
    ("tensorflow", "tuned"): 'padding="SAME" where it equals the spec\'s pads; batch norm fused '
                             "(FusedBatchNormV3) outside XLA, folded into the conv in eval mode",
    ("jax", "tuned"): "1x1 stride-1 convolutions as dot_general over channels (PointwiseConv); 2x2 pools as "
                      "reductions over a reshape",
}

# The execution modes each framework's data-parallel engine runs (impls/<framework>_data_parallel.py, its
# EXECUTIONS), default first; kept here so the runner plans multi-device cells without importing a framework.
DATA_PARALLEL_EXECUTIONS: dict[str, tuple[str, ...]] = {
    "torch": ("eager",),
    "tensorflow": ("function", "xla"),
    "jax": ("jit",),
}

# The module each framework needs importable, and the extra that installs it.
_REQUIRED_MODULES: dict[str, tuple[str, ...]] = {
    "torch": ("torch",),
    "tensorflow": ("tensorflow",),
    "jax": ("jax", "flax"),
}

_IMPL_MODULES: dict[str, str] = {
    "torch": "impls.torch_hourglass",
    "tensorflow": "impls.tensorflow_hourglass",
    "jax": "impls.jax_hourglass",
}


class UnknownFrameworkError(ValueError):
    """A framework name that is neither a framework id nor an alias."""


class FrameworkNotInstalledError(ImportError):
    """The framework's package is missing; the message carries the pip command that installs it."""


def canonical_name(name: str) -> str:
    """The framework id for `name` (accepts aliases, any case), or UnknownFrameworkError."""
    key = name.strip().lower()
    key = ALIASES.get(key, key)
    if key not in FRAMEWORKS:
        raise UnknownFrameworkError(
            f"unknown framework {name!r}; choose one of: {', '.join(FRAMEWORKS)} (aliases: {', '.join(ALIASES)})"
        )
    return key


def install_command(framework: str, gpu: bool = False) -> str:
    """The pip command that installs `framework` for this project: its CPU build, or with `gpu` its CUDA build."""
    return f"pip install '.[{canonical_name(framework)}{'-gpu' if gpu else ''}]'"


def is_installed(framework: str) -> bool:
    """True when every package the framework needs can be imported; nothing is imported to find out."""
    return all(importlib.util.find_spec(m) is not None for m in _REQUIRED_MODULES[canonical_name(framework)])


def installed_frameworks() -> tuple[str, ...]:
    """The installed frameworks, in FRAMEWORKS order."""
    return tuple(f for f in FRAMEWORKS if is_installed(f))


def load(framework: str) -> ModuleType:
    """Import and return the implementation module of `framework` (an id or an alias)."""
    name = canonical_name(framework)
    if not is_installed(name):
        missing = [m for m in _REQUIRED_MODULES[name] if importlib.util.find_spec(m) is None]
        raise FrameworkNotInstalledError(
            f"framework {name!r} is not installed (missing: {', '.join(missing)}); install it with: {install_command(name)}"
        )
    return importlib.import_module(_IMPL_MODULES[name])


def load_data_parallel(framework: str) -> ModuleType:
    """Import and return the data-parallel module of `framework` (impls/<framework>_data_parallel.py)."""
    load(framework)  # the same installed check and message
    return importlib.import_module(_IMPL_MODULES[canonical_name(framework)].replace("_hourglass", "_data_parallel"))
