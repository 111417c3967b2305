"""The encoder's KV cache on torch: the same contract as `mlx_diffgemma/cache.py`.

Sliding layers keep the last `window - 1` tokens, full layers keep everything. Keys are stored
post-norm and post-RoPE, values post-v_norm, shaped [B, kv_heads, T, D]. Only `encode` writes it.
"""

from __future__ import annotations

import torch


class LayerCache:
    def __init__(self, keep: int | None):
        self.keep = keep  # None: keep every token
        self.keys: torch.Tensor | None = None
        self.values: torch.Tensor | None = None

    def extend(self, keys: torch.Tensor, values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Append new K/V; return [cached ; new] for the encoder's attention, then trim what is stored."""
        if self.keys is not None:
            keys = torch.cat([self.keys, keys], dim=2)
            values = torch.cat([self.values, values], dim=2)
        if self.keep is not None and keys.shape[2] > self.keep:
            # a copy, so the trimmed-away prefix is freed
            self.keys, self.values = keys[:, :, -self.keep :].clone(), values[:, :, -self.keep :].clone()
        else:
            self.keys, self.values = keys, values
        return keys, values

    def read(self, keys: torch.Tensor, values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """[cached ; keys] without storing anything (the canvas pass)."""
        if self.keys is None:
            return keys, values
        return torch.cat([self.keys, keys], dim=2), torch.cat([self.values, values], dim=2)

    @property
    def length(self) -> int:
        return 0 if self.keys is None else self.keys.shape[2]

    @property
    def nbytes(self) -> int:
        if self.keys is None:
            return 0
        return self.keys.numel() * self.keys.element_size() + self.values.numel() * self.values.element_size()


class Cache:
    """Per-layer caches plus `offset`, the absolute position of the next token to encode."""

    def __init__(self, keeps: list[int | None]):
        self.layers = [LayerCache(k) for k in keeps]
        self.offset = 0

    def __getitem__(self, i: int) -> LayerCache:
        return self.layers[i]

    def __len__(self) -> int:
        return len(self.layers)

    @property
    def nbytes(self) -> int:
        return sum(c.nbytes for c in self.layers)

    def state(self) -> list[torch.Tensor]:
        return [a for c in self.layers for a in (c.keys, c.values) if a is not None]

    def copy(self) -> "Cache":
        """A snapshot. Stored tensors are never modified in place (extend rebinds), so sharing is safe."""
        new = Cache([c.keep for c in self.layers])
        for dst, src in zip(new.layers, self.layers):
            dst.keys, dst.values = src.keys, src.values
        new.offset = self.offset
        return new
