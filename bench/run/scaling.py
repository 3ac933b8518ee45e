"""Scaling efficiency of data-parallel cells: throughput at N devices / (N x throughput at 1 device).

The 1-device twin of an N-device cell is the cell of the same framework, variant, execution, precision and
phase whose batch is the N-device cell's per-device batch (weak scaling: each device does the same work).
Framework-free and row-based, so `bench run` fills the column and a report can recompute it.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from typing import Any

from bench.core.numbers import num


def _key(row: Mapping[str, Any], batch: int) -> tuple[str, ...]:
    return (str(row.get("framework")), str(row.get("impl") or "idiomatic"), str(row.get("execution")),
            str(row.get("precision")), str(row.get("phase")), str(batch))  # fmt: skip


def devices_of(row: Mapping[str, Any]) -> int:
    """A row's device count (1 for rows written before data parallelism, whose field is empty)."""
    value = num(row.get("devices"))
    return 1 if math.isnan(value) else int(value)


def efficiencies(rows: Iterable[Mapping[str, Any]]) -> dict[str, float]:
    """cell_id -> scaling efficiency for every ok model cell on more than one device whose 1-device twin is an
    ok cell of the same rows; cells without a twin are left out (unknown, never 0)."""
    rows = [r for r in rows if r.get("kind") == "model" and r.get("status") == "ok"]
    single = {
        _key(r, int(num(r["batch_size"]))): num(r.get("throughput_img_per_s")) for r in rows if devices_of(r) == 1
    }
    out: dict[str, float] = {}
    for row in rows:
        n = devices_of(row)
        if n == 1:
            continue
        one = single.get(_key(row, int(num(row["batch_size"])) // n))
        many = num(row.get("throughput_img_per_s"))
        if one and not math.isnan(one) and not math.isnan(many):
            out[str(row["cell_id"])] = many / (n * one)
    return out
