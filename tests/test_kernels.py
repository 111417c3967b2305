"""The plain-mx head statistics against a direct numpy computation."""

import mlx.core as mx
import numpy as np

from mlx_diffgemma.kernels import head_statistics


def test_head_statistics_against_numpy():
    rng = np.random.default_rng(0)
    logits = (rng.normal(size=(2, 16, 300)) * 4).astype(np.float32)
    u = rng.random((2, 16)).astype(np.float32)
    z, argmax, entropy, sample = head_statistics(mx.array(logits), np.float32(0.7), mx.array(u))
    zr = logits / np.float32(0.7)
    p = np.exp(zr - zr.max(-1, keepdims=True))
    p /= p.sum(-1, keepdims=True)
    np.testing.assert_allclose(np.array(z), zr, rtol=1e-6)
    assert (np.array(argmax) == zr.argmax(-1)).all()
    np.testing.assert_allclose(np.array(entropy), -(p * np.log(p)).sum(-1), rtol=1e-4, atol=1e-5)
    cdf = np.cumsum(p.astype(np.float64), -1)
    expect = (cdf <= u[..., None] * cdf[..., -1:]).sum(-1)
    assert (np.abs(np.array(sample) - expect) == 0).mean() > 0.95  # fp32 vs fp64 cumsum at the edges


def test_inverse_cdf_sampling_follows_the_distribution():
    p = np.array([0.5, 0.0, 0.3, 0.2], dtype=np.float32)
    logits = mx.array(np.log(np.maximum(p, 1e-30))[None, None].repeat(4000, axis=1))
    u = mx.array(np.random.default_rng(1).random((1, 4000)).astype(np.float32))
    *_, sample = head_statistics(logits, np.float32(1.0), u)
    freq = np.bincount(np.array(sample).ravel(), minlength=4) / 4000
    assert freq[1] == 0
    np.testing.assert_allclose(freq, p, atol=0.03)
