"""Do the frameworks of a run compute the same gradients? One train-mode step in float64, compared per parameter.

The forward check (bench.run.equivalence) compares fp32 heatmaps, which cannot tell a gradient bug from
rounding: fp32 gradients of a deep train-mode BN network can differ by percent between correct frameworks.
In float64 correct frameworks agree to 1e-10 or better on every parameter (tests/test_fp64_proof.py proves 1e-9 on
generated configs), so one step at the smallest batch the config allows is a sharp and cheap gate.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import numpy as np

GRADIENT_PRECISION = "fp64"
# Largest ||a - b|| / (||b|| + 1e-4 x typical) over parameters, typical = RMS element of the whole gradient
# x sqrt(size): the float64 proof's rule (tests/fp64_proof.py) at 10x its tolerance, since a run's network
# can be far larger than the tests'. The 1e-4 floor keeps gradients that nearly cancel (and the BN-cancelled
# biases, zero in exact arithmetic) from turning rounding into a large relative error.
GRADIENT_RTOL = 1e-8
TYPICAL_FLOOR = 1e-4


def gradient_error(got: Mapping[str, np.ndarray], want: Mapping[str, np.ndarray]) -> tuple[float, str]:
    """(largest ||a - b|| / (||b|| + TYPICAL_FLOOR x typical) over parameters, that parameter); inf on a
    missing parameter, a shape mismatch or a non-finite value."""
    if sorted(got) != sorted(want):
        missing = sorted(set(want) ^ set(got))
        return math.inf, f"parameters differ: {', '.join(missing[:3])}"
    total_sq = sum(float(np.sum(np.square(np.asarray(g, np.float64)))) for g in want.values())
    count = sum(np.size(g) for g in want.values())
    rms = math.sqrt(total_sq / count) if count else 0.0
    worst, where = 0.0, ""
    for name, reference in want.items():
        a, b = np.asarray(got[name], np.float64), np.asarray(reference, np.float64)
        if a.shape != b.shape or not np.all(np.isfinite(a)):
            return math.inf, name
        scale = float(np.linalg.norm(b)) + TYPICAL_FLOOR * rms * math.sqrt(b.size)
        diff = float(np.linalg.norm(a - b))
        error = diff / scale if scale > 0 else (0.0 if diff == 0 else math.inf)
        if error > worst or not where:
            worst, where = error, name
    return worst, where


def compare(grads: Mapping[str, Mapping[str, np.ndarray]], losses: Mapping[str, float],
            rtol: float = GRADIENT_RTOL) -> dict[str, dict[str, Any]]:  # fmt: skip
    """Per framework: its largest gradient error (and where) and loss error against the others, and whether
    both are within `rtol`.

    As for heatmaps: with three or more frameworks the reference is the elementwise median of all of them
    (one that disagrees stands out alone); with two each is compared with the other; with one, `equivalent`
    is None.
    """
    names = list(grads)
    if len(names) < 2:
        return {n: {"max_rel_err": None, "loss_rel_err": None, "worst_parameter": None, "equivalent": None,
                    "reference": "none (one framework)"} for n in names}  # fmt: skip
    shapes_agree = all(sorted(grads[n]) == sorted(grads[names[0]]) for n in names) and all(
        np.shape(grads[n][p]) == np.shape(grads[names[0]][p]) for n in names for p in grads[names[0]]
    )
    references: dict[str, list[tuple[dict[str, np.ndarray], float]]] = {}
    labels: dict[str, str] = {}
    if len(names) >= 3 and shapes_agree:
        median = {p: np.median(np.stack([np.asarray(grads[n][p], np.float64) for n in names]), axis=0) for p in grads[names[0]]}
        median_loss = float(np.median([losses[n] for n in names]))
        for n in names:
            references[n] = [(median, median_loss)]
            labels[n] = "elementwise median of " + ", ".join(names)
    else:
        for n in names:
            others = [o for o in names if o != n]
            references[n] = [(dict(grads[o]), losses[o]) for o in others]
            labels[n] = ", ".join(others)
    out = {}
    for n in names:
        worst, where, loss_err = 0.0, "", 0.0
        for ref_grads, ref_loss in references[n]:
            error, parameter = gradient_error(grads[n], ref_grads)
            if error > worst or not where:
                worst, where = error, parameter
            loss_err = max(loss_err, abs(losses[n] - ref_loss) / abs(ref_loss) if ref_loss else abs(losses[n]))
        out[n] = {"max_rel_err": worst, "loss_rel_err": loss_err, "worst_parameter": where,
                  "equivalent": bool(worst <= rtol and loss_err <= rtol), "reference": labels[n]}  # fmt: skip
    return out
