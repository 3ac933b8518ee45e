"""Small conversions for table cells: text or missing values to numbers, numbers to display strings."""

from __future__ import annotations

import math
from typing import Any


def num(value: Any) -> float:
    """`value` as a float; NaN for None, text or anything else that is not a number."""
    try:
        return float(value)
    except (TypeError, ValueError):
        return math.nan


def fmt(value: Any, spec: str = ".3g", scale: float = 1.0) -> str:
    """`value * scale` formatted with `spec`; empty for None, NaN or text."""
    number = num(value)
    return "" if math.isnan(number) else format(number * scale, spec)
