"""DiffusionGemma in torch: the same two passes and contract as `mlx_diffgemma/model.py`.

`encode(ids, cache)` is the causal pass: it embeds committed tokens, runs every layer under a causal
(and, on sliding layers, windowed) mask and appends each layer's K/V to the cache.
`denoise(canvas, cache, self_cond)` is the canvas pass: it embeds the canvas, adds the
self-conditioning signal, attends bidirectionally over [cached prefix ; canvas] without writing the
cache, and returns fp32 soft-capped logits [B, C, V]. `ops` lets `mlx_diffgemma.generate` drive it.
Both passes run without autograd unless the model is in training mode (`torch_backend.train`).
"""

from __future__ import annotations

import functools

import torch
from torch import nn

from ..config import GenerationConfig, ModelConfig
from .cache import Cache
from .layers import DecoderLayer, RMSNorm, SelfConditioning, embed_scale
from .ops import TorchOps


def _grad_in_training(pass_fn):
    # loaded models are in eval mode: the passes build no graph; the trainer puts the model in
    # training mode and the same passes become differentiable
    @functools.wraps(pass_fn)
    def run(self, *args, **kwargs):
        with torch.set_grad_enabled(self.training and torch.is_grad_enabled()):
            return pass_fn(self, *args, **kwargs)

    return run


class DiffusionGemma(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        self.config = config
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.embed_tokens.weight.requires_grad_(False)
        self.layers = nn.ModuleList([DecoderLayer(config, spec) for spec in config.layers])
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.self_conditioning = SelfConditioning(config)
        self.embed_scale = embed_scale(config.hidden_size)
        self.generation_config = GenerationConfig()
        self.ops = TorchOps("cpu")

    # -- the contract ------------------------------------------------------------------------

    def make_cache(self) -> Cache:
        keep = self.config.sliding_window - 1  # a canvas query sees the last window-1 cached tokens
        return Cache([keep if spec.is_sliding else None for spec in self.config.layers])

    @_grad_in_training
    def encode(self, ids, cache: Cache) -> None:
        """Causal pass over `ids` [B, L] at positions cache.offset.., appending K/V to `cache`."""
        ids = self._as_batch(ids)
        L, offset = ids.shape[1], cache.offset
        h = self.embed(ids)
        masks = {}
        for i, (layer, spec) in enumerate(zip(self.layers, self.config.layers)):
            cached = cache[i].length
            key = (spec.is_sliding, cached)
            if key not in masks:
                window = self.config.sliding_window if spec.is_sliding else None
                masks[key] = causal_mask(L, offset, cached, window, ids.device)
            if i == len(self.layers) - 1:
                # the last layer only needs to write its K/V: nothing reads its output
                layer.self_attn(layer.input_layernorm(h), cache[i], offset, masks[key], write=True)
            else:
                h = layer(h, cache[i], offset, masks[key], write=True)
        cache.offset += L

    @_grad_in_training
    def denoise(self, canvas, cache: Cache, self_cond: torch.Tensor | None = None, prefix=None) -> torch.Tensor:
        """Canvas pass: fp32 soft-capped logits [B, C, V]. `self_cond` is the previous step's
        temperature-scaled logits [B, C, V] (None on the first step). Never writes `cache`, except
        with `prefix` [B, P], which is encoded first (here a pass of its own; the MLX model fuses
        the two)."""
        if prefix is not None:
            self.encode(prefix, cache)
        h = self.canvas_input(self._as_batch(canvas), self_cond)
        for i, layer in enumerate(self.layers):
            h = layer(h, cache[i], cache.offset, None, write=False)
        return self.logits(self.norm(h))

    # -- pieces ------------------------------------------------------------------------------

    def embed(self, ids: torch.Tensor) -> torch.Tensor:
        # the scale in the table's dtype: bf16 weights get the reference's rounded 53.0
        return self.embed_tokens(ids) * self._scale()

    def canvas_input(self, canvas: torch.Tensor, self_cond: torch.Tensor | None) -> torch.Tensor:
        h = self.embed(canvas)
        soft = None
        if self_cond is not None:
            probs = torch.softmax(self_cond.to(h.device), dim=-1, dtype=torch.float32).to(h.dtype)
            soft = (probs @ self.embed_tokens.weight) * self._scale()
            del probs
        return self.self_conditioning(h, soft)

    def logits(self, h: torch.Tensor) -> torch.Tensor:
        cap = self.config.final_logit_softcapping
        out = (h @ self.embed_tokens.weight.T).float()  # the one [B, C, V] fp32 tensor; capped in place
        if out.requires_grad:  # autograd keeps tanh's output, so it must not be scaled in place
            return torch.tanh(out / cap) * cap
        return out.div_(cap).tanh_().mul_(cap)

    def _scale(self) -> torch.Tensor:
        # a 0-d tensor in the table's dtype (a Python float would stay unrounded); made once per
        # dtype/device, since building it on a GPU is a blocking host-to-device copy
        w = self.embed_tokens.weight
        key = (w.dtype, w.device)
        if getattr(self, "_scale_cache", (None,))[0] != key:
            self._scale_cache = (key, torch.tensor(self.embed_scale, dtype=w.dtype, device=w.device))
        return self._scale_cache[1]

    def _as_batch(self, ids) -> torch.Tensor:
        ids = self.ops.asarray(ids).to(torch.int64)
        return ids[None] if ids.ndim == 1 else ids

    @property
    def dtype(self) -> torch.dtype:
        return self.embed_tokens.weight.dtype

    @property
    def device(self) -> torch.device:
        return self.embed_tokens.weight.device


def causal_mask(L: int, offset: int, cached: int, window: int | None, device) -> torch.Tensor:
    """Boolean [L, cached + L] (True = attend): query at offset+i sees keys at positions <= its own
    and, with a window, within the last `window` positions (self included)."""
    q = torch.arange(offset, offset + L, device=device)[:, None]
    k = torch.arange(offset - cached, offset + L, device=device)[None, :]
    mask = k <= q
    if window is not None:
        mask = mask & (q - k < window)
    return mask
