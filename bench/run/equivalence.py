"""Do the frameworks of a run compute the same network? Heatmaps compared against their consensus."""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import numpy as np


def relative_error(a: np.ndarray, reference: np.ndarray) -> float:
    """Largest per-stack ||a_s - ref_s|| / ||ref_s|| over the stacks (axis 0); inf on shape mismatch or NaN."""
    if a.shape != reference.shape or not np.all(np.isfinite(a)):
        return math.inf
    worst = 0.0
    for got, ref in zip(a.astype(np.float64), reference.astype(np.float64), strict=True):
        norm = float(np.linalg.norm(ref))
        diff = float(np.linalg.norm(got - ref))
        worst = max(worst, diff / norm if norm > 0 else (0.0 if diff == 0 else math.inf))
    return worst


def compare(heatmaps: Mapping[str, np.ndarray], rtol: float) -> dict[str, dict[str, Any]]:
    """Per framework: its largest relative error against the others and whether it is within `rtol`.

    With three or more frameworks the reference is the elementwise median of all of them, so one that
    disagrees stands out alone; with two each is compared with the other (a disagreement flags both, as
    nothing says which is wrong); with one there is nothing to compare and `equivalent` is None.
    """
    names = list(heatmaps)
    if len(names) < 2:
        return {name: {"max_rel_err": None, "equivalent": None, "reference": "none (one framework)"} for name in names}
    shapes = {heatmaps[name].shape for name in names}
    if len(names) >= 3 and len(shapes) == 1:
        consensus = np.median(np.stack([heatmaps[n].astype(np.float64) for n in names]), axis=0)
        errors = {name: relative_error(heatmaps[name], consensus) for name in names}
        reference = "elementwise median of " + ", ".join(names)
        refs = {name: reference for name in names}
    else:
        errors, refs = {}, {}
        for name in names:
            others = [other for other in names if other != name]
            errors[name] = max(relative_error(heatmaps[name], heatmaps[other]) for other in others)
            refs[name] = ", ".join(others)
    return {
        name: {"max_rel_err": errors[name], "equivalent": bool(errors[name] <= rtol), "reference": refs[name]}
        for name in names
    }
