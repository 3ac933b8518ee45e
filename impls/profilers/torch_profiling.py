"""profile() for PyTorch: torch.profiler op tables and stage ranges, staged compiled stages, FLOPs, compile stats.

The contract and the result type are in impls/profiling.py; impls.torch_hourglass.profile checks the
arguments and calls `run` here. Eager steps are attributed to stages by their record_function ranges
(backward nodes matched to the forward op that recorded them by autograd sequence numbers); under
torch.compile the ranges do not bound inductor's fused kernels, so the stages are compiled and timed one by
one along impls.stages.stage_plan.
"""

from __future__ import annotations

import contextlib
from collections import Counter
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch

from impls import profiling
from impls.profiling import CompileInfo, FlopCount, ProfileRequest, ProfileResult, StageTiming
from impls.stages import IMAGE, LOSS, stage_plan
from impls.torch_hourglass import FRAMEWORK, TorchHourglass, build, heatmap_loss, stage_scopes

_TRACE_JSON = "torch_trace.json"  # Chrome trace: opens in https://ui.perfetto.dev
_BACKWARD_PREFIX = "autograd::engine::evaluate_function: "
_CompileCounts = tuple[int, float, list[Any]]  # (dynamo graphs, dynamo compile seconds, inductor modules)


def run(request: ProfileRequest) -> ProfileResult:
    """Time, profile and stage-attribute one phase's step (arguments already checked by profile())."""
    model = build(request.config, device=request.device, precision=request.precision, execution=request.execution,
                  impl=request.impl)
    step = model.benchmark_step(request.phase, request.batch_size, request.seed)
    compiled = request.execution == "compile"

    before = _compile_counts() if compiled else None
    first_call_ms = profiling.time_call_ms(step)
    after_first = _compile_counts() if compiled else None
    for _ in range(request.warmup):
        step()
    step_ms = profiling.median_step_ms(step, request.steps)
    profiled_ms, events = _profiled_steps(model, step, request.steps, request.trace_dir / _TRACE_JSON)
    after_loops = _compile_counts() if compiled else None

    median_index = profiling.lower_median_index(profiled_ms)
    op_step_ms = profiled_ms[median_index]
    cuda = model.torch_device.type == "cuda"
    names = [stage.name for stage in stage_plan(request.config, request.phase)]
    if compiled:
        stages = _staged_timing(model, request)
    else:
        stage_ms = _profiler_stages(events, names, median_index, cuda)
        note = _profiler_note(request.phase, op_step_ms - sum(stage_ms.values()), cuda)
        stages = StageTiming("profiler", op_step_ms, note, stage_ms)
    return profiling.profile_result(
        FRAMEWORK, request, step_ms=step_ms, stages=stages, op_events=_op_events(events, set(names), cuda),
        op_step_ms=op_step_ms, trace_files=[_TRACE_JSON], flops=_flop_count(model, request),
        compile_info=_compile_info(model, before, after_first, after_loops, first_call_ms),
    )  # fmt: skip


# ---------------------------------------------------------------------------------------- the profiled steps
def _profiled_steps(model: TorchHourglass, step: Callable[[], None], steps: int,
                    trace_path: Path) -> tuple[list[float], Any]:  # fmt: skip
    """Run `steps` steps under torch.profiler; (their wall times in ms, the profiler's FunctionEvents)."""
    activities = [torch.profiler.ProfilerActivity.CPU]
    if model.torch_device.type == "cuda":
        activities.append(torch.profiler.ProfilerActivity.CUDA)
    # Scopes only in eager: in a compiled region they would not bound inductor's fused kernels, and dynamo
    # guards on the flag, so turning it on would recompile the model.
    scopes = stage_scopes() if model.execution == "eager" else contextlib.nullcontext()
    with scopes, torch.profiler.profile(activities=activities, record_shapes=False) as prof:
        wall_ms = [profiling.time_call_ms(step) for _ in range(steps)]
    trace_path.parent.mkdir(parents=True, exist_ok=True)
    prof.export_chrome_trace(str(trace_path))
    return wall_ms, prof.events()


def _event_ms(event: Any, cuda: bool) -> tuple[float, float]:
    """(total, self) ms of a CPU-side event: its CUDA kernels' time on gpu, its CPU time otherwise."""
    if cuda:
        total_us, self_us = event.device_time_total, event.self_device_time_total
    else:
        total_us, self_us = event.cpu_time_total, event.self_cpu_time_total
    # Clock rounding can make a child outlast its parent by a microsecond, giving a parent negative self time.
    return total_us / 1e3, min(max(self_us, 0.0), total_us) / 1e3


def _descendants(event: Any) -> Iterator[Any]:
    for child in event.cpu_children:
        yield child
        yield from _descendants(child)


def _profiler_stages(events: Any, names: list[str], step_index: int, cuda: bool) -> dict[str, float]:
    """Stage ms in profiled step `step_index`: each stage's scope range plus, for forward_backward, the
    backward nodes created by the forward ops inside it (a node's evaluate_function event carries the
    sequence number of the forward op that recorded it)."""
    from torch.autograd import DeviceType

    stage_ms = dict.fromkeys(names, 0.0)
    stage_of_seq: dict[int, str] = {}
    ranges = sorted((e for e in events if e.name in stage_ms and e.device_type == DeviceType.CPU), key=lambda e: e.time_range.start)
    seen: Counter[str] = Counter()
    for scope in ranges:  # each scope opens once per step, so a name's k-th range belongs to step k
        seen[scope.name] += 1
        if seen[scope.name] - 1 == step_index:
            stage_ms[scope.name] += _event_ms(scope, cuda)[0]
            stage_of_seq.update((op.sequence_nr, scope.name) for op in _descendants(scope) if op.sequence_nr >= 0)
    for event in events:
        if event.name.startswith(_BACKWARD_PREFIX) and event.sequence_nr in stage_of_seq:
            stage_ms[stage_of_seq[event.sequence_nr]] += _event_ms(event, cuda)[0]
    return {name: ms for name, ms in stage_ms.items() if ms > 0}


def _op_events(events: Any, skip: set[str], cuda: bool) -> Iterator[dict[str, Any]]:
    """One {"op", "total_ms", "self_ms"} per CPU-side aten/runtime op call, stage scopes left out."""
    from torch.autograd import DeviceType

    for event in events:
        if event.device_type == DeviceType.CPU and event.name not in skip:
            total_ms, self_ms = _event_ms(event, cuda)
            yield {"op": event.name, "total_ms": total_ms, "self_ms": self_ms}


def _profiler_note(phase: str, unattributed_ms: float, cuda: bool) -> str:
    train = phase == "forward_backward"
    backward = (", plus the backward nodes its forward ops created, matched through autograd sequence numbers; "
                "'loss' = the loss range and its backward" if train else "")
    return (
        f"torch.profiler: each stage's record_function range ({'CUDA kernel time' if cuda else 'CPU time'}) in the "
        f"median profiled step{backward}; {unattributed_ms:.3f} ms of that step's wall time is in no stage (python, "
        f"stacking the outputs{', zero_grad, AccumulateGrad' if train else ''}, profiler overhead"
        f"{', GPU idle time' if cuda else ''})"
    )


# ------------------------------------------------------------------------------------------- staged stages
def _staged_timing(model: TorchHourglass, request: ProfileRequest) -> StageTiming:
    """profiling.time_staged over one torch.compile'd call per stage, on the step's own inputs."""
    model.set_mode(request.train)  # train-mode BN for forward_backward, as benchmark_step
    x, target = model.step_inputs(request.batch_size, request.seed)  # (N, 3, H, W), (N, K, h, w)
    calls = _staged_calls(model, request.phase, target)
    # At least one untimed staged step: it compiles every stage.
    stage_ms, staged_ms = profiling.time_staged(calls, x, lambda _: model.sync(), warmup=max(request.warmup, 1),
                                                steps=request.steps)  # fmt: skip
    return StageTiming("staged", staged_ms, _staged_note(request.phase), stage_ms)


def _staged_calls(model: TorchHourglass, phase: str, target: torch.Tensor) -> list[tuple[str, Callable[[Any], Any]]]:
    """The step as one torch.compile'd call per stage (then, for forward_backward, the loss and each stage's
    backward in reverse), for profiling.time_staged; the state is a dict of the plan's named tensors."""
    train = phase == "forward_backward"
    plan = stage_plan(model.config, phase)
    network = [stage for stage in plan if stage.name != LOSS]
    net = model.net if train else model.eval_module()  # the tuned variant's forward has its batch norms folded
    compiled = {stage.name: torch.compile(getattr(net, stage.name)) for stage in network}

    def forward(name: str, inputs: tuple[str, ...], outputs: tuple[str, ...]) -> Callable[[Any], Any]:
        def call(state: Any) -> dict[str, torch.Tensor]:
            state = state if isinstance(state, dict) else {IMAGE: state}  # the first stage starts a step
            with torch.enable_grad() if train else torch.inference_mode():
                result = compiled[name](*(state[key] for key in inputs))
            for key, out in zip(outputs, result if isinstance(result, tuple) else (result,), strict=True):
                # Detached leaves end this stage's autograd graph, so its backward can run as its own call;
                # a leaf read by two stages (x_i, heatmaps_i) sums both gradients in .grad.
                state["graph:" + key] = out
                state[key] = out.detach().requires_grad_() if train else out
            return state
        return call

    def loss(inputs: tuple[str, ...]) -> Callable[[Any], Any]:
        def call(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
            model.net.zero_grad(set_to_none=True)  # as the train step does, before this step's backward writes .grad
            heatmap_loss(torch.stack([state[key] for key in inputs]), target).backward()  # stack: (S, N, K, h, w)
            return state
        return call

    def backward(outputs: tuple[str, ...]) -> Callable[[Any], Any]:
        def call(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
            used = [key for key in outputs if state[key].grad is not None]  # the last head's `previous` is unused
            torch.autograd.backward([state["graph:" + key] for key in used], [state[key].grad for key in used])
            return state
        return call

    calls = [(stage.name, forward(stage.name, stage.inputs, stage.outputs)) for stage in network]
    if train:
        calls.append((LOSS, loss(plan[-1].inputs)))
        calls += [(stage.name, backward(stage.outputs)) for stage in reversed(network)]
    return calls


def _staged_note(phase: str) -> str:
    backward = (" (forward stages on detached inputs, the loss, then each stage's backward in reverse, summed with "
                "its forward)" if phase == "forward_backward" else "")
    return (
        "torch.compile fuses within and around stages and record_function ranges inside a compiled region do not "
        "bound inductor's kernels, so each stage module was torch.compile'd on its own and the stages run as one "
        f"call each with a device sync after every call{backward}; stage_step_ms differs from step_ms by what one "
        "whole-model graph saves over per-stage graphs"
    )


# ------------------------------------------------------------------------------------------ FLOPs, compile
def _flop_count(model: TorchHourglass, request: ProfileRequest) -> FlopCount:
    """FlopCounterMode over one eager step of the model's module (the step's aten ops, before any fusion)."""
    from torch.utils.flop_counter import FlopCounterMode

    phase = request.phase
    x, target = model.step_inputs(request.batch_size, request.seed)  # (N, 3, H, W), (N, K, h, w)
    model.set_mode(request.train)
    with FlopCounterMode(display=False) as counter:
        if phase == "forward":
            with torch.inference_mode():
                model.eval_module()(x)  # the tuned variant's forward has its batch norms folded
        else:
            model.net.zero_grad(set_to_none=True)
            heatmap_loss(model.net(x), target).backward()
    per_op = {str(op): int(flops) for op, flops in counter.get_flop_counts()["Global"].items()}
    conv = {op: flops for op, flops in per_op.items() if "conv" in op}
    other = sorted(op for op in per_op if op not in conv)
    return FlopCount(
        source="torch.utils.flop_counter.FlopCounterMode",
        conv_flops=sum(conv.values()),
        total_flops=sum(per_op.values()),
        note=(
            f"one eager {phase} step of the same module under FlopCounterMode (it counts aten ops; inductor's "
            f"fused kernels are not aten ops); conv_flops = {' + '.join(sorted(conv)) or 'none'}, 2 FLOPs per "
            "multiply-add; convolution_backward counts only the gradients it computes (output_mask), so the "
            "first conv's input gradient, which the input does not require, is not counted. total_flops = every "
            f"op FlopCounterMode has a formula for: besides convolutions {', '.join(other) or 'none'}; it has "
            "no formula for BN, ReLU, adds, pooling, upsampling or the loss, which are left out"
        ),
    )


def _compile_counts() -> _CompileCounts:
    """(dynamo graphs so far, dynamo compile seconds so far, inductor-generated modules loaded) in this process."""
    from torch._dynamo.utils import compilation_time_metrics, counters
    from torch._inductor.codecache import PyCodeCache

    # Dynamo's whole compile of a frame, plus AOTAutograd's lazy backward compile (first backward call).
    timers = ("_compile.compile_inner", "backward._backward_impl")
    compile_s = sum(sum(compilation_time_metrics.get(timer, [])) for timer in timers)
    return counters["stats"]["unique_graphs"], compile_s, list(getattr(PyCodeCache, "modules", []))


def _compile_info(model: TorchHourglass, before: _CompileCounts | None, after_first: _CompileCounts | None,
                  after_loops: _CompileCounts | None, first_call_ms: float) -> CompileInfo:  # fmt: skip
    """The `compile` entry: dynamo's compile time and graphs, and recompilations during the timed loops."""
    if before is None or after_first is None or after_loops is None:  # eager: nothing was counted
        return CompileInfo(first_call_ms, None, None, None, "",
                           "eager: nothing is compiled; the first call pays allocator warm-up and oneDNN/cuDNN setup")  # fmt: skip
    graphs = after_first[0] - before[0]
    new_modules = after_first[2][len(before[2]):]
    code_chars = sum(len(Path(module.__file__).read_text()) for module in new_modules) if new_modules else None
    return CompileInfo(
        first_call_ms=first_call_ms,
        trace_compile_ms=(after_first[1] - before[1]) * 1e3,
        recompilations_in_timed_loop=after_loops[0] - after_first[0],
        program_size=code_chars,
        program_size_unit="chars" if code_chars else "",
        note=(
            f"torch.compile (inductor): the first call captured {graphs} dynamo graph(s) and loaded "
            f"{len(new_modules)} inductor-generated module(s) (forward_backward: a forward and a backward one)"
            + ("; nothing was compiled because this process had already compiled an identically shaped model "
               "(dynamo caches per code object, with parameters as inputs)" if graphs == 0 else "")
            + "; trace_compile_ms = dynamo's _compile.compile_inner time (tracing, AOTAutograd, inductor codegen, "
            "FX-graph-cache lookups) plus the lazy backward compile (backward._backward_impl) in the first call; "
            "recompilations = change of torch._dynamo counters['stats']['unique_graphs'] across the timed and "
            "profiled loops; program_size = characters of the inductor-generated Python modules loaded in the first call"
        ),
    )
