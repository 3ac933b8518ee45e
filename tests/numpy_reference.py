"""A slow, plain-numpy forward pass of the canonical network: the oracle the frameworks are checked against.

Written from the architecture description, in float64, independently of any framework. Only the
forward pass (eval-mode or train-mode BN). It also runs in complex128, which gives the gradient oracle:
`directional_derivative` evaluates the loss at weights + i*h*direction, and Im(loss)/h is the derivative
along the direction to float64 rounding (the complex step; no difference of two nearby values, so no
cancellation, and ReLU and max pooling take the branch of the real part, as the frameworks' gradients do).
"""

from __future__ import annotations

import numpy as np

from impls.config import HourglassConfig
from impls.spec import BN_EPSILON, conv_padding

COMPLEX_STEP = 1e-30  # imaginary step: its square (1e-60) vanishes beside any real value, and 1e-30 does not underflow


class NumpyHourglass:
    """Forward pass over canonical weights; activations NHWC float64 (complex128 when weights or input are complex)."""

    def __init__(self, config: HourglassConfig, weights: dict[str, np.ndarray], train_mode: bool = False) -> None:
        self.config = config
        self.w = {k: v.astype(np.complex128 if np.iscomplexobj(v) else np.float64) for k, v in weights.items()}
        self.train_mode = train_mode
        self.complex = any(np.iscomplexobj(v) for v in weights.values())
        # Distance to the nearest kink seen in the last forward pass, relative to each tensor's spread:
        # the smallest |ReLU input| and the smallest gap between a max-pool window's two largest values.
        # fp32 rounding moves values by ~1e-6 of that spread, so a smaller margin means the frameworks may
        # take different sides of a kink and get legitimately different gradients. Exact zeros are left
        # out: they come from sums of ReLU zeros (or ties between them), are exact in every framework, and
        # pass no gradient whichever side is taken.
        self.kink_margin = np.inf
        # Max-pool windows whose two largest values are exactly equal and non-zero (a constant reaching a
        # pool, e.g. a BN's bias where a whole bottleneck channel is off). Harmless: torch, TensorFlow and JAX
        # all send such a window's gradient to its first maximum in row-major order, as this reference does.
        self.ties = 0

    def _relu(self, x: np.ndarray) -> np.ndarray:
        real = x.real  # the value itself for float64; a complex step's branch is chosen by its real part
        self.kink_margin = min(self.kink_margin, _smallest_nonzero(np.abs(real)) / (np.std(real) + 1e-30))
        return np.where(real > 0, x, 0.0)

    def _max_pool(self, x: np.ndarray) -> np.ndarray:
        n, h, w, c = x.shape
        windows = x.reshape(n, h // 2, 2, w // 2, 2, c).transpose(0, 1, 3, 5, 2, 4).reshape(-1, 4)  # row-major windows
        rows = np.arange(len(windows))
        first = np.argmax(windows.real, axis=1)  # the first of equal maxima, where every framework sends the gradient
        best = windows[rows, first]
        others = windows.real.copy()
        others[rows, first] = -np.inf
        gaps = best.real - others.max(axis=1)
        self.ties += int(np.count_nonzero((gaps == 0) & (best.real != 0)))
        self.kink_margin = min(self.kink_margin, _smallest_nonzero(gaps) / (np.std(x.real) + 1e-30))
        return best.reshape(n, h // 2, w // 2, c)

    def conv(self, name: str, x: np.ndarray, stride: int = 1) -> np.ndarray:
        kernel = self.w[f"{name}.kernel"]  # (k, k, c_in, c_out)
        k = kernel.shape[0]
        pad = conv_padding(self.config, x.shape[1:3], k, stride)
        x = np.pad(x, ((0, 0), pad[0], pad[1], (0, 0)))
        windows = np.lib.stride_tricks.sliding_window_view(x, (k, k), axis=(1, 2))[:, ::stride, ::stride]
        # windows: (N, H_out, W_out, C_in, k, k)
        y = np.einsum("nhwcij,ijco->nhwo", windows, kernel, optimize=True)
        bias = self.w.get(f"{name}.bias")
        return y + bias if bias is not None else y

    def bn(self, name: str, x: np.ndarray) -> np.ndarray:
        if self.train_mode:
            # Biased two-pass variance, as every framework; written out (not x.var, which takes |x - mean|^2)
            # so that it stays analytic for the complex step.
            mean = x.mean(axis=(0, 1, 2))
            var = ((x - mean) ** 2).mean(axis=(0, 1, 2))
        else:
            mean, var = self.w[f"{name}.mean"], self.w[f"{name}.var"]
        return (x - mean) / np.sqrt(var + BN_EPSILON) * self.w[f"{name}.scale"] + self.w[f"{name}.bias"]

    def residual(self, name: str, x: np.ndarray) -> np.ndarray:
        relu = self._relu
        has_skip = f"{name}.skip_conv.kernel" in self.w
        if self.config.block == "postact":
            y = relu(self.bn(f"{name}.bn1", self.conv(f"{name}.conv1", x)))
            y = relu(self.bn(f"{name}.bn2", self.conv(f"{name}.conv2", y)))
            y = relu(self.bn(f"{name}.bn3", self.conv(f"{name}.conv3", y)))
            skip = relu(self.bn(f"{name}.skip_bn", self.conv(f"{name}.skip_conv", x))) if has_skip else x
            return relu(y + skip)
        y = self.conv(f"{name}.conv1", relu(self.bn(f"{name}.bn1", x)))
        y = self.conv(f"{name}.conv2", relu(self.bn(f"{name}.bn2", y)))
        y = self.conv(f"{name}.conv3", relu(self.bn(f"{name}.bn3", y)))
        skip = self.conv(f"{name}.skip_conv", x) if has_skip else x
        return y + skip

    def hourglass(self, name: str, x: np.ndarray, depth: int) -> np.ndarray:
        up1 = self.residual(f"{name}.up1", x)
        low1 = self.residual(f"{name}.low1", self._max_pool(x))
        low2 = self.hourglass(f"{name}.low2", low1, depth - 1) if depth > 1 else self.residual(f"{name}.low2", low1)
        low3 = self.residual(f"{name}.low3", low2)
        return up1 + low3.repeat(2, axis=1).repeat(2, axis=2)

    def __call__(self, x: np.ndarray) -> np.ndarray:
        cfg = self.config
        x = x.astype(np.complex128 if np.iscomplexobj(x) or self.complex else np.float64)
        self.kink_margin, self.ties = np.inf, 0
        x = self._relu(self.bn("stem.bn", self.conv("stem.conv", x, stride=2)))
        x = self.residual("stem.res1", x)
        x = _avg_pool(x) if cfg.stem_pool == "avg" else self._max_pool(x)
        x = self.residual("stem.res2", x)
        x = self.residual("stem.res3", x)
        outputs = []
        for i in range(cfg.num_stacks):
            y = self.hourglass(f"hourglass_{i}", x, cfg.depth)
            y = self.residual(f"head_{i}.res", y)
            previous = self._relu(self.bn(f"head_{i}.lin_bn", self.conv(f"head_{i}.lin_conv", y)))
            heatmaps = self.conv(f"head_{i}.heatmap_conv", previous)
            outputs.append(heatmaps)
            if i < cfg.num_stacks - 1:
                x = x + self.conv(f"merge_{i}.feature_conv", previous) + self.conv(f"merge_{i}.heatmap_conv", heatmaps)
        return np.stack(outputs)  # (stacks, N, H/4, W/4, K)


def _pool_windows(x: np.ndarray) -> np.ndarray:
    n, h, w, c = x.shape
    return x.reshape(n, h // 2, 2, w // 2, 2, c)


def _avg_pool(x: np.ndarray) -> np.ndarray:
    return _pool_windows(x).mean(axis=(2, 4))


def _smallest_nonzero(a: np.ndarray) -> float:
    nonzero = a[a != 0]
    return float(np.min(nonzero)) if nonzero.size else np.inf


def loss(heatmaps: np.ndarray, target: np.ndarray) -> np.ndarray:
    """The training loss, sum over stacks of mean((heatmaps_s - target)^2), kept complex for the complex step."""
    return sum(np.mean((h - target) ** 2) for h in heatmaps)


def directional_derivative(
    config: HourglassConfig, weights: dict[str, np.ndarray], x: np.ndarray, target: np.ndarray,
    direction: dict[str, np.ndarray],
) -> float:
    """d/dt loss(weights + t * direction) at t = 0 in train mode, by the complex step (exact to float64 rounding).

    `direction` covers some or all parameters; the others stay where they are.
    """
    moved = {n: w + 1j * COMPLEX_STEP * direction[n] if n in direction else w for n, w in weights.items()}
    heatmaps = NumpyHourglass(config, moved, train_mode=True)(x)
    return float(loss(heatmaps, target).imag / COMPLEX_STEP)
