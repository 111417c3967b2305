"""Plain-mx reference kernels: the CPU path, and what every custom kernel is checked against."""

from __future__ import annotations

import mlx.core as mx


def head_statistics(logits: mx.array, temperature, uniforms: mx.array):
    """The sampler's vocabulary-wide work for one denoising step.

    logits [B, C, V] fp32 (soft-capped), temperature a scalar, uniforms [B, C] in [0, 1).
    Returns (z, argmax, entropy, sample): the temperature-scaled logits (the next step's
    self-conditioning input), their argmax, their entropy in nats, and an inverse-CDF sample of
    softmax(z) driven by `uniforms` (same distribution as a multinomial draw).
    """
    z = logits / mx.array(temperature, dtype=mx.float32)
    logp = z - mx.logsumexp(z, axis=-1, keepdims=True)
    p = mx.exp(logp)
    entropy = -(p * logp).sum(axis=-1)
    argmax = mx.argmax(z, axis=-1)
    cdf = mx.cumsum(p, axis=-1)
    # scale u by the total so fp32 round-off in the cumsum cannot push past the last token
    target = uniforms.astype(mx.float32) * cdf[..., -1]
    sample = mx.minimum((cdf <= target[..., None]).sum(axis=-1), z.shape[-1] - 1)
    return z, argmax, entropy, sample.astype(mx.int32)

