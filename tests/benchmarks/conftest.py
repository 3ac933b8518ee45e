"""Keeps the pytest-benchmark suite out of the plain `python -m pytest` run.

The suite builds every installed framework and times it for a minute or more, which the unit-test run
(and CI's `.ci/run`) must not pay. It is collected only when a path inside tests/benchmarks is named on
the command line: `python -m pytest tests/benchmarks --benchmark-autosave`.
"""

from __future__ import annotations

from pathlib import Path

import pytest

_HERE = Path(__file__).resolve().parent


def _asked_for(config: pytest.Config) -> bool:
    """True when a command-line path lies inside this folder (e.g. tests/benchmarks or one file in it)."""
    root = Path(config.invocation_params.dir)
    for arg in config.invocation_params.args:
        if str(arg).startswith("-"):
            continue
        path = (root / str(arg).split("::")[0]).resolve()
        if path == _HERE or _HERE in path.parents:
            return True
    return False


def pytest_ignore_collect(collection_path: Path, config: pytest.Config) -> bool | None:
    """Ignore this folder's files unless the folder was asked for by path."""
    if _HERE in collection_path.resolve().parents and not _asked_for(config):
        return True
    return None
