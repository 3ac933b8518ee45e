"""Calibration workloads: the machine's achievable throughput on the model's own shapes, and a fixed
reference workload for comparing runs across machines.

Each framework times, in its worker (see worker.py), through its impls module's probes:
- "conv3x3": the 3x3 convolution shape carrying most of the model's FLOPs (`conv_benchmark`);
- "gemm": the 1x1 convolution shape carrying most of the 1x1 FLOPs, as the GEMM it is (`gemm_benchmark`):
  (N*H*W, c_in) @ (c_in, c_out);
- "reference_conv": one fixed conv, the same whatever the config (64x64 input, 64 -> 64 channels, batch 1,
  about 0.6 GFLOP, a few ms on a CPU core): `bench compare --normalize` divides by it, so a tiny model's
  microsecond-scale calibration conv never has to carry the normalisation.
A framework's ceiling at a batch size and precision is the faster of its conv3x3 and gemm GFLOP/s; the
machine's ceiling is the fastest framework's. Every model cell's achieved GFLOP/s is given as a share of both.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass
from typing import Any

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


@dataclass(frozen=True)
class GemmShape:
    """A 1x1 convolution of an (N, H, W, c_in) input as a GEMM: (N*H*W, k) @ (k, n)."""

    m_per_image: int  # H*W rows per image
    k: int
    n: int

    def flops(self, batch_size: int) -> int:
        """2 FLOPs per multiply-add."""
        return 2 * batch_size * self.m_per_image * self.k * self.n

    def to_dict(self) -> dict[str, int]:
        """Plain dict for JSON."""
        return {"m_per_image": self.m_per_image, "k": self.k, "n": self.n}


# Fixed whatever the config, so two runs of different presets or machines share one yardstick.
REFERENCE_CONV = ConvShape(height=64, width=64, c_in=64, c_out=64)
REFERENCE_BATCH_SIZE = 1


def dominant_gemm(config: HourglassConfig) -> GemmShape:
    """The 1x1 conv shape carrying the most FLOPs over the network, as a GEMM (seed: 64x64 rows, 256 -> 128)."""
    totals: dict[GemmShape, int] = defaultdict(int)
    for conv in convs(config):
        if conv.kernel_size == 1 and conv.stride == 1:
            shape = GemmShape(conv.in_hw[0] * conv.in_hw[1], conv.c_in, conv.c_out)
            totals[shape] += conv.macs_per_image
    if not totals:
        raise ValueError("the config has no 1x1 convolution to calibrate a GEMM against")
    return max(totals, key=lambda shape: (totals[shape], shape.m_per_image))


def calibration_workloads(
    config: HourglassConfig, batch_sizes: tuple[int, ...], precisions: tuple[str, ...]
) -> list[dict[str, Any]]:
    """Every workload a framework's calibration worker times, with its FLOPs per call."""
    conv, gemm = dominant_conv3x3(config), dominant_gemm(config)
    workloads = []
    for precision in precisions:
        for batch in batch_sizes:
            workloads.append({"kind": "conv3x3", "shape": conv.to_dict(), "batch_size": batch,
                              "precision": precision, "flops": conv.flops(batch)})  # fmt: skip
            workloads.append({"kind": "gemm", "shape": gemm.to_dict(), "batch_size": batch,
                              "precision": precision, "flops": gemm.flops(batch)})  # fmt: skip
        workloads.append({"kind": "reference_conv", "shape": REFERENCE_CONV.to_dict(), "batch_size": REFERENCE_BATCH_SIZE,
                          "precision": precision, "flops": REFERENCE_CONV.flops(REFERENCE_BATCH_SIZE)})  # fmt: skip
    return workloads


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
