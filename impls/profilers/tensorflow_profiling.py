"""profile() for TensorFlow: the TensorFlow profiler's trace, stage name scopes or staged stages, FLOPs, tracing.

The contract and the result type are in impls/profiling.py; impls.tensorflow_hourglass.profile checks the
arguments and calls `run` here. Where the trace's op events carry the stages' name scopes, stage times come
from them; where they do not (eager op events, XLA's fused HLO ops), the stages run as one function each,
wired by impls.stages.stage_plan, with a device sync between them.
"""

from __future__ import annotations

import functools
import json
import statistics
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import tensorflow as tf

from impls import profiling
from impls.config import HourglassConfig
from impls.profiling import CompileInfo, FlopCount, ProfileRequest, ProfileResult, StageTiming
from impls.stages import EXTRA_STAGES, IMAGE, LOSS, Stage, stage_names, stage_plan
from impls.tensorflow_hourglass import FRAMEWORK, StackedHourglass, TensorFlowHourglass, build, heatmap_loss

_TRACE_JSON = "tensorflow_trace.json"  # Chrome trace: opens in https://ui.perfetto.dev
_LOGDIR = "tensorflow_logdir"  # TensorBoard logdir: plugins/profile/<run>/<host>.xplane.pb
_STEP_EVENT = "hgbench_step"  # TraceMe around each profiled step: the step windows in the trace
_EAGER_PREFIX = "EagerLocalExecute: "
_Window = tuple[int, int]  # (start_ps, end_ps) of one profiled step in the trace's clock


def run(request: ProfileRequest) -> ProfileResult:
    """Time and profile `steps` steady-state steps with the TensorFlow profiler (arguments already checked)."""
    model = build(request.config, device=request.device, precision=request.precision, execution=request.execution,
                  impl=request.impl)
    step = model.benchmark_step(request.phase, request.batch_size, request.seed)
    function, args = model.step_program(request.phase, request.batch_size, request.seed)  # what `step` calls
    traced = None if request.execution == "eager" else function  # a tf.function, whose traces are counted
    first_call_ms = profiling.time_call_ms(step)
    for _ in range(request.warmup):
        step()
    traces_before = traced.experimental_get_tracing_count() if traced is not None else None
    step_ms = profiling.median_step_ms(step, request.steps)
    wall_ms, windows, events, trace_files = _profiled_steps(step, request.steps, request.trace_dir)
    recompilations = traced.experimental_get_tracing_count() - traces_before if traced is not None else None

    op_events = _op_events(events)
    stages = _stage_timing(model, request, op_events, windows, wall_ms)
    return profiling.profile_result(
        FRAMEWORK, request, step_ms=step_ms, stages=stages, op_events=op_events,
        op_step_ms=statistics.median(wall_ms), trace_files=trace_files,
        flops=_flop_count(function, args),
        compile_info=_compile_info(model, traced, args, first_call_ms, recompilations),
    )  # fmt: skip


def _stage_timing(model: TensorFlowHourglass, request: ProfileRequest, op_events: list[dict[str, Any]],
                  windows: list[_Window], wall_ms: list[float]) -> StageTiming:  # fmt: skip
    """The profiler's scopes where the trace has them, else staged stages."""
    median = profiling.lower_median_index(wall_ms)
    stage_ms, reason = _profiler_stages(model.config, model.execution, op_events, windows, median, request.steps)
    if reason is None:
        attributed = sum(stage_ms.values()) / wall_ms[median]
        note = (f"ops' wall time attributed to the stage name scope in their names (forward and gradient ops), "
                f"time of ops of several stages running at once split evenly between them; {attributed:.0%} "
                f"of the median profiled step is attributed, the rest is executor overhead and unscoped ops")
        return StageTiming("profiler", statistics.median(wall_ms), note, stage_ms)  # stage_step_ms = op_step_ms
    # XLA compiles each stage once (its first call); the warm-up step keeps that out of the timed steps.
    stage_ms, staged_ms = _time_staged_stages(model, request)
    how = {"eager": "called eagerly", "function": "each a tf.function", "xla": "each a tf.function(jit_compile=True)"}
    note = f"{reason}; stages {how[model.execution]}, timed one after another with a device sync between them"
    if request.train:
        note += "; backward: one GradientTape per stage, its gradient taken in reverse stage order"
    return StageTiming("staged", staged_ms, note, stage_ms)


# ---------------------------------------------------------------------------------------- the profiled steps
def _profiled_steps(step: Callable[[], None], steps: int,
                    trace_dir: Path) -> tuple[list[float], list[_Window], list[dict[str, Any]], list[str]]:  # fmt: skip
    """Run `steps` steps under the profiler; (wall ms per step, step windows in ps, events, trace files)."""
    logdir = trace_dir / _LOGDIR
    before = {p: p.stat().st_mtime_ns for p in logdir.rglob("*.xplane.pb")}
    wall_ms = []
    tf.profiler.experimental.start(str(logdir))
    try:
        for index in range(steps):
            t0 = time.perf_counter_ns()
            with tf.profiler.experimental.Trace(_STEP_EVENT, step_num=index, _r=1):
                step()
            wall_ms.append((time.perf_counter_ns() - t0) / 1e6)
    finally:
        tf.profiler.experimental.stop()
    written = [p for p in logdir.rglob("*.xplane.pb") if before.get(p) != p.stat().st_mtime_ns]
    if not written:
        raise RuntimeError(f"the TensorFlow profiler wrote no .xplane.pb under {logdir}; is the directory writable?")
    events = _read_xspace(written[0])
    windows = sorted((e["start_ps"], e["start_ps"] + e["dur_ps"]) for e in events if e["name"] == _STEP_EVENT)
    _write_chrome_trace(events, trace_dir / _TRACE_JSON)
    return wall_ms, windows, events, [_TRACE_JSON, str(written[0].relative_to(trace_dir))]


def _read_xspace(path: Path) -> list[dict[str, Any]]:
    """Every timed event of an XSpace file: plane/line ids, name, op type, absolute start and duration in ps."""
    from tensorflow.tsl.profiler.protobuf import xplane_pb2  # TF's own copy of the profiler's proto

    space = xplane_pb2.XSpace()
    space.ParseFromString(path.read_bytes())
    events = []
    for pid, plane in enumerate(space.planes):
        for tid, line in enumerate(plane.lines):
            for event in line.events:
                meta = plane.event_metadata[event.metadata_id]
                stats = {plane.stat_metadata[s.metadata_id].name: _stat_value(plane, s) for s in event.stats}
                events.append({
                    "plane": plane.name, "line": line.name, "pid": pid, "tid": tid, "name": meta.name,
                    "type": meta.display_name, "start_ps": line.timestamp_ns * 1000 + event.offset_ps,
                    "dur_ps": event.duration_ps, "stats": stats,
                })  # fmt: skip
    return events


def _stat_value(plane: Any, stat: Any) -> object:
    """An XStat's value as a plain JSON-able Python value (a ref_value is a name in the plane's stat table)."""
    kind = stat.WhichOneof("value")
    if kind == "ref_value":
        return plane.stat_metadata[stat.ref_value].name
    value = getattr(stat, kind) if kind else None
    return value.decode(errors="replace") if isinstance(value, bytes) else value


def _write_chrome_trace(events: list[dict[str, Any]], path: Path) -> None:
    """The events as a Chrome trace JSON (µs), so Perfetto opens the trace without TensorBoard."""
    t0_ps = min((e["start_ps"] for e in events), default=0)
    trace = [{"name": e["name"], "ph": "X", "ts": (e["start_ps"] - t0_ps) / 1e6, "dur": e["dur_ps"] / 1e6,
              "pid": e["pid"], "tid": e["tid"], **({"args": e["stats"]} if e["stats"] else {})}
             for e in events if e["dur_ps"] > 0]  # fmt: skip
    names = {(e["pid"], e["tid"]): (e["plane"], e["line"]) for e in events}
    for (pid, tid), (plane, line) in names.items():
        trace.append({"name": "process_name", "ph": "M", "pid": pid, "tid": tid, "args": {"name": plane}})
        trace.append({"name": "thread_name", "ph": "M", "pid": pid, "tid": tid, "args": {"name": line}})
    path.write_text(json.dumps({"displayTimeUnit": "ms", "traceEvents": trace}))


def _op_events(events: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The op executions among `events`, {"op", "scope", "start_ps", "end_ps", "total_ms", "self_ms"}.

    Graph ops are named "<scope>/<name>:<type>"; eager ops "EagerLocalExecute: <type>" (no scope); XLA's
    HLO instructions carry an "hlo_op" stat. On a GPU, the device plane's kernels (with their "tf_op") are
    the step's work, so they replace the host's op events, which only time the launches.
    """
    ops = []
    for e in events:
        name, on_gpu = e["name"], e["plane"].startswith("/device:GPU")
        if "hlo_op" in e["stats"]:
            scope, op = "", str(e["stats"]["hlo_op"])  # XLA fuses across stages: no scope
        elif on_gpu:
            # tf_op: the launching op's annotation, nested ones joined by "::" ("<fn>:<fn>::stem/Conv2D:Conv2D")
            scope, _, op = str(e["stats"].get("tf_op", "")).split("::")[-1].rpartition(":")
            if not op or op.startswith("__"):
                scope, op = "", name  # a kernel outside any TF op, or inside a whole XLA program
        elif e["type"] and name.endswith(":" + e["type"]):
            scope, op = name[: -len(e["type"]) - 1], e["type"]
        elif name.startswith(_EAGER_PREFIX):
            scope, op = "", name[len(_EAGER_PREFIX):]
        else:
            continue
        if op.startswith("__"):
            continue  # a call of a whole function ("__inference_...", an XLA program): its own ops are listed
        ops.append({"op": op, "scope": scope, "start_ps": e["start_ps"], "end_ps": e["start_ps"] + e["dur_ps"],
                    "key": (e["pid"], e["tid"]), "device": on_gpu})  # fmt: skip
    if any(o["device"] for o in ops):
        ops = [o for o in ops if o["device"]]
    _set_self_times(ops)
    return ops


def _set_self_times(ops: list[dict[str, Any]]) -> None:
    """total_ms and self_ms (total less the ops nested inside it on the same thread) of every op, in place."""
    stack: list[dict[str, Any]] = []
    for op in sorted(ops, key=lambda o: (o["key"], o["start_ps"], -o["end_ps"])):
        op["total_ms"] = op["self_ms"] = (op["end_ps"] - op["start_ps"]) / 1e9
        while stack and (stack[-1]["key"] != op["key"] or stack[-1]["end_ps"] <= op["start_ps"]):
            stack.pop()
        if stack and op["end_ps"] <= stack[-1]["end_ps"]:
            stack[-1]["self_ms"] -= op["total_ms"]
        stack.append(op)


_NO_SCOPES = {
    "eager": "the trace's eager op events carry no name scope",
    "function": "the trace's graph op events carry no name scope",
    "xla": "XLA fuses across stage boundaries and its HLO op events carry no name scope",
}


def _profiler_stages(config: HourglassConfig, execution: str, ops: list[dict[str, Any]], windows: list[_Window],
                     median: int, steps: int) -> tuple[dict[str, float], str | None]:  # fmt: skip
    """Stage ms of the median profiled step from the ops' scoped names, or ({}, why that is impossible)."""
    names = stage_names(config)
    if not any(o["scope"] for o in ops):
        return {}, _NO_SCOPES[execution]
    if len(windows) != steps:
        return {}, f"the trace holds {len(windows)} '{_STEP_EVENT}' windows for {steps} steps"
    start_ps, end_ps = windows[median]
    owned = [(max(o["start_ps"], start_ps), min(o["end_ps"], end_ps), _stage_in_scope(o["scope"], names))
             for o in ops if o["end_ps"] > start_ps and o["start_ps"] < end_ps]  # fmt: skip
    stage_ms = _split_concurrent(owned)
    missing = [n for n in names if stage_ms.get(n, 0.0) <= 0]
    if missing:
        return {}, f"no op in the trace carries the name scope of {missing}"
    return {n: stage_ms[n] for n in [*names, *EXTRA_STAGES] if stage_ms.get(n, 0.0) > 0}, None


def _stage_in_scope(scope: str, names: list[str]) -> str:
    """The first component of "gradient_tape/head_0/res/Conv2D" that is a stage name (or "loss"), else ""."""
    return next((part for part in scope.split("/") if part in names or part in EXTRA_STAGES), "")


def _split_concurrent(intervals: list[tuple[int, int, str]]) -> dict[str, float]:
    """ms per owner of (start_ps, end_ps, owner) intervals; time where owners overlap is split evenly.

    TF's executor runs independent ops on several threads at once, so plain sums of op times could exceed
    the step; this split makes the owners' times sum to the union of the intervals, at most the window.
    """
    edges = sorted([(s, 1, owner) for s, e, owner in intervals] + [(e, -1, owner) for s, e, owner in intervals])
    active: dict[str, int] = {}
    owned_ps: dict[str, float] = {}
    previous_ps = edges[0][0] if edges else 0
    for t_ps, change, owner in edges:
        if active:
            for name in active:
                owned_ps[name] = owned_ps.get(name, 0.0) + (t_ps - previous_ps) / len(active)
        previous_ps = t_ps
        active[owner] = active.get(owner, 0) + change
        if not active[owner]:
            del active[owner]
    return {owner: ps / 1e9 for owner, ps in owned_ps.items() if owner}


# ------------------------------------------------------------------------------------------- staged stages
def _time_staged_stages(model: TensorFlowHourglass, request: ProfileRequest) -> tuple[dict[str, float], float]:
    """Per-stage ms and staged-step ms: one callable per stage (and per stage backward), synced between them."""
    x, target = model.step_inputs(request.batch_size, request.seed)  # (N, H, W, 3), (N, h, w, K)
    plan = stage_plan(model.config, request.phase)
    bodies = _stage_bodies(model.net, plan, request.train, target)
    calls = []
    for stage in plan:
        variables = list(getattr(model.net, stage.name).trainable_variables) if stage.name != LOSS else []
        function = _stage_function(model, stage.name, bodies[stage.name])
        calls.append((stage.name, _stage_forward(function, stage, variables, request.train)))
    if request.train:
        calls += [(stage.name, _stage_backward(stage)) for stage in reversed(plan)]
    # One tf.function per stage from one closure makes TF warn about "retracing"; each is traced once, by design.
    logger, level = tf.get_logger(), tf.get_logger().level
    logger.setLevel("ERROR")
    try:
        return profiling.time_staged(calls, x, lambda _state: tf.test.experimental.sync_devices(),
                                     warmup=max(request.warmup, 1), steps=request.steps)  # fmt: skip
    finally:
        logger.setLevel(level)


def _stage_bodies(net: StackedHourglass, plan: tuple[Stage, ...], train: bool,
                  target: tf.Tensor) -> dict[str, Callable]:  # fmt: skip
    """Stage name -> the callable that runs it on the plan's inputs; the loss reads every stack's heatmaps."""
    bodies: dict[str, Callable] = {}
    for stage in plan:
        if stage.name == LOSS:
            bodies[stage.name] = lambda *heatmaps: heatmap_loss(tf.stack(heatmaps), target)  # (S, N, h, w, K)
        elif stage.name.startswith("merge_"):
            bodies[stage.name] = getattr(net, stage.name)  # no BN: takes no training flag
        else:
            bodies[stage.name] = functools.partial(getattr(net, stage.name), train=train)
    return bodies


def _stage_function(model: TensorFlowHourglass, name: str, body: Callable) -> Callable:
    """`body` in the stage's name scope on the model's device, compiled as the model's execution mode is."""

    def run(*args: tf.Tensor) -> tuple[tf.Tensor, ...]:
        with tf.device(model.tf_device), tf.name_scope(name):
            out = body(*args)
        return out if isinstance(out, tuple) else (out,)

    return run if model.execution == "eager" else tf.function(run, jit_compile=model.execution == "xla")


def _stage_forward(fn: Callable, stage: Stage, variables: list[tf.Variable], train: bool) -> Callable:
    """A time_staged call running one stage forward; in training it keeps a tape for the stage's backward."""
    name, ins, outs = stage.name, stage.inputs, stage.outputs

    def call(state: Any) -> dict:
        first = IMAGE in ins  # the first stage starts a step's state
        state = {"env": {IMAGE: state}, "tapes": {}, "cotangents": {}, "grads": []} if first else state
        args = [state["env"][key] for key in ins]
        # The network input needs no gradient (the analytic count leaves out the first conv's input gradient).
        if train:
            sources = ([] if first else args) + variables
            with tf.GradientTape(watch_accessed_variables=False) as tape:
                tape.watch(sources)
                values = fn(*args)
            state["tapes"][name] = (tape, sources, values)
        else:
            values = fn(*args)
        state["env"].update(zip(outs, values, strict=True))
        return state

    return call


def _stage_backward(stage: Stage) -> Callable:
    """A time_staged call running one stage's backward: its output cotangents to input and variable gradients."""
    name, ins, outs = stage.name, stage.inputs, stage.outputs

    def call(state: dict) -> dict:
        tape, sources, values = state["tapes"].pop(name)
        cotangents = state["cotangents"]
        # The loss starts the backward (cotangent None means ones); outputs nobody consumed get none.
        pairs = [(v, cotangents.pop(k, None)) for k, v in zip(outs, values, strict=True)
                 if name == LOSS or k in cotangents]  # fmt: skip
        output_gradients = None if name == LOSS else [g for _, g in pairs]
        grads = tape.gradient([v for v, _ in pairs], sources, output_gradients=output_gradients,
                              unconnected_gradients=tf.UnconnectedGradients.ZERO)  # fmt: skip
        n_inputs = 0 if IMAGE in ins else len(ins)
        for key, grad in zip(ins[:n_inputs], grads[:n_inputs], strict=True):
            cotangents[key] = cotangents[key] + grad if key in cotangents else grad
        state["grads"].extend(grads[n_inputs:])  # the parameter gradients, kept until the step ends
        return state

    return call


# ------------------------------------------------------------------------------------------ FLOPs, compile
def _flop_count(function: Callable, args: tuple[tf.Tensor, ...]) -> FlopCount:
    """The TF profiler's float_operation count over the step's graph, ops the outputs depend on only."""
    batch_size = int(args[0].shape[0])
    # Fully defined shapes (flop statistics need static ones): the step's own arguments, batch included.
    specs = [tf.TensorSpec(arg.shape, arg.dtype) for arg in args]
    python_function = getattr(function, "python_function", function)  # the same graph for every execution
    concrete = tf.function(python_function).get_concrete_function(*specs)
    options = tf.compat.v1.profiler.ProfileOptionBuilder.float_operation()
    options["output"] = "none"
    tree = tf.compat.v1.profiler.profile(graph=concrete.graph, options=options)
    live = _live_op_names(concrete.graph)
    by_type: dict[str, int] = {}
    nodes, pruned_flops = list(tree.children), 0
    while nodes:
        node = nodes.pop()
        nodes.extend(node.children)
        if node.float_ops and node.name in live:
            op_type = concrete.graph.get_operation_by_name(node.name).type
            by_type[op_type] = by_type.get(op_type, 0) + int(node.float_ops)
        elif node.float_ops:
            pruned_flops += int(node.float_ops)
    dead = (f"{pruned_flops} FLOPs of dead ops left out (the gradient builder also emits the first conv's input "
            f"gradient, which nothing uses and Grappler prunes before running); " if pruned_flops else "")
    conv_flops = sum(f for t, f in by_type.items() if "Conv2D" in t)  # Conv2D, Conv2DBackpropInput/Filter
    others = ", ".join(f"{t} {f}" for t, f in sorted(by_type.items(), key=lambda kv: -kv[1]) if "Conv2D" not in t)
    note = (f"tf.compat.v1.profiler float_operation() on the step's graph traced at batch {batch_size} (the same "
            f"graph for every execution mode; 2 FLOPs per multiply-add), summed per op type over the ops the "
            f"outputs and side effects depend on; {dead}"
            f"conv_flops = Conv2D + Conv2DBackpropInput + Conv2DBackpropFilter; total_flops also counts "
            f"{others or 'nothing else'} (ReLU and copies have no registered FLOP statistics)")  # fmt: skip
    return FlopCount("tf.compat.v1.profiler.profile(float_operation)", conv_flops, sum(by_type.values()), note)


def _live_op_names(graph: tf.Graph) -> set[str]:
    """Names of the ops that the function's outputs and control outputs (variable updates) depend on."""
    stack = [t.op for t in graph.outputs] + list(graph.control_outputs)
    live: set[str] = set()
    while stack:
        op = stack.pop()
        if op.name not in live:
            live.add(op.name)
            stack.extend(t.op for t in op.inputs)
            stack.extend(op.control_inputs)
    return live


def _compile_info(model: TensorFlowHourglass, traced: Any, args: tuple[tf.Tensor, ...], first_call_ms: float,
                  recompilations: int | None) -> CompileInfo:  # fmt: skip
    """first_call_ms, tracing time, retraces in the timed loops and program size of the step's function."""
    if traced is None:
        return CompileInfo(first_call_ms, None, None, None, "", "eager: ops run one by one, nothing is traced or compiled")
    # Tracing alone, timed on a fresh copy of the step's tf.function so the model's own stays untouched.
    copy = tf.function(traced.python_function, input_signature=traced.input_signature)
    t0 = time.perf_counter_ns()
    copy.get_concrete_function()
    trace_ms = (time.perf_counter_ns() - t0) / 1e6
    if model.execution == "xla":
        size, unit = len(traced.experimental_get_compiler_ir(*args)(stage="hlo")), "chars of HLO text"
    else:
        size, unit = len(traced.get_concrete_function().graph.get_operations()), "ops"
    what = "XLA compilation" if model.execution == "xla" else "Grappler's graph optimisation"
    return CompileInfo(first_call_ms, trace_ms, recompilations, size, unit,
                       f"trace_compile_ms is Python tracing alone (a fresh copy of the step's tf.function); "
                       f"{what} happens inside the first call; recompilations count retraces "
                       f"(experimental_get_tracing_count) over the timed and profiled loops")  # fmt: skip
