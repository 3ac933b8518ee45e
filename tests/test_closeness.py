"""The gradient-agreement rule of tests/conftest.py on hand-built gradients: what it lets through and what not."""

from __future__ import annotations

import numpy as np
import pytest

from tests.conftest import assert_grads_close

RNG = np.random.default_rng(0)
TYPICAL = {f"conv{i}.kernel": RNG.standard_normal(64).astype(np.float32) for i in range(4)}  # rms ~1


def with_param(value: np.ndarray) -> dict[str, np.ndarray]:
    return {**TYPICAL, "bn.scale": value}


def test_a_typical_gradient_is_held_to_tol_of_its_own_norm() -> None:
    want = with_param(np.array([1.0, -1.0], np.float32))
    assert_grads_close(with_param(np.array([1.0004, -1.0], np.float32)), want, 1e-3, "close")
    off = {**want, "conv0.kernel": TYPICAL["conv0.kernel"] * 1.003}  # 3e-3 off: beyond tol x (1 + 1)
    with pytest.raises(AssertionError, match=r"grad conv0\.kernel"):
        assert_grads_close(off, want, 1e-3, "3e-3 off")


def test_a_nearly_cancelled_gradient_is_measured_against_a_typical_one() -> None:
    # A BN scale whose gradient is 100x smaller than a typical one of its size: 5e-3 of its own norm is
    # fp32 rounding of the terms it sums, not disagreement.
    tiny = np.array([0.01, -0.01], np.float32)
    assert_grads_close(with_param(tiny * 1.005), with_param(tiny), 1e-3, "cancelled")


def test_a_missing_gradient_fails_on_either_side() -> None:
    real = np.array([1.0, -1.0], np.float32)
    with pytest.raises(AssertionError, match=r"grad bn\.scale"):
        assert_grads_close(with_param(np.zeros(2, np.float32)), with_param(real), 1e-3, "got zero")
    with pytest.raises(AssertionError, match=r"grad bn\.scale"):
        assert_grads_close(with_param(real), with_param(np.zeros(2, np.float32)), 1e-3, "want zero")
