"""The profiling contract shared by the three implementations, and the framework-free pieces of it.

Each `impls/<framework>_hourglass.py` module exposes

    def profile(config, *, phase, batch_size, execution, trace_dir, device="cpu", precision="fp32",
                warmup=2, steps=5, seed=0, top_k=25) -> dict

which builds the model, warms it up, profiles `steps` steady-state steps with the framework's own profiler
(torch.profiler, the TensorFlow profiler, jax.profiler), writes the trace files under `trace_dir`, and
returns a plain JSON-able dict checked by `check_profile` below:

    {
      "framework": str, "execution": str, "phase": str, "batch_size": int, "precision": str, "device": str,
      "step_ms": float,              # median wall time of one ordinary (fused, un-staged) step, synced,
                                     # profiler off: the figure the stage shares are a share of
      "stage_method": "profiler" | "staged",
      "stage_step_ms": float,        # the step time the stage rows partition (profiled or staged step);
                                     # sum(stage ms) <= stage_step_ms by construction
      "stage_note": str,             # how the stages were timed, and why this method
      "stages": [{"stage": str, "ms": float}],      # per step; names from stage_names(config) (+ "loss")
      "ops": [{"op": str, "calls": float, "total_ms": float, "self_ms": float}],  # per step, top_k by self
      "op_step_ms": float,           # the profiled step's time the op rows are a share of
      "trace_files": [str],          # paths relative to trace_dir
      "flops": {"source": str, "conv_flops": int | None, "total_flops": int | None, "note": str},
      "compile": {"first_call_ms": float, "trace_compile_ms": float | None,
                  "recompilations_in_timed_loop": int | None, "program_size": int | None,
                  "program_size_unit": str, "note": str},
    }

Stage methods:
- "profiler": the stage times come from the framework profiler's events inside the named scopes
  (record_function / name_scope / named_scope) of a profiled step; a "loss" row where the trace shows the
  loss's ops; time outside every scope is left unattributed.
- "staged": the profiler cannot attribute time to stages (XLA fuses across the boundaries), so the step is
  run as one compiled function per stage, with a device sync after each (`time_staged`); stage_step_ms is
  that staged step's time, which differs from step_ms by what fusion across stages saves.

Imports numpy only.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

from impls.config import HourglassConfig

STAGE_METHODS: tuple[str, ...] = ("profiler", "staged")
EXTRA_STAGES: tuple[str, ...] = ("loss",)  # allowed besides the network's stages (forward_backward)


def stage_names(config: HourglassConfig) -> list[str]:
    """The network's stages in execution order: stem, then per stack hourglass_i, head_i, merge_i (i < S-1).

    These are the top-level attribute names of StackedHourglass in every implementation and the first
    component of every canonical parameter name, so a stage's parameters are those named "<stage>.*".
    """
    names = ["stem"]
    for i in range(config.num_stacks):
        names += [f"hourglass_{i}", f"head_{i}"]
        if i < config.num_stacks - 1:
            names.append(f"merge_{i}")
    return names


def stage_of(name: str) -> str:
    """The stage a canonical parameter or scoped op name belongs to: "hourglass_1.up1.conv1" -> "hourglass_1"."""
    return name.split(".", 1)[0].split("/", 1)[0]


def stage_conv_flops(config: HourglassConfig, batch_size: int, phase: str) -> dict[str, int]:
    """Analytic convolution FLOPs per stage (2 per multiply-add), counted as impls.count_flops counts."""
    from impls.spec import convs

    conv_list = convs(config)
    flops = dict.fromkeys(stage_names(config), 0)
    for index, conv in enumerate(conv_list):
        macs = conv.macs_per_image
        if phase == "forward_backward":
            macs = 3 * macs - (macs if index == 0 else 0)  # no input gradient for the first conv
        flops[stage_of(conv.name)] += 2 * macs * batch_size
    return flops


def time_staged(
    calls: Sequence[tuple[str, Callable[[Any], Any]]],
    first_input: Any,
    sync: Callable[[Any], None],
    *,
    warmup: int,
    steps: int,
) -> tuple[dict[str, float], float]:
    """Run `calls` in order as one staged step, `steps` times after `warmup` untimed ones.

    Each call takes the previous call's output (the first takes `first_input`) and returns its own;
    `sync(output)` blocks until that output is computed on the device, so each call's clock covers its
    own work only. Labels may repeat (a stage's forward and backward): their times are summed per step.
    Returns (ms per label, ms of the whole staged step) for the median step, whose labelled times sum to
    exactly its total.
    """
    if steps < 1:
        raise ValueError(f"steps must be >= 1, got {steps}")
    labels = list(dict.fromkeys(label for label, _ in calls))
    timed_steps: list[dict[str, float]] = []
    for index in range(warmup + steps):
        state = first_input
        step_ms: dict[str, float] = dict.fromkeys(labels, 0.0)
        for label, call in calls:
            t0 = time.perf_counter_ns()
            state = call(state)
            sync(state)
            step_ms[label] += (time.perf_counter_ns() - t0) / 1e6
        if index >= warmup:
            timed_steps.append(step_ms)
    # The median step (lower median for an even count) and its own breakdown, so the labels sum exactly to
    # the step time reported (medians taken per label separately would not).
    ordered = sorted(timed_steps, key=lambda step: sum(step.values()))
    median_step = ordered[(len(ordered) - 1) // 2]
    return dict(median_step), sum(median_step.values())


def op_table(events: Iterable[Mapping[str, Any]], steps: int, top_k: int) -> list[dict[str, Any]]:
    """Aggregate profiler events {"op", "total_ms", "self_ms"} (one per call) into per-step rows.

    Rows are per step (sums divided by `steps`), sorted by self time, the `top_k` largest kept.
    """
    rows: dict[str, dict[str, Any]] = {}
    for event in events:
        row = rows.setdefault(event["op"], {"op": event["op"], "calls": 0.0, "total_ms": 0.0, "self_ms": 0.0})
        row["calls"] += 1
        row["total_ms"] += float(event["total_ms"])
        row["self_ms"] += float(event.get("self_ms", event["total_ms"]))
    per_step = [
        {"op": r["op"], "calls": r["calls"] / steps, "total_ms": r["total_ms"] / steps, "self_ms": r["self_ms"] / steps}
        for r in rows.values()
    ]
    per_step.sort(key=lambda r: r["self_ms"], reverse=True)
    return per_step[:top_k]


class ProfileContractError(ValueError):
    """A profile result that breaks the contract in this module's docstring."""


def check_profile(result: Mapping[str, Any], config: HourglassConfig, phase: str) -> None:
    """Raise ProfileContractError naming the first broken promise of a `profile()` result."""

    def fail(message: str) -> None:
        raise ProfileContractError(f"{result.get('framework', '?')} {result.get('execution', '?')} {phase}: {message}")

    for key in ("step_ms", "stage_method", "stage_step_ms", "stages", "ops", "op_step_ms", "trace_files", "flops", "compile"):
        if key not in result:
            fail(f"missing key {key!r}")
    if result["stage_method"] not in STAGE_METHODS:
        fail(f"stage_method {result['stage_method']!r} is not one of {STAGE_METHODS}")
    for key in ("step_ms", "stage_step_ms", "op_step_ms"):
        value = result[key]
        if not (isinstance(value, (int, float)) and math.isfinite(value) and value > 0):
            fail(f"{key} must be a positive number, got {value!r}")
    names = [row["stage"] for row in result["stages"]]
    expected = stage_names(config)
    missing = [n for n in expected if n not in names]
    unknown = [n for n in names if n not in expected and n not in EXTRA_STAGES]
    if missing or unknown or len(set(names)) != len(names):
        fail(f"stages {names} should be {expected} (plus optionally {list(EXTRA_STAGES)}), each once")
    for row in result["stages"]:
        if not (math.isfinite(row["ms"]) and row["ms"] > 0):
            fail(f"stage {row['stage']} has time {row['ms']!r} ms; every stage must take a positive time")
    total = sum(row["ms"] for row in result["stages"])
    if total > result["stage_step_ms"] * (1 + 1e-9):
        fail(f"stage times sum to {total:.4f} ms, more than the step they partition ({result['stage_step_ms']:.4f} ms)")
    if not result["ops"]:
        fail("the op table is empty")
    for key in ("conv_flops", "total_flops"):
        value = result["flops"].get(key)
        if value is not None and not (isinstance(value, int) and value >= 0):
            fail(f"flops.{key} must be a non-negative int or None, got {value!r}")
