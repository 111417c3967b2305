"""DiffusionGemma: one weight set, two passes.

`encode(ids, cache)` is the causal pass: it embeds committed tokens, runs every layer under a causal
(and, on sliding layers, windowed) mask and appends each layer's K/V to the cache.
`denoise(canvas, cache, self_cond)` is the canvas pass: it embeds the canvas, adds the
self-conditioning signal, attends bidirectionally over [cached prefix ; canvas] without writing the
cache, and returns fp32 soft-capped logits [B, C, V].
`denoise(canvas, cache, self_cond, prefix=ids)` does both in one trunk pass: the prefix rows run as
the encoder would (causal mask, K/V appended to the cache), the canvas rows as the canvas pass,
after them. The block loop hands each canvas' first step the tokens not yet encoded (the prompt,
or the last commit), which saves a pass per canvas.
"""

from __future__ import annotations

import math

import mlx.core as mx
import mlx.nn as nn

from .cache import Cache
from .config import ModelConfig
from .layers import DecoderLayer, RMSNorm, Rows, SelfConditioning, soft_embedding


class DiffusionGemma(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        self.config = config
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = [DecoderLayer(config, spec) for spec in config.layers]
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.self_conditioning = SelfConditioning(config)
        self.embed_scale = math.sqrt(config.hidden_size)

    # -- the contract ------------------------------------------------------------------------

    def make_cache(self) -> Cache:
        keep = self.config.sliding_window - 1  # a canvas query sees the last window-1 cached tokens
        return Cache([keep if spec.is_sliding else None for spec in self.config.layers])

    def encode(self, ids: mx.array, cache: Cache) -> None:
        """Causal pass over `ids` [B, L] at positions cache.offset.., appending K/V to `cache`."""
        ids = _as_batch(ids)
        L, offset = ids.shape[1], cache.offset
        h = self.embed(ids)
        masks = {}
        for i, (layer, spec) in enumerate(zip(self.layers, self.config.layers)):
            mask = self._encoder_mask(masks, spec, L, offset, cache[i].length)
            if i == len(self.layers) - 1:
                # the last layer only needs to write its K/V: nothing reads its output
                layer.self_attn(layer.input_layernorm(h), cache[i], offset, mask, commit=L)
            else:
                h = layer(h, cache[i], offset, mask, commit=L)
        cache.offset += L

    def _encoder_mask(self, masks: dict, spec, L: int, offset: int, cached: int) -> mx.array:
        """The causal (and, on sliding layers, windowed) mask of L committed rows at `offset` over
        `cached` + L keys, built once per pass for each layer kind and cache length (`masks`)."""
        key = (spec.is_sliding, cached)
        if key not in masks:
            masks[key] = causal_mask(L, offset, cached, self.config.sliding_window if spec.is_sliding else None)
        return masks[key]

    def denoise(self, canvas: mx.array, cache: Cache, self_cond: mx.array | None = None,
                prefix: mx.array | None = None) -> mx.array:
        """Canvas pass: fp32 soft-capped logits [B, C, V]. `self_cond` is the previous step's
        temperature-scaled logits [B, C, V] (None on the first step). Never writes `cache`, except
        with `prefix` [B, P]: those tokens are encoded into it in the same trunk pass (as
        `encode(prefix, cache)` then `denoise(canvas, cache)` would, in one pass instead of two)."""
        return self.logits(self.denoise_hidden(canvas, cache, self.soft_embeds(self_cond), prefix=prefix))

    def denoise_hidden(
        self,
        canvas: mx.array,
        cache: Cache,
        soft_embeds: mx.array | None = None,
        rows: mx.array | None = None,
        canvas_kv: list | None = None,
        collect_kv: bool = False,
        prefix: mx.array | None = None,
    ):
        """The canvas pass up to the final norm: hidden states [B, L, H].

        For a partial pass, `canvas` holds some canvas rows and `rows` [L] their canvas indices;
        `canvas_kv` (one (k, v) [B, kv_heads, C, D] per layer) is every canvas row's K/V as last
        computed, the rows not in this pass attended with it. With `collect_kv` the per-layer canvas
        (k, v) are returned too, (hidden, kv list): every row's, updated, when `canvas_kv` is given.
        With `prefix` [B, P] (committed tokens not yet encoded; not with `canvas_kv`), the pass
        encodes them first, into the cache, at positions cache.offset..: the canvas then starts
        at cache.offset + P."""
        h = self.self_conditioning(self.embed(_as_batch(canvas)), soft_embeds)
        offset, P, masks = cache.offset, 0, {}
        if prefix is not None:
            if canvas_kv is not None:
                raise ValueError("denoise_hidden: a prefix is encoded with a whole canvas, not a partial one")
            prefix = _as_batch(prefix)
            P = prefix.shape[1]
            h = mx.concatenate([self.embed(prefix), h], axis=1)
        if rows is None and mx.default_device() == mx.cpu:
            # whole canvas: on the CPU the RoPE tables cost less than mx.fast.rope's fallback
            rows = mx.arange(h.shape[1] - P)
        positions = None
        if rows is not None:
            positions = offset + P + rows
            if P:
                positions = mx.concatenate([mx.arange(offset, offset + P, dtype=positions.dtype), positions])
        slots = None if canvas_kv is None else rows[None, None, :, None]
        kv = [] if collect_kv else None
        tables = {}  # RoPE cos / sin at `positions`, built once for every layer
        last = len(self.layers) - 1
        for i, (layer, spec) in enumerate(zip(self.layers, self.config.layers)):
            part = None
            if positions is not None:
                part = Rows(positions, None if canvas_kv is None else canvas_kv[i], slots, kv, tables)
            mask = self._encoder_mask(masks, spec, P, offset, cache[i].length) if P else None
            h = layer(h, cache[i], offset, mask, commit=P, rows=part, last=i == last)
        cache.offset += P
        h = self.norm(h)
        return (h, kv) if collect_kv else h

    # -- pieces ------------------------------------------------------------------------------

    def embed(self, ids: mx.array) -> mx.array:
        # a Python scalar takes the table's dtype: bf16 weights get the reference's rounded 53.0
        return self.embed_tokens(ids) * self.embed_scale

    def soft_embeds(self, self_cond: mx.array | None) -> mx.array | None:
        """softmax(previous tempered logits) @ E * sqrt(H): the self-conditioning input."""
        if self_cond is None:
            return None
        probs = mx.softmax(self_cond.astype(mx.float32), axis=-1).astype(self.dtype)
        return soft_embedding(probs, self.embed_tokens) * self.embed_scale

    def logits(self, h: mx.array) -> mx.array:
        cap = self.config.final_logit_softcapping
        out = self.embed_tokens.as_linear(h).astype(mx.float32)
        return cap * mx.tanh(out / cap)

    @property
    def dtype(self):
        w = self.embed_tokens.get("scales", self.embed_tokens.weight)
        return w.dtype


def causal_mask(L: int, offset: int, cached: int, window: int | None) -> mx.array:
    """Boolean [L, cached + L]: query at offset+i sees keys at positions <= its own and, with a
    window, within the last `window` positions (self included)."""
    q = mx.arange(offset, offset + L)[:, None]
    k = mx.arange(offset - cached, offset + L)[None, :]
    mask = k <= q
    if window is not None:
        mask = mask & (q - k < window)
    return mask


def _as_batch(ids) -> mx.array:
    ids = mx.array(ids) if not isinstance(ids, mx.array) else ids
    return ids[None] if ids.ndim == 1 else ids
