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


def head_statistics_topk(logits: mx.array, temperature, uniforms: mx.array, k: int):
    """Like `head_statistics`, but the sample is drawn from the renormalised top-k tokens and the
    top-k (ids, probabilities) are returned for a gathered self-conditioning input.

    Returns (argmax, entropy, sample, topk_ids, topk_probs); argmax and entropy are exact over the
    whole vocabulary."""
    z = logits / mx.array(temperature, dtype=mx.float32)
    lse = mx.logsumexp(z, axis=-1, keepdims=True)
    p = mx.exp(z - lse)
    entropy = (lse[..., 0] - (p * z).sum(axis=-1))
    argmax = mx.argmax(z, axis=-1)
    k = min(k, z.shape[-1])
    ids = mx.argpartition(-z, kth=k - 1, axis=-1)[..., :k]
    top = mx.take_along_axis(z, ids, axis=-1)
    order = mx.argsort(-top, axis=-1)  # descending, so the inverse CDF walks the likely tokens first
    ids, top = mx.take_along_axis(ids, order, axis=-1), mx.take_along_axis(top, order, axis=-1)
    probs = mx.softmax(top, axis=-1)
    cdf = mx.cumsum(probs, axis=-1)
    pick = mx.minimum((cdf <= (uniforms.astype(mx.float32) * cdf[..., -1])[..., None]).sum(axis=-1), k - 1)
    sample = mx.take_along_axis(ids, pick[..., None], axis=-1)[..., 0]
    return argmax.astype(mx.int32), entropy, sample.astype(mx.int32), ids, probs
