"""The network's stages and the data flow between them, written once for every framework. Imports no framework.

A stage is one top-level attribute of StackedHourglass (stem, hourglass_i, head_i, merge_i) and, in a
training step, the loss. Every implementation opens a profiler scope per stage under these names, and
every staged profile (one compiled call per stage, see impls.profiling.time_staged) wires its calls from
`stage_plan`, so the three frameworks agree on which stage reads and writes which tensor.

Tensor keys, the one scheme every framework uses (h, w = H/4, W/4; C channels; K keypoints):

    image           the network input, (N, H, W, 3)
    x_i             stack i's input, (N, h, w, C): the stem's output for i = 0, merge_{i-1}'s after
    y_i             hourglass_i's output, (N, h, w, C)
    previous_i      head_i's features fed back by merge_i, (N, h, w, C)
    heatmaps_i      head_i's heatmaps, (N, h, w, K)
    loss            the scalar loss (forward_backward only); the target is a constant, not a stage input
"""

from __future__ import annotations

from dataclasses import dataclass

from impls.config import HourglassConfig
from impls.spec import convs

IMAGE = "image"
LOSS = "loss"
EXTRA_STAGES: tuple[str, ...] = (LOSS,)  # allowed besides the network's stages (forward_backward)


@dataclass(frozen=True)
class Stage:
    """One stage: its name (module attribute and profiler scope) and the tensor keys it reads and writes."""

    name: str
    inputs: tuple[str, ...]  # in the order the stage's module takes them
    outputs: tuple[str, ...]  # in the order the stage's module returns them


def stage_plan(config: HourglassConfig, phase: str = "forward") -> tuple[Stage, ...]:
    """The stages in execution order with their inputs and outputs, as StackedHourglass's forward runs them.

    For phase "forward_backward" a final "loss" stage reads every stack's heatmaps.
    """
    plan = [Stage("stem", (IMAGE,), ("x_0",))]
    last = config.num_stacks - 1
    for i in range(config.num_stacks):
        plan.append(Stage(f"hourglass_{i}", (f"x_{i}",), (f"y_{i}",)))
        plan.append(Stage(f"head_{i}", (f"y_{i}",), (f"previous_{i}", f"heatmaps_{i}")))
        if i < last:
            plan.append(Stage(f"merge_{i}", (f"x_{i}", f"previous_{i}", f"heatmaps_{i}"), (f"x_{i + 1}",)))
    if phase == "forward_backward":
        plan.append(Stage(LOSS, tuple(f"heatmaps_{i}" for i in range(config.num_stacks)), (LOSS,)))
    return tuple(plan)


def stage_names(config: HourglassConfig) -> list[str]:
    """The network's stages in execution order: stem, then per stack hourglass_i, head_i, merge_i (i < S-1).

    These are the top-level attribute names of StackedHourglass in every implementation and the first
    component of every canonical parameter name, so a stage's parameters are those named "<stage>.*".
    """
    return [stage.name for stage in stage_plan(config)]


def stage_of(name: str) -> str:
    """The stage a canonical parameter or scoped op name belongs to: "hourglass_1.up1.conv1" -> "hourglass_1"."""
    return name.split(".", 1)[0].split("/", 1)[0]


def stage_conv_flops(config: HourglassConfig, batch_size: int, phase: str) -> dict[str, int]:
    """Analytic convolution FLOPs per stage (2 per multiply-add), counted as impls.count_flops counts."""
    flops = dict.fromkeys(stage_names(config), 0)
    for index, conv in enumerate(convs(config)):
        macs = conv.macs_per_image
        if phase == "forward_backward":
            macs = 3 * macs - (macs if index == 0 else 0)  # no input gradient for the first conv
        flops[stage_of(conv.name)] += 2 * macs * batch_size
    return flops
