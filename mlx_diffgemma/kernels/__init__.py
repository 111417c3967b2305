"""Kernels for the hot spots; each has a plain-mx reference (`reference.py`) that is the CPU path."""

from .reference import head_statistics, head_statistics_topk

__all__ = ["head_statistics", "head_statistics_topk"]
