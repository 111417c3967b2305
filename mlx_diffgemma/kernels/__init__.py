"""Kernels for the hot spots; each has a plain-mx reference (`reference.py`) that is the CPU path."""

from .reference import head_statistics

__all__ = ["head_statistics"]
