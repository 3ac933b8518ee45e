"""The one model configuration: a frozen dataclass and its named presets. Imports no framework."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Literal

BlockVariant = Literal["postact", "preact"]
StemPool = Literal["avg", "max"]
Padding = Literal["same", "symmetric"]

BLOCK_VARIANTS: tuple[str, ...] = ("postact", "preact")
STEM_POOLS: tuple[str, ...] = ("avg", "max")
PADDINGS: tuple[str, ...] = ("same", "symmetric")


class ConfigError(ValueError):
    """A configuration value is out of range; the message names the value and the fix."""


@dataclass(frozen=True)
class HourglassConfig:
    """Everything that fixes the computation of a Stacked Hourglass network.

    The stem's widths are derived from `channels` (channels/4 after the 7x7 conv, channels/2 after the
    first residual), which gives the seed's and the paper's 64 and 128 at 256 channels.
    """

    num_stacks: int = 4  # hourglass modules in sequence; every stack emits heatmaps (intermediate supervision)
    depth: int = 4  # number of 2x downsamplings inside one hourglass (recursion depth)
    channels: int = 256  # feature width inside the hourglasses and heads
    num_keypoints: int = 68  # heatmap channels K (68 face landmarks in the seed, 16 MPII joints in the paper)
    input_hw: tuple[int, int] = (256, 256)  # (height, width); heatmaps are (height/4, width/4)
    block: BlockVariant = "postact"  # "postact": seed's conv-BN-ReLU x3, ReLU after add; "preact": BN-ReLU-conv x3
    stem_pool: StemPool = "avg"  # 2x2 stride-2 pool in the stem: seed uses average, the paper max
    padding: Padding = "same"  # "same": TF SAME (7x7/2 pads 2 before, 3 after); "symmetric": Torch7 pad 3/3
    conv_bias: bool = False  # bias on convs that feed a BN (the seed drops it; Torch7 always has one)

    def __post_init__(self) -> None:
        validate(self)

    @property
    def heatmap_hw(self) -> tuple[int, int]:
        """Heatmap (height, width): the stem downsamples by 4 (stride-2 conv, then a 2x2 pool)."""
        return (self.input_hw[0] // 4, self.input_hw[1] // 4)

    @property
    def stem_channels(self) -> tuple[int, int]:
        """Widths after the stem conv and after the stem's first residual: (channels/4, channels/2)."""
        return (self.channels // 4, self.channels // 2)

    def replace(self, **changes: object) -> HourglassConfig:
        """A copy with some fields changed, validated again."""
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict[str, object]:
        """Plain dict for CSV/JSON records (input_hw as a list)."""
        d = dataclasses.asdict(self)
        d["input_hw"] = list(self.input_hw)
        return d


def _require_positive_int(name: str, value: object) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise ConfigError(f"{name} must be a positive integer, got {value!r}")


def validate(config: HourglassConfig) -> None:
    """Raise ConfigError naming the bad field, the value given and what would work."""
    for name in ("num_stacks", "depth", "channels", "num_keypoints"):
        _require_positive_int(name, getattr(config, name))
    if config.block not in BLOCK_VARIANTS:
        raise ConfigError(f"block must be one of {', '.join(BLOCK_VARIANTS)}, got {config.block!r}")
    if config.stem_pool not in STEM_POOLS:
        raise ConfigError(f"stem_pool must be one of {', '.join(STEM_POOLS)}, got {config.stem_pool!r}")
    if config.padding not in PADDINGS:
        raise ConfigError(f"padding must be one of {', '.join(PADDINGS)}, got {config.padding!r}")
    if not isinstance(config.conv_bias, bool):
        raise ConfigError(f"conv_bias must be True or False, got {config.conv_bias!r}")
    # Bottlenecks are channels/4 (postact) or channels/2 (preact) wide, and the stem runs at channels/4
    # before a channels/2 residual whose own bottleneck is channels/8: all must be whole.
    if config.channels % 8 != 0:
        raise ConfigError(f"channels must be a multiple of 8 (the stem's bottleneck is channels/8), got {config.channels}")
    hw = config.input_hw
    if not (isinstance(hw, tuple) and len(hw) == 2):
        raise ConfigError(f"input_hw must be a (height, width) tuple, got {hw!r}")
    for v in hw:
        _require_positive_int("input_hw", v)
    # The stem halves twice and every hourglass level halves again; the upsampling path must land on
    # the same size as the skip branch, so both sides must divide exactly.
    divisor = 4 * 2**config.depth
    if hw[0] % divisor or hw[1] % divisor:
        raise ConfigError(
            f"input size {hw[0]}x{hw[1]} is not divisible by 4 * 2^depth = {divisor} (depth {config.depth}); "
            f"use a height and width that are multiples of {divisor}, or a smaller depth"
        )


PRESETS: dict[str, HourglassConfig] = {
    # The seed's StackedHG2 (TF1): 4 stacks of depth-4 hourglasses, 68 face landmarks, post-activation
    # residuals, average pool in the stem, TF SAME padding, no bias before BN.
    "seed": HourglassConfig(),
    # Newell, Yang, Deng 2016 (the authors' Torch7 code): 8 stacks, 16 MPII joints, pre-activation
    # residuals, max pool in the stem, every conv with a bias, symmetric padding.
    "newell": HourglassConfig(
        num_stacks=8, num_keypoints=16, block="preact", stem_pool="max", padding="symmetric", conv_bias=True
    ),
    # Small enough for CPU tests: runs a forward-backward in milliseconds in every framework.
    "tiny": HourglassConfig(num_stacks=2, depth=2, channels=16, num_keypoints=5, input_hw=(32, 32)),
}


def get_preset(name: str) -> HourglassConfig:
    """The preset called `name`, or ConfigError listing the known ones."""
    try:
        return PRESETS[name]
    except KeyError:
        raise ConfigError(f"unknown preset {name!r}; choose one of: {', '.join(PRESETS)}") from None
