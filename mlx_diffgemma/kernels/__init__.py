"""Kernels for the hot spots. Each custom kernel has a plain-mx fallback that is the CPU path and the
reference it is checked against on the user's device (registry.py)."""

from . import registry
from .reference import head_statistics


def lm_head_epilogue(raw, cap: float, temperature: float, uniforms, k: int):
    """Fused soft-cap / temperature / stats / top-k / sample over raw head outputs [R, V].
    Returns (argmax, entropy, lse, sample, topk_ids, topk_values)."""
    return registry.run("lm_head_epilogue", raw, cap, temperature, uniforms, k)


__all__ = ["head_statistics", "lm_head_epilogue", "registry"]
