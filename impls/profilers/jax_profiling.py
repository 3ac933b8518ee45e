"""profile() for JAX: a jax.profiler (Perfetto) trace, staged per-stage jits, StableHLO conv FLOPs, compile stats.

The contract and the result type are in impls/profiling.py; impls.jax_hourglass.profile checks the
arguments and calls `run` here. XLA fuses across stage boundaries and the trace names only each executed
HLO op, not its named_scope, so stages are always timed staged: one jax.jit per stage of
impls.stages.stage_plan, with the backward through each stage's jax.vjp.
"""

from __future__ import annotations

import contextlib
import functools
import gzip
import json
import math
import re
import statistics
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from impls import profiling, spec
from impls.jax_hourglass import FRAMEWORK, JaxHourglass, apply_module, build, heatmap_loss, x64_scope
from impls.profiling import CompileInfo, FlopCount, ProfileRequest, ProfileResult, StageTiming
from impls.stages import IMAGE, LOSS, Stage, stage_plan

_TARGET = "target"  # the loss's constant in the staged environment, beside the plan's tensor keys


def run(request: ProfileRequest) -> ProfileResult:
    """Time, trace (jax.profiler), stage-time and FLOP-count one `phase` step (arguments already checked)."""
    with x64_scope(request.precision):  # fp64: every call below runs with x64 on (see x64_scope)
        return _run(request)


def _run(request: ProfileRequest) -> ProfileResult:
    model = build(request.config, device=request.device, precision=request.precision, execution=request.execution,
                  impl=request.impl)
    step = model.benchmark_step(request.phase, request.batch_size, request.seed)
    function, args = model.step_program(request.phase, request.batch_size, request.seed)  # for cache and HLO
    with _compile_seconds() as compile_seconds:
        first_call_ms = profiling.time_call_ms(step)  # trace + lower + XLA compile + one run
    for _ in range(request.warmup):
        step()
    cache_entries = function._cache_size()
    step_ms = profiling.median_step_ms(step, request.steps)
    profiled_ms, trace_files, events = _profiled_steps(step, request.steps, request.trace_dir)
    recompilations = function._cache_size() - cache_entries

    x, target = model.step_inputs(request.batch_size, request.seed)  # (N, H, W, 3), (N, h, w, K)
    stage_ms, stage_step_ms = profiling.time_staged(
        _staged_calls(model, request.phase), {IMAGE: x, _TARGET: target},
        lambda env: jax.block_until_ready(env["last"]), warmup=max(request.warmup, 1), steps=request.steps)  # fmt: skip
    stages = StageTiming("staged", stage_step_ms, _STAGE_NOTE[request.phase], stage_ms)
    trace_compile_ms = 1e3 * sum(compile_seconds) if compile_seconds else None
    flops, compile_info = _program_facts(function, args, request, first_call_ms, trace_compile_ms, recompilations)
    return profiling.profile_result(
        FRAMEWORK, request, step_ms=step_ms, stages=stages, op_events=events,
        op_step_ms=statistics.median(profiled_ms), trace_files=trace_files, flops=flops, compile_info=compile_info,
    )  # fmt: skip


_STAGE_NOTE = {
    "forward": "staged: XLA fuses across stage boundaries and the jax.profiler trace names only each executed "
               "HLO op (hlo_module, hlo_op), not its named_scope, so each stage (eval-mode BN) is its own "
               "jax.jit, called in order with jax.block_until_ready after each; the staged step pays a "
               "dispatch and a sync per stage and loses cross-stage fusion, which is how stage_step_ms "
               "differs from step_ms.",
    "forward_backward": "staged: XLA fuses across stage boundaries and the jax.profiler trace names only each "
                        "executed HLO op, not its named_scope, so each stage is its own jax.jit: forward stages "
                        "in order (train-mode BN) each return their output and jax.vjp residuals (no "
                        "recomputation), then a 'loss' call (value and gradient w.r.t. the heatmaps), then each "
                        "stage's VJP in reverse order, timed under the stage's name (forward + backward "
                        "summed), with jax.block_until_ready after every call; stage_step_ms differs from "
                        "step_ms by the per-call dispatch and syncs and by cross-stage fusion and scheduling.",
}


_COMPILE_EVENTS = ("/jax/core/compile/jaxpr_trace_duration", "/jax/core/compile/jaxpr_to_mlir_module_duration",
                   "/jax/core/compile/backend_compile_duration")


@contextlib.contextmanager
def _compile_seconds() -> Iterator[list[float]]:
    """Seconds JAX itself reports tracing, lowering and XLA-compiling inside the block (jax.monitoring)."""
    seconds: list[float] = []

    def listener(event: str, duration_secs: float, **kwargs: Any) -> None:
        if event in _COMPILE_EVENTS:
            seconds.append(duration_secs)

    jax.monitoring.register_event_duration_secs_listener(listener)
    try:
        yield seconds
    finally:
        jax.monitoring.unregister_event_duration_listener(listener)


# ---------------------------------------------------------------------------------------- the profiled steps
def _profiled_steps(step: Callable[[], None], steps: int, trace_dir: Path) -> tuple[list[float], list[str], list[dict]]:
    """Wall ms of `steps` calls under jax.profiler.trace, the trace files written (relative) and its op events."""
    before = set(trace_dir.rglob("*"))
    options = jax.profiler.ProfileOptions()
    options.python_tracer_level = 0  # Python frames would triple the events and slow the traced steps
    with jax.profiler.trace(str(trace_dir), create_perfetto_trace=True, profiler_options=options):
        wall_ms = [profiling.time_call_ms(step) for _ in range(steps)]
    written = sorted(path for path in trace_dir.rglob("*") if path.is_file() and path not in before)
    perfetto = [path for path in written if path.name == "perfetto_trace.json.gz"]
    if not perfetto:
        raise RuntimeError(f"jax.profiler wrote no perfetto_trace.json.gz under {trace_dir}; it wrote {written}")
    return wall_ms, [str(path.relative_to(trace_dir)) for path in written], _op_events(perfetto[0])


def _op_events(perfetto_path: Path) -> list[dict[str, Any]]:
    """One {"op", "total_ms", "self_ms"} per executed XLA op (thunk/fusion/kernel) in a perfetto trace.

    XLA tags those events with args hlo_module/hlo_op; dispatch and runtime events carry neither. The op is
    the HLO instruction name without its ".N" suffix ("convolution", "add_maximum_fusion"), one row per kind.
    On GPU the kernels on the /device: rows are kept, so the host-side launch events are not counted twice.
    """
    with gzip.open(perfetto_path, "rt") as file:
        events = json.load(file)["traceEvents"]
    device_pids = {e["pid"] for e in events if e.get("ph") == "M" and e.get("name") == "process_name"
                   and str(e.get("args", {}).get("name", "")).startswith("/device:")}
    ops = [e for e in events if e.get("ph") == "X" and "hlo_op" in e.get("args", {})]
    ops = [e for e in ops if e["pid"] in device_pids] or ops
    rows: list[dict[str, Any]] = []
    ops.sort(key=lambda e: (e["pid"], e["tid"], e["ts"], -e["dur"]))
    open_ops: list[tuple[tuple, float, dict]] = []  # (thread, end_us, row): enclosing ops, for self time
    for e in ops:
        thread = (e["pid"], e["tid"])
        while open_ops and (open_ops[-1][0] != thread or e["ts"] >= open_ops[-1][1]):
            open_ops.pop()
        row = {"op": re.sub(r"\.\d+$", "", e["args"]["hlo_op"]), "total_ms": e["dur"] / 1e3, "self_ms": e["dur"] / 1e3}
        if open_ops:  # nested in the enclosing op (a call/while thunk): not that op's own time
            parent = open_ops[-1][2]
            parent["self_ms"] = max(0.0, parent["self_ms"] - row["total_ms"])
        open_ops.append((thread, e["ts"] + e["dur"], row))
        rows.append(row)
    return rows


# ------------------------------------------------------------------------------------------- staged stages
def _staged_calls(model: JaxHourglass, phase: str) -> list[tuple[str, Callable[[dict], dict]]]:
    """The step as (label, call) pairs for profiling.time_staged, one jax.jit per stage of the shared plan.

    Each call maps an environment {tensor key: array} to a new one (never mutated: every staged step starts
    from the same first input); "last" holds the call's own outputs, which the sync waits for.
    """
    plan = stage_plan(model.config, phase)
    network = [stage for stage in plan if stage.name != LOSS]
    whole = model.module()
    parts = {stage.name: nnx.split(getattr(whole, stage.name), nnx.Param, nnx.BatchStat) for stage in network}
    if phase == "forward":
        return [(stage.name, _forward_call(parts[stage.name], stage)) for stage in network]
    forward = [(stage.name, _vjp_forward_call(parts[stage.name], stage)) for stage in network]
    backward_jit = jax.jit(_stage_backward)  # one jit: its cache holds one entry per stage structure
    backward = [(stage.name, _backward_call(backward_jit, stage)) for stage in reversed(network)]
    return [*forward, (LOSS, _loss_call(plan[-1].inputs)), *backward]


def _apply_stage(part: tuple, inputs: tuple, train: bool) -> tuple[tuple, nnx.State]:
    """One stage module's outputs (always a tuple) and its BN statistics after the call."""
    out, stats = apply_module(*part, inputs, train)
    return (out if isinstance(out, tuple) else (out,)), stats


def _forward_call(part: tuple, stage: Stage) -> Callable[[dict], dict]:
    graphdef, params, stats = part
    run = jax.jit(lambda p, s, xs: _apply_stage((graphdef, p, s), xs, False)[0])  # eval-mode BN

    def call(env: dict) -> dict:
        out = run(params, stats, tuple(env[k] for k in stage.inputs))
        return {**env, **dict(zip(stage.outputs, out, strict=True)), "last": out}
    return call


def _vjp_forward_call(part: tuple, stage: Stage) -> Callable[[dict], dict]:
    graphdef, params, stats = part
    wants_input_grads = IMAGE not in stage.inputs  # the image needs no gradient (as in loss_and_grads)

    def forward(p, s, xs):  # train-mode BN; returns (outputs, VJP with residuals, new BN stats)
        def apply(p, *grad_xs):
            return _apply_stage((graphdef, p, s), grad_xs if wants_input_grads else xs, True)
        return jax.vjp(apply, p, *(xs if wants_input_grads else ()), has_aux=True)
    run = jax.jit(forward)  # jax.vjp's function is a pytree of residuals, so it can leave the jit

    def call(env: dict) -> dict:
        out, vjp_fn, new_stats = run(params, stats, tuple(env[k] for k in stage.inputs))
        return {**env, **dict(zip(stage.outputs, out, strict=True)), f"vjp:{stage.name}": vjp_fn,
                "last": (out, new_stats)}  # fmt: skip
    return call


def _loss_call(heatmaps: tuple[str, ...]) -> Callable[[dict], dict]:
    # value and gradient of the loss w.r.t. each stack's heatmaps (N, h, w, K): the cotangents backward starts from
    run = jax.jit(jax.value_and_grad(lambda hms, target: heatmap_loss(jnp.stack(hms), target)))

    def call(env: dict) -> dict:
        loss, cts = run(tuple(env[k] for k in heatmaps), env[_TARGET])
        return {**env, **{f"ct:{k}": ct for k, ct in zip(heatmaps, cts, strict=True)}, "last": (loss, cts)}
    return call


def _stage_backward(vjp_fn, out_cts: tuple, outs: tuple, in_cts: tuple) -> tuple[Any, tuple]:
    """Parameter gradients and input cotangents (added to those already there) of one stage's VJP."""
    # An output no later stage used (the last head's `previous`) has no cotangent: zeros
    out_cts = tuple(jnp.zeros_like(out) if ct is None else ct for ct, out in zip(out_cts, outs, strict=True))
    param_grads, *input_cts = vjp_fn(out_cts)
    return param_grads, tuple(ct if old is None else ct + old for ct, old in zip(input_cts, in_cts, strict=True))


def _backward_call(backward_jit: Callable, stage: Stage) -> Callable[[dict], dict]:
    inputs = () if IMAGE in stage.inputs else stage.inputs  # no cotangent for the image

    def call(env: dict) -> dict:
        out_cts = tuple(env.get(f"ct:{k}") for k in stage.outputs)  # None where no later stage used the output
        in_cts = tuple(env.get(f"ct:{k}") for k in inputs)  # None until a consumer's backward has run
        outs = tuple(env[k] for k in stage.outputs)
        param_grads, in_cts = backward_jit(env[f"vjp:{stage.name}"], out_cts, outs, in_cts)
        return {**env, **{f"ct:{k}": ct for k, ct in zip(inputs, in_cts, strict=True)}, "last": (param_grads, in_cts)}
    return call


# ------------------------------------------------------------------------------------------ FLOPs, compile
# A convolution in StableHLO text: kernel dimension labels ([0, 1, i, o]), then lhs, kernel and output types
_CONV = re.compile(r"stablehlo\.convolution.*?\]x\[([^\]]*)\]->"
                   r".*?: \(tensor<([^>]*)>, tensor<([^>]*)>\) -> tensor<([^>]*)>")
# A matrix product: the lhs contracting dimensions, then lhs and output types. The tuned variant writes its
# 1x1 convolutions as dot_general (and so do their gradients); the model has no other.
_DOT = re.compile(r"stablehlo\.dot_general.*?contracting_dims = \[([\d, ]*)\] x \[[\d, ]*\]"
                  r".*?: \(tensor<([^>]*)>, tensor<[^>]*>\) -> tensor<([^>]*)>")


def _stablehlo_conv_flops(text: str) -> tuple[int, int]:
    """(2 * multiply-adds, count) of every convolution the program runs, counted densely from its shapes.

    Per output element a convolution sums (kernel elements / output features) products, zero padding and
    dilation holes included, as impls.count_flops counts; a dot_general (a 1x1 convolution of the tuned
    variant, or its gradient) sums the product of its lhs contracting dimensions. Private functions count
    once per call.
    """
    functions = {re.match(r"\w+ @([\w.$-]+)", chunk).group(1): chunk for chunk in text.split("func.func ")[1:]}

    @functools.cache
    def count(name: str) -> tuple[int, int]:
        flops = convs = 0
        for kernel_labels, _, kernel_type, out_type in _CONV.findall(functions[name]):
            kernel_shape = [int(d) for d in kernel_type.split("x")[:-1]]  # the last part is the dtype
            out_shape = [int(d) for d in out_type.split("x")[:-1]]
            out_features = kernel_shape[[label.strip() for label in kernel_labels.split(",")].index("o")]
            flops += 2 * math.prod(out_shape) * (math.prod(kernel_shape) // out_features)
            convs += 1
        for contracting, lhs_type, out_type in _DOT.findall(functions[name]):
            lhs_shape = [int(d) for d in lhs_type.split("x")[:-1]]
            summed = math.prod(lhs_shape[int(axis)] for axis in contracting.split(","))
            flops += 2 * math.prod(int(d) for d in out_type.split("x")[:-1]) * summed
            convs += 1
        for callee in re.findall(r"call @([\w.$-]+)", functions[name]):
            callee_flops, callee_convs = count(callee)
            flops, convs = flops + callee_flops, convs + callee_convs
        return flops, convs

    return count("main")


def _program_facts(function: Callable, args: tuple, request: ProfileRequest, first_call_ms: float,
                   trace_compile_ms: float | None, recompilations: int) -> tuple[FlopCount, CompileInfo]:  # fmt: skip
    """The step program's FLOPs (XLA cost analysis, lowered convolutions) and its compile facts."""
    config, batch_size, phase = request.config, request.batch_size, request.phase
    lowered = function.lower(*args)  # after the first call: jit's caches hand back the same program
    compiled = lowered.compile()
    cost = compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, list) else cost  # a list of one dict in older jax
    total_flops = int(cost["flops"]) if cost and "flops" in cost else None
    conv_flops, conv_count = _stablehlo_conv_flops(lowered.as_text())
    analytic = spec.count_flops(config, batch_size, phase)
    flops = FlopCount(
        source="jax: lowered StableHLO convolutions (conv) and compiled.cost_analysis() (total)",
        conv_flops=conv_flops, total_flops=total_flops,
        note=f"conv_flops: 2 x multiply-adds of the {conv_count} stablehlo.convolution (and, for the tuned "
             f"variant's 1x1 convolutions, dot_general) ops of the lowered step "
             f"(model: {len(spec.convs(config))} convs; forward_backward adds a weight- and an input-gradient "
             f"conv per conv, no input gradient for the first), counted densely from their shapes "
             f"(output elements x kernel window x input features); analytic count {analytic} "
             f"(ratio {conv_flops / analytic:.4f}). total_flops: XLA's cost analysis of the optimised "
             f"program, which counts convolution taps only where they hit real input (zero padding "
             f"skipped: below the dense count on small maps), 1x1 convs XLA:CPU turned into dots as dots, "
             f"plus BN, ReLU, residual adds, pooling, upsampling, the loss and the BN statistics updates.",
    )  # fmt: skip
    code_bytes = getattr(compiled.memory_analysis(), "generated_code_size_in_bytes", 0) or 0
    size, unit = ((code_bytes, "bytes of generated code") if code_bytes
                  else (len(compiled.as_text()), "chars of optimized HLO"))
    compile_info = CompileInfo(
        first_call_ms=first_call_ms, trace_compile_ms=trace_compile_ms, recompilations_in_timed_loop=recompilations,
        program_size=size, program_size_unit=unit,
        note="first_call_ms: the first step (trace, lower, XLA compile, one run). trace_compile_ms: what "
             "jax.monitoring reports for that first call: jaxpr trace + MLIR lowering + XLA backend compile "
             "durations. recompilations: the step's jitted function's _cache_size() after warmup vs after "
             "the timed and profiled loops. program_size: the compiled program (.lower().compile(), served "
             "from jit's cache) as text, or its generated code where memory_analysis() reports a size.",
    )  # fmt: skip
    return flops, compile_info
