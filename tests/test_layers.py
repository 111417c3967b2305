"""The CPU's compiled RMSNorm is mx.fast.rms_norm to the bit, forward and backward."""

import mlx.core as mx
import numpy as np
import pytest

from mlx_diffgemma import layers


@pytest.mark.parametrize("dtype", [mx.float32, mx.bfloat16, mx.float16])
@pytest.mark.parametrize("shape", [(1, 4, 96), (2, 7, 3, 24), (30, 96), (1, 2, 5, 48)])
def test_cpu_rms_norm_is_the_fast_op_to_the_bit(dtype, shape):
    assert mx.default_device() == mx.cpu and np.prod(shape) <= layers._CPU_COMPILED_NORM_MAX
    rng = np.random.default_rng(0)
    x = mx.array(rng.normal(scale=3.0, size=shape).astype(np.float32)).astype(dtype)
    w = mx.array(rng.normal(size=shape[-1:]).astype(np.float32)).astype(dtype)
    for weight in (w, None):
        ours, fast = layers.rms_norm(x, weight, 1e-6), mx.fast.rms_norm(x, weight, 1e-6)
        assert ours.dtype == fast.dtype == dtype
        assert mx.array_equal(ours, fast).item()
    # training differentiates through it: the same gradients (within rounding of the two VJPs)
    f32 = x.astype(mx.float32), w.astype(mx.float32)
    for norm in (layers.rms_norm, mx.fast.rms_norm):
        g = mx.grad(lambda a, b: (norm(a, b, 1e-6) * mx.cos(a)).sum(), argnums=(0, 1))(*f32)
        if norm is layers.rms_norm:
            ours = g
    for a, b in zip(ours, g):
        np.testing.assert_allclose(np.array(a), np.array(b), rtol=1e-5, atol=1e-5)


def test_large_inputs_take_the_fast_op():
    x = mx.ones((1, 128, 96))  # past the compiled norm's size: mx.fast.rms_norm itself
    assert x.size > layers._CPU_COMPILED_NORM_MAX
    assert mx.array_equal(layers.rms_norm(x, None, 1e-6), mx.fast.rms_norm(x, None, 1e-6)).item()
