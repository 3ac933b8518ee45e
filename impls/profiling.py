"""The profiling contract shared by the three implementations: its typed result and its framework-free pieces.

Each implementation module (`impls.load(framework)`) exposes

    def profile(config, *, phase, batch_size, execution, trace_dir, device="cpu", precision="fp32",
                warmup=2, steps=5, seed=0, top_k=25, impl="idiomatic") -> ProfileResult

made by `framework_profile` below: it checks the arguments, then runs
`impls/profilers/<framework>_profiling.py`, which builds the model, warms it up, profiles `steps`
steady-state steps with the framework's own profiler (torch.profiler, the TensorFlow profiler,
jax.profiler) and writes the trace files under `trace_dir`.

The result is a frozen `ProfileResult`. `result.to_dict()` is the plain JSON-able dict below, which crosses
the process boundary; `check_profile` checks it. A ProfileResult is also a read-only Mapping of that same
dict (`dict(result) == result.to_dict()`), so code that reads a profile as a dict reads either.

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
      "impl": str,                   # the implementation variant profiled (impls.registry.IMPLS)
    }

Stage methods:
- "profiler": the stage times come from the framework profiler's events inside the named scopes
  (record_function / name_scope / named_scope) of a profiled step; a "loss" row where the trace shows the
  loss's ops; time outside every scope is left unattributed.
- "staged": the profiler cannot attribute time to stages (XLA fuses across the boundaries), so the step is
  run as one compiled function per stage, wired by impls.stages.stage_plan, with a device sync after each
  (`time_staged`); stage_step_ms is that staged step's time, which differs from step_ms by what fusion
  across stages saves.

Imports no framework.
"""

from __future__ import annotations

import dataclasses
import importlib
import math
import statistics
import time
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from impls import registry
from impls.base import check_profile_args
from impls.config import HourglassConfig
from impls.stages import EXTRA_STAGES, stage_conv_flops, stage_names, stage_of

__all__ = [
    "EXTRA_STAGES",
    "STAGE_METHODS",
    "CompileInfo",
    "FlopCount",
    "OpRow",
    "ProfileContractError",
    "ProfileRequest",
    "ProfileResult",
    "StageTime",
    "StageTiming",
    "check_profile",
    "framework_profile",
    "lower_median_index",
    "median_step_ms",
    "op_table",
    "profile_result",
    "stage_conv_flops",  # re-exported from impls.stages: bench imports it from here
    "stage_names",  # re-exported from impls.stages
    "stage_of",  # re-exported from impls.stages
    "time_call_ms",
    "time_staged",
]

STAGE_METHODS: tuple[str, ...] = ("profiler", "staged")


# ------------------------------------------------------------------------------------------ what is asked
@dataclass(frozen=True)
class ProfileRequest:
    """One profile() call's arguments, checked: what to build, which step, how many steps, where traces go."""

    config: HourglassConfig
    phase: str  # "forward" or "forward_backward"
    batch_size: int
    execution: str
    trace_dir: Path
    device: str = "cpu"
    precision: str = "fp32"
    warmup: int = 2  # untimed steps after the first call, before the timed and profiled ones
    steps: int = 5  # timed steps, then as many profiled ones
    seed: int = 0  # of the step's random inputs (impls.spec.random_batch)
    top_k: int = 25  # op rows kept, by self time
    impl: str = "idiomatic"  # the implementation variant to build (impls.registry.IMPLS)

    @property
    def train(self) -> bool:
        """True for forward_backward: train-mode BN, the loss and the gradients."""
        return self.phase == "forward_backward"


def framework_profile(framework: str, gpu_available: Callable[[], bool]) -> Callable[..., ProfileResult]:
    """The `profile()` of `framework`'s implementation module (the signature in this module's docstring).

    It checks its arguments, then calls `run(request)` of impls/profilers/<framework>_profiling.py, imported
    on the first call only: that module loads the framework's profiler, which a benchmark run never needs,
    and it imports the model module, which therefore cannot import it.
    """
    executions, impls = registry.EXECUTIONS[framework], registry.IMPLS[framework]

    def profile(
        config: HourglassConfig, *, phase: str, batch_size: int, execution: str, trace_dir: str | Path,
        device: str = "cpu", precision: str = "fp32", warmup: int = 2, steps: int = 5, seed: int = 0,
        top_k: int = 25, impl: str = registry.DEFAULT_IMPL,
    ) -> ProfileResult:
        check_profile_args(
            framework, executions, gpu_available, phase=phase, batch_size=batch_size, execution=execution,
            precision=precision, device=device, warmup=warmup, steps=steps, top_k=top_k, impl=impl, impls=impls,
        )
        request = ProfileRequest(config, phase, batch_size, execution, Path(trace_dir), device, precision,
                                 warmup, steps, seed, top_k, impl)  # fmt: skip
        return importlib.import_module(f"impls.profilers.{framework}_profiling").run(request)

    profile.__doc__ = (
        f"Time, profile and stage-attribute one `phase` step of {framework} "
        f"(impls/profilers/{framework}_profiling.py); traces go under `trace_dir`. Returns the ProfileResult "
        "documented in impls.profiling."
    )
    profile.__qualname__ = profile.__name__ = "profile"
    profile.__module__ = f"impls.{framework}_hourglass"
    return profile


# ------------------------------------------------------------------------------------------- what came back
@dataclass(frozen=True)
class StageTime:
    """One stage's time in the step that the stage rows partition."""

    stage: str  # a name from stage_names(config), or "loss"
    ms: float


@dataclass(frozen=True)
class OpRow:
    """One op kind's share of a profiled step, per step (sums over `steps` divided by `steps`)."""

    op: str
    calls: float
    total_ms: float
    self_ms: float  # total less the ops nested inside it


@dataclass(frozen=True)
class FlopCount:
    """The framework's own FLOP count of one step (2 FLOPs per multiply-add); None where it has none."""

    source: str  # the counter used
    conv_flops: int | None
    total_flops: int | None
    note: str  # what is counted and what is not


@dataclass(frozen=True)
class CompileInfo:
    """What the first call cost and whether the timed loops recompiled; None where not applicable."""

    first_call_ms: float
    trace_compile_ms: float | None
    recompilations_in_timed_loop: int | None
    program_size: int | None
    program_size_unit: str  # "" when program_size is None
    note: str


@dataclass(frozen=True)
class StageTiming:
    """How a framework timed its stages: the method, the step the times partition, and the times."""

    method: str  # one of STAGE_METHODS
    step_ms: float  # the profiled or staged step the stage times partition
    note: str
    ms: Mapping[str, float]  # stage name -> ms per step


@dataclass(frozen=True)
class ProfileResult(Mapping[str, Any]):
    """What one profile() call measured. Fields and their meaning: this module's docstring.

    Read it as typed fields (`result.stages[0].ms`), or as a Mapping of `to_dict()` (`result["stages"]`,
    `dict(result)`), the form that crosses a process boundary as JSON.
    """

    framework: str
    execution: str
    phase: str
    batch_size: int
    precision: str
    device: str
    step_ms: float
    stage_method: str
    stage_step_ms: float
    stage_note: str
    stages: tuple[StageTime, ...]
    ops: tuple[OpRow, ...]
    op_step_ms: float
    trace_files: tuple[str, ...]
    flops: FlopCount
    compile: CompileInfo
    impl: str = "idiomatic"

    def to_dict(self) -> dict[str, Any]:
        """The plain JSON-able dict of this module's docstring: lists for tuples, dicts for the pieces."""
        return {field.name: self[field.name] for field in dataclasses.fields(self)}

    def __getitem__(self, key: str) -> Any:
        """The plain (to_dict) form of field `key`."""
        if key not in self._keys():
            raise KeyError(key)
        return _plain(getattr(self, key))

    def __iter__(self) -> Iterator[str]:
        return iter(self._keys())

    def __len__(self) -> int:
        return len(self._keys())

    @classmethod
    def _keys(cls) -> tuple[str, ...]:
        return tuple(field.name for field in dataclasses.fields(cls))


def _plain(value: Any) -> Any:
    """`value` with dataclasses as dicts and tuples as lists, recursively: the JSON form."""
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {field.name: _plain(getattr(value, field.name)) for field in dataclasses.fields(value)}
    if isinstance(value, (list, tuple)):
        return [_plain(item) for item in value]
    return value


def profile_result(
    framework: str, request: ProfileRequest, *, step_ms: float, stages: StageTiming,
    op_events: Iterable[Mapping[str, Any]], op_step_ms: float, trace_files: Sequence[str], flops: FlopCount,
    compile_info: CompileInfo,
) -> ProfileResult:
    """The ProfileResult of one run: the request's identity, stage rows in execution order (then "loss"), and
    the op table of `op_events` (see op_table)."""
    order = [*stage_names(request.config), *EXTRA_STAGES]
    position = {name: index for index, name in enumerate(order)}
    names = sorted(stages.ms, key=lambda name: position.get(name, len(order)))  # unknown names last, for check_profile
    return ProfileResult(
        framework=framework, execution=request.execution, phase=request.phase, batch_size=request.batch_size,
        precision=request.precision, device=request.device, step_ms=step_ms, stage_method=stages.method,
        stage_step_ms=stages.step_ms, stage_note=stages.note,
        stages=tuple(StageTime(name, stages.ms[name]) for name in names),
        ops=tuple(OpRow(**row) for row in op_table(op_events, request.steps, request.top_k)),
        op_step_ms=op_step_ms, trace_files=tuple(trace_files), flops=flops, compile=compile_info,
        impl=request.impl,
    )  # fmt: skip


# ---------------------------------------------------------------------------------------- shared measuring
def time_call_ms(call: Callable[[], Any]) -> float:
    """Wall time of one call in ms; `call` must end synchronised (benchmark_step's promise)."""
    t0 = time.perf_counter_ns()
    call()
    return (time.perf_counter_ns() - t0) / 1e6


def median_step_ms(step: Callable[[], Any], steps: int) -> float:
    """Median wall time in ms of `steps` synchronised calls of `step` (the profiler off)."""
    return statistics.median(time_call_ms(step) for _ in range(steps))


def lower_median_index(values: Sequence[float]) -> int:
    """Index of the lower median of `values` (the middle one of an odd count, the smaller middle of an even)."""
    return sorted(range(len(values)), key=values.__getitem__)[(len(values) - 1) // 2]


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
        raise ValueError(f"steps must be >= 1, got {steps}; time at least one staged step")
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
    # The median step and its own breakdown, so the labels sum exactly to the step time reported (medians
    # taken per label separately would not).
    median_step = timed_steps[lower_median_index([sum(step.values()) for step in timed_steps])]
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


# ------------------------------------------------------------------------------------------ the contract check
class ProfileContractError(ValueError):
    """A profile result that breaks the contract in this module's docstring."""


def check_profile(result: Mapping[str, Any], config: HourglassConfig, phase: str) -> None:
    """Raise ProfileContractError naming the first broken promise of a `profile()` result (a dict or a
    ProfileResult)."""

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
