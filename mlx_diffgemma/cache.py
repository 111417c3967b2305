"""The encoder's KV cache: one entry per layer, written only by `encode`, read by `denoise`.

Sliding layers keep the last `window - 1` tokens (what a canvas query may see), full layers keep
everything. Keys are stored post-norm and post-RoPE, values post-v_norm, shaped [B, kv_heads, T, D].
"""

from __future__ import annotations

import mlx.core as mx


class LayerCache:
    def __init__(self, keep: int | None):
        self.keep = keep  # None: keep every token
        self.keys: mx.array | None = None
        self.values: mx.array | None = None

    def extend(self, keys: mx.array, values: mx.array) -> tuple[mx.array, mx.array]:
        """Append new K/V; return [cached ; new] for the encoder's attention, then trim what is stored."""
        if self.keys is not None:
            keys = mx.concatenate([self.keys, keys], axis=2)
            values = mx.concatenate([self.values, values], axis=2)
        if self.keep is not None and keys.shape[2] > self.keep:
            self.keys, self.values = keys[:, :, -self.keep :], values[:, :, -self.keep :]
        else:
            self.keys, self.values = keys, values
        return keys, values

    def read(self, keys: mx.array, values: mx.array) -> tuple[mx.array, mx.array]:
        """[cached ; keys] without storing anything (the canvas pass)."""
        if self.keys is None:
            return keys, values
        return mx.concatenate([self.keys, keys], axis=2), mx.concatenate([self.values, values], axis=2)

    @property
    def length(self) -> int:
        return 0 if self.keys is None else self.keys.shape[2]

    @property
    def nbytes(self) -> int:
        return 0 if self.keys is None else self.keys.nbytes + self.values.nbytes


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

    def state(self) -> list[mx.array]:
        return [a for c in self.layers for a in (c.keys, c.values) if a is not None]

    def copy(self) -> "Cache":
        """A snapshot: arrays are immutable, so sharing them is safe and costs nothing."""
        new = Cache([c.keep for c in self.layers])
        for dst, src in zip(new.layers, self.layers):
            dst.keys, dst.values = src.keys, src.values
        new.offset = self.offset
        return new
