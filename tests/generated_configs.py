"""Network configurations drawn over the space HourglassConfig allows, with a batch, a BN mode and a seed.

One hypothesis strategy, shared by the float64 proof (tests/test_fp64_proof.py) and the fp32-vs-fp64
measurement (tests/fp32_vs_fp64.py), so the measured distribution is the distribution of the tests.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from hypothesis import strategies as st

import impls
from impls import HourglassConfig
from impls.config import BLOCK_VARIANTS, PADDINGS, STEM_POOLS

MAX_STACKS = 4
MAX_DEPTH = 4
MAX_CHANNELS = 32  # multiples of 8 up to this; wider only costs time (the seams do not depend on width)
MAX_KEYPOINTS = 20
MAX_BATCH = 4
MAX_SIDE_MULTIPLE = 2  # height and width are 1 or 2 times 4 * 2^depth, so both square and non-square inputs


@dataclass(frozen=True)
class Case:
    """One generated example: the network, a batch size, eval- or train-mode BN, and the seed of the
    canonical weights (impls.init_weights) and of the inputs."""

    config: HourglassConfig
    batch_size: int
    train_mode: bool
    seed: int

    def weights(self) -> dict[str, np.ndarray]:
        """The canonical weights of this case (float32 values, exact in float64)."""
        return impls.init_weights(self.config, seed=self.seed)

    def inputs(self, redraw: int = 0) -> tuple[np.ndarray, np.ndarray]:
        """(x, target), standard normal float64: x (N, H, W, 3), target (N, H/4, W/4, K); `redraw` picks another draw."""
        rng = np.random.default_rng((self.seed, redraw))
        x = rng.standard_normal((self.batch_size, *self.config.input_hw, 3))
        target = rng.standard_normal((self.batch_size, *self.config.heatmap_hw, self.config.num_keypoints))
        return x, target

    def __repr__(self) -> str:
        """The case as Python that rebuilds it (hypothesis prints it for a failing example)."""
        c = self.config
        return (
            f"Case(HourglassConfig(num_stacks={c.num_stacks}, depth={c.depth}, channels={c.channels}, "
            f"num_keypoints={c.num_keypoints}, input_hw={c.input_hw}, block={c.block!r}, stem_pool={c.stem_pool!r}, "
            f"padding={c.padding!r}, conv_bias={c.conv_bias}), batch_size={self.batch_size}, "
            f"train_mode={self.train_mode}, seed={self.seed})"
        )


@st.composite
def cases(draw: st.DrawFn, train_mode: bool | None = None) -> Case:
    """A Case over the whole config space (sizes capped as above); `train_mode` fixes the BN mode when given."""
    depth = draw(st.integers(1, MAX_DEPTH))
    divisor = 4 * 2**depth  # the stem halves twice, every hourglass level once more
    config = HourglassConfig(
        num_stacks=draw(st.integers(1, MAX_STACKS)),
        depth=depth,
        channels=8 * draw(st.integers(1, MAX_CHANNELS // 8)),
        num_keypoints=draw(st.integers(1, MAX_KEYPOINTS)),
        input_hw=(divisor * draw(st.integers(1, MAX_SIDE_MULTIPLE)), divisor * draw(st.integers(1, MAX_SIDE_MULTIPLE))),
        block=draw(st.sampled_from(BLOCK_VARIANTS)),
        stem_pool=draw(st.sampled_from(STEM_POOLS)),
        padding=draw(st.sampled_from(PADDINGS)),
        conv_bias=draw(st.booleans()),
    )
    return Case(
        config=config,
        batch_size=draw(st.integers(1, MAX_BATCH)),
        train_mode=draw(st.booleans()) if train_mode is None else train_mode,
        seed=draw(st.integers(0, 2**31 - 1)),
    )
