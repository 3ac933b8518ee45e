"""configure_math: each framework pins its GPU fp32 math and autotuning on request, and says what is in force.

The switches exist on a CPU build too (they only matter on a GPU), so this runs here; each test puts the
framework's own defaults back, so the tests that follow in this process see an untouched framework.
"""

from __future__ import annotations

import pytest

import impls

KEYS = {
    "torch": ("cudnn_allow_tf32", "cuda_matmul_allow_tf32"),
    "tensorflow": ("tf32_enabled",),
    "jax": ("jax_default_matmul_precision",),
}


@pytest.fixture
def restored(backend):
    """The framework's own defaults back after the test (torch: no cuDNN benchmark; TF: TF32 on; JAX: no
    default precision)."""
    yield backend
    if backend.FRAMEWORK == "torch":
        backend.torch.backends.cudnn.benchmark = False
        backend.torch.backends.cudnn.allow_tf32 = True
        backend.torch.backends.cuda.matmul.allow_tf32 = False
        backend.torch.set_float32_matmul_precision("highest")
    elif backend.FRAMEWORK == "tensorflow":
        backend.tf.config.experimental.enable_tensor_float_32_execution(True)
    else:
        backend.jax.config.update("jax_default_matmul_precision", None)


def test_configure_math_pins_tf32_and_back_to_ieee(restored) -> None:
    backend = restored
    try:
        tf32 = backend.configure_math("tf32", autotune=False)
        assert tf32["fp32_math"] == "tf32"
        for key in KEYS[backend.FRAMEWORK]:
            assert tf32[key] in (True, "tensorfloat32"), key
    finally:
        ieee = backend.configure_math("ieee", autotune=True)
    assert ieee["fp32_math"] == "ieee"
    for key in KEYS[backend.FRAMEWORK]:
        assert ieee[key] in (False, "highest"), key


def test_configure_math_rejects_an_unknown_mode(restored) -> None:
    backend = restored
    with pytest.raises(ValueError, match="fp32_math"):
        backend.configure_math("fp16")


def test_every_framework_module_offers_configure_math() -> None:
    for name in impls.FRAMEWORKS:
        if impls.is_installed(name):
            assert callable(impls.load(name).configure_math)
