"""The conv ceiling: which 3x3 convolution dominates the model, and what it costs in FLOPs.

Each framework times that one conv through its impls module's `conv_benchmark` (see worker.py); the
fastest framework's GFLOP/s at a batch size and precision is this machine's ceiling, and every model
cell's achieved GFLOP/s is reported as a share of it.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass

from impls.config import HourglassConfig
from impls.spec import convs


@dataclass(frozen=True)
class ConvShape:
    """A stride-1 SAME convolution of an (N, H, W, c_in) input to c_out channels."""

    height: int
    width: int
    c_in: int
    c_out: int
    kernel_size: int = 3

    def flops(self, batch_size: int) -> int:
        """2 FLOPs per multiply-add, as impls.count_flops counts."""
        return 2 * batch_size * self.height * self.width * self.kernel_size**2 * self.c_in * self.c_out

    def to_dict(self) -> dict[str, int]:
        """Plain dict for JSON."""
        return {
            "height": self.height,
            "width": self.width,
            "c_in": self.c_in,
            "c_out": self.c_out,
            "kernel_size": self.kernel_size,
        }


def dominant_conv3x3(config: HourglassConfig) -> ConvShape:
    """The 3x3 conv shape carrying the most FLOPs summed over all its occurrences in the network.

    For the seed preset this is the postact bottleneck at the hourglass's top resolution:
    (H/4, W/4, c/4 -> c/4), i.e. 64x64, 64 -> 64.
    """
    totals: dict[ConvShape, int] = defaultdict(int)
    for conv in convs(config):
        if conv.kernel_size == 3 and conv.stride == 1:
            shape = ConvShape(conv.in_hw[0], conv.in_hw[1], conv.c_in, conv.c_out)
            totals[shape] += conv.macs_per_image
    if not totals:
        raise ValueError("the config has no stride-1 3x3 convolution to calibrate against")
    return max(totals, key=lambda shape: (totals[shape], shape.height * shape.width))
