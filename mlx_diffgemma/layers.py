"""The pieces of one DiffusionGemma layer: attention, the dense MLP, the router and the experts.

Every module here is shared by both passes; only `Attention` knows the difference (the encoder
extends the cache under a causal mask, the canvas reads it with no mask at all).
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import mlx.core as mx
import mlx.nn as nn
import numpy as np
from mlx_lm.models.switch_layers import SwitchLinear, _gather_sort, _scatter_unsort

from .cache import LayerCache
from .config import LayerSpec, ModelConfig


def rms_norm(x: mx.array, weight: mx.array | None, eps: float) -> mx.array:
    # Gemma 4: x * rsqrt(mean(x^2) + eps) * weight (no `1 + weight`); weight None = scale-free norm.
    if x.size <= _CPU_COMPILED_NORM_MAX and mx.default_device() == mx.cpu:
        return _cpu_rms_norm(eps, weight is not None, x.shape[-1])(x, *(() if weight is None else (weight,)))
    return mx.fast.rms_norm(x, weight, eps)


# On the CPU mx.fast.rms_norm expands into eleven graph nodes, and per-node overhead is most of what
# a small pass costs there; a compiled norm is three nodes but slower per element (2.5 against 0.7
# ns on the CI machine): it wins up to about this many elements (a 48-row canvas at width 96).
_CPU_COMPILED_NORM_MAX = 6144


@functools.lru_cache(maxsize=None)
def _cpu_rms_norm(eps: float, weighted: bool, dims: int):
    """mx.fast.rms_norm's own arithmetic (fp32 inside, cast back, then the weight), compiled."""

    def norm(x, *weight):
        x32 = x.astype(mx.float32)
        # sum * (1 / dims), as mean does, with dims a constant: no element-count node
        y = (x32 * mx.rsqrt(mx.sum(mx.square(x32), axis=-1, keepdims=True) * (1.0 / dims) + eps)).astype(x.dtype)
        return y * weight[0] if weighted else y

    return mx.compile(norm, shapeless=True)


class RMSNorm(nn.Module):
    def __init__(self, dims: int, eps: float):
        super().__init__()
        self.weight = mx.ones((dims,))
        self.eps = eps

    def __call__(self, x):
        return rms_norm(x, self.weight, self.eps)


class MLP(nn.Module):
    """Gated GELU-tanh MLP: the dense branch and the self-conditioning block."""

    def __init__(self, dims: int, hidden: int):
        super().__init__()
        self.gate_proj = nn.Linear(dims, hidden, bias=False)
        self.up_proj = nn.Linear(dims, hidden, bias=False)
        self.down_proj = nn.Linear(hidden, dims, bias=False)

    def __call__(self, x):
        return self.down_proj(nn.gelu_approx(self.gate_proj(x)) * self.up_proj(x))


class RoPE:
    """Rotate-half RoPE at absolute positions. 'proportional' rotates only the first
    `partial_rotary_factor * head_dim / 2` frequency pairs (i, i + head_dim/2), with frequencies
    over the full head_dim; the remaining dims pass through (period = inf)."""

    def __init__(self, spec: LayerSpec):
        self.dims = spec.head_dim
        self.key = (spec.head_dim, spec.rope_type, spec.partial_rotary_factor, spec.rope_factor, spec.rope_theta)
        if spec.rope_type == "default" and spec.partial_rotary_factor == 1.0 and spec.rope_factor == 1.0:
            self.base, self.freqs = spec.rope_theta, None
        else:
            half = spec.head_dim // 2
            rotated = int(spec.partial_rotary_factor * spec.head_dim // 2)
            i = np.arange(half, dtype=np.float64)
            periods = spec.rope_factor * np.power(spec.rope_theta, 2.0 * i / spec.head_dim)
            # built on the host: a concrete array, usable from any thread (no lazy graph)
            self.base, self.freqs = None, mx.array(np.where(i < rotated, periods, np.inf).astype(np.float32))

    def __call__(self, x: mx.array, offset: int) -> mx.array:
        return mx.fast.rope(
            x, self.dims, traditional=False, base=self.base, scale=1.0, offset=offset, freqs=self.freqs
        )

    def at(self, x: mx.array, positions: mx.array, tables: dict | None = None) -> mx.array:
        """RoPE at arbitrary positions [L] (x: [B, heads, L, D]), for a partial canvas pass.
        `tables` keeps the cos / sin per rotation, so the layers of one pass build them once."""
        half = self.dims // 2
        tables = {} if tables is None else tables
        key = (self.key, x.dtype)
        if key not in tables:
            if self.freqs is None:
                inv = mx.power(self.base, -2.0 * mx.arange(half, dtype=mx.float32) / self.dims)
            else:
                inv = 1.0 / self.freqs  # inf periods rotate by 0
            angles = positions.astype(mx.float32)[:, None] * inv[None, :]
            tables[key] = mx.cos(angles).astype(x.dtype), mx.sin(angles).astype(x.dtype)
        cos, sin = tables[key]
        x1, x2 = x[..., :half], x[..., half:]
        return mx.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)


@dataclass
class Rows:
    """A canvas pass over a subset of canvas rows: their absolute `positions` [L]; with
    `canvas_kv`, this layer's (k, v) of every canvas row as last computed, into which the rows'
    fresh K/V go at `slots` (their canvas indices) before the attention reads them; and a list that
    collects this layer's canvas (k, v) (every row with `canvas_kv`, else the computed rows)."""

    positions: mx.array
    canvas_kv: tuple[mx.array, mx.array] | None = None
    slots: mx.array | None = None  # [1, 1, L, 1], to index the canvas axis of [B, heads, C, D]
    collect: list | None = None
    rope_tables: dict | None = None  # shared by the layers of one pass (RoPE.at)


class Attention(nn.Module):
    def __init__(self, config: ModelConfig, spec: LayerSpec):
        super().__init__()
        H, heads, D, kv = config.hidden_size, config.num_attention_heads, spec.head_dim, spec.num_kv_heads
        self.spec = spec
        self.num_heads, self.num_kv_heads, self.head_dim = heads, kv, D
        self.eps = config.rms_norm_eps
        self.q_proj = nn.Linear(H, heads * D, bias=False)
        self.k_proj = nn.Linear(H, kv * D, bias=False)
        if spec.is_sliding:  # full layers have no v_proj: V is the raw k_proj output
            self.v_proj = nn.Linear(H, kv * D, bias=False)
        self.o_proj = nn.Linear(heads * D, H, bias=False)
        self.q_norm = RMSNorm(D, self.eps)
        self.k_norm = RMSNorm(D, self.eps)
        self.rope = RoPE(spec)

    def __call__(self, x, cache: LayerCache, offset: int, mask: mx.array | None, commit: int, rows: Rows | None = None,
                 canvas_only: bool = False):
        """`commit`: how many leading rows are committed tokens, whose K/V are appended to the cache
        (all of them for the encoder, none for a canvas pass, a prefix for a pass that encodes it
        together with a canvas); the other rows are canvas rows, which read the cache. `mask`
        applies to the committed rows (the encoder's causal mask); canvas rows need none. With
        `canvas_only` the committed rows only write their K/V: the output holds the canvas rows."""
        B, L, _ = x.shape
        q = self.q_proj(x).reshape(B, L, self.num_heads, self.head_dim)
        k_raw = self.k_proj(x).reshape(B, L, self.num_kv_heads, self.head_dim)
        v_raw = self.v_proj(x).reshape(B, L, self.num_kv_heads, self.head_dim) if "v_proj" in self else k_raw

        q, k = self.q_norm(q).transpose(0, 2, 1, 3), self.k_norm(k_raw).transpose(0, 2, 1, 3)
        if rows is None:
            q, k = self.rope(q, offset), self.rope(k, offset)
        else:  # one rotation for q and k: fewer graph nodes
            qk = self.rope.at(mx.concatenate([q, k], axis=1), rows.positions, rows.rope_tables)
            q, k = qk[:, : self.num_heads], qk[:, self.num_heads :]
        v = rms_norm(v_raw, None, self.eps).transpose(0, 2, 1, 3)

        if rows is not None:
            if rows.canvas_kv is not None:  # the other rows keep the K/V they were last computed with
                k, v = _put_rows(rows.canvas_kv[0], rows.slots, k), _put_rows(rows.canvas_kv[1], rows.slots, v)
            if rows.collect is not None:
                rows.collect.append((k[:, :, commit:], v[:, :, commit:]))
        # scale 1.0: the q/k norms replace 1/sqrt(d)
        if commit in (0, L):  # all canvas rows, or all committed rows (the encoder)
            k, v = cache.extend(k, v) if commit else cache.read(k, v)
            out = mx.fast.scaled_dot_product_attention(q, k, v, scale=1.0, mask=mask)
        else:
            # the committed rows attend as in the encoder, then the canvas rows read the cache they
            # leave (two attentions: only the projections and the feed-forward share the pass)
            ck, cv = cache.extend(k[:, :, :commit], v[:, :, :commit])
            k, v = cache.read(k[:, :, commit:], v[:, :, commit:])
            out = mx.fast.scaled_dot_product_attention(q[:, :, commit:], k, v, scale=1.0)
            if not canvas_only:
                head = mx.fast.scaled_dot_product_attention(q[:, :, :commit], ck, cv, scale=1.0, mask=mask)
                out = mx.concatenate([head, out], axis=2)
        return self.o_proj(out.transpose(0, 2, 1, 3).reshape(B, out.shape[2], -1))


def _put_rows(full: mx.array, slots: mx.array, rows: mx.array) -> mx.array:
    """`full` [B, heads, C, D] with `rows` [B, heads, L, D] written at `slots` [1, 1, L, 1] (a new
    array; one scatter node, where `full[:, :, i] = rows` costs sixteen)."""
    return mx.put_along_axis(full, slots, rows, axis=2)


class Router(nn.Module):
    """Reads the un-normalised residual; softmax over all experts, top-k, renormalise, per-expert scale."""

    def __init__(self, config: ModelConfig):
        super().__init__()
        H = config.hidden_size
        self.proj = nn.Linear(H, config.num_experts, bias=False)
        self.scale = mx.ones((H,))
        self.per_expert_scale = mx.ones((config.num_experts,))
        self.top_k = config.top_k_experts
        self.eps = config.rms_norm_eps
        self.root_size = H**-0.5

    def __call__(self, r: mx.array) -> tuple[mx.array, mx.array]:
        h = rms_norm(r, None, self.eps) * self.scale
        # the reference multiplies by an unrounded Python float: do it in fp32
        h = (h.astype(mx.float32) * self.root_size).astype(r.dtype)
        probs = mx.softmax(self.proj(h).astype(mx.float32), axis=-1)
        # indices carry no gradient (training differentiates through the weights only)
        idx = mx.stop_gradient(mx.argpartition(-probs, kth=self.top_k - 1, axis=-1)[..., : self.top_k])
        w = mx.take_along_axis(probs, idx, axis=-1)
        w = w / w.sum(axis=-1, keepdims=True)
        return idx, w * self.per_expert_scale.astype(mx.float32)[idx]


class Experts(nn.Module):
    """Stacked experts through gather_mm / gather_qmm; gate and up are fused along the output axis."""

    def __init__(self, config: ModelConfig):
        super().__init__()
        H, I, E = config.hidden_size, config.moe_intermediate_size, config.num_experts
        self.gate_up_proj = SwitchLinear(H, 2 * I, E, bias=False)
        self.down_proj = SwitchLinear(I, H, E, bias=False)

    def __call__(self, x: mx.array, idx: mx.array, weights: mx.array) -> mx.array:
        # x [N, H], idx/weights [N, k]
        x = mx.expand_dims(x, (-2, -3))
        sort = idx.size >= 64  # sorting by expert makes the gathers contiguous on big batches
        if sort:
            x, order_idx, inv = _gather_sort(x, idx)
        else:
            order_idx = idx
        gate, up = mx.split(_switch(self.gate_up_proj, x, order_idx, sort), 2, axis=-1)
        y = _switch(self.down_proj, nn.gelu_approx(gate) * up, order_idx, sort)
        if sort:
            y = _scatter_unsort(y, inv, idx.shape)
        y = y.squeeze(-2)  # [N, k, H]
        return (y * weights[..., None].astype(y.dtype)).sum(axis=-2)


def _switch(linear: nn.Module, x: mx.array, idx: mx.array, sort: bool) -> mx.array:
    # MLX's CPU gather_mm is fp32-only: on the CPU, run unquantized bf16/fp16 experts in fp32
    if (
        isinstance(linear, SwitchLinear)
        and linear.weight.dtype != mx.float32
        and mx.default_device().type == mx.DeviceType.cpu
    ):
        w = linear.weight.astype(mx.float32).swapaxes(-1, -2)
        y = mx.gather_mm(x.astype(mx.float32), w, rhs_indices=idx, sorted_indices=sort)
        return y.astype(x.dtype)
    return linear(x, idx, sorted_indices=sort)


class DecoderLayer(nn.Module):
    def __init__(self, config: ModelConfig, spec: LayerSpec):
        super().__init__()
        H, eps = config.hidden_size, config.rms_norm_eps
        self.self_attn = Attention(config, spec)
        self.mlp = MLP(H, config.intermediate_size)
        self.router = Router(config)
        self.experts = Experts(config)
        self.input_layernorm = RMSNorm(H, eps)
        self.post_attention_layernorm = RMSNorm(H, eps)
        self.pre_feedforward_layernorm = RMSNorm(H, eps)  # dense branch in
        self.post_feedforward_layernorm_1 = RMSNorm(H, eps)  # dense branch out
        self.pre_feedforward_layernorm_2 = RMSNorm(H, eps)  # experts in
        self.post_feedforward_layernorm_2 = RMSNorm(H, eps)  # experts out
        self.post_feedforward_layernorm = RMSNorm(H, eps)  # sum of both
        self.layer_scalar = mx.ones((1,))

    def __call__(self, x, cache: LayerCache, offset: int, mask, commit: int, rows: Rows | None = None,
                 last: bool = False):
        """`commit` as in Attention. In the `last` layer the committed rows stop after attention:
        only their K/V was needed, and the output holds the other rows only."""
        canvas_only = last and 0 < commit < x.shape[1]
        a = self.self_attn(self.input_layernorm(x), cache, offset, mask, commit, rows, canvas_only)
        if canvas_only:
            x = x[:, commit:]
        r = x + self.post_attention_layernorm(a)

        dense = self.post_feedforward_layernorm_1(self.mlp(self.pre_feedforward_layernorm(r)))

        flat = r.reshape(-1, r.shape[-1])
        idx, w = self.router(flat)
        moe = self.experts(self.pre_feedforward_layernorm_2(flat), idx, w).reshape(r.shape)
        moe = self.post_feedforward_layernorm_2(moe)

        x = r + self.post_feedforward_layernorm(dense + moe)
        return x * self.layer_scalar


def soft_embedding(probs: mx.array, embed: nn.Module) -> mx.array:
    """probs [.., V] @ E [V, H], for a plain or a quantized embedding table."""
    if isinstance(embed, nn.QuantizedEmbedding):
        return mx.quantized_matmul(
            probs,
            embed.weight,
            embed.scales,
            embed.get("biases"),
            transpose=False,
            group_size=embed.group_size,
            bits=embed.bits,
            mode=getattr(embed, "mode", "affine"),
        )
    return probs @ embed.weight


class SelfConditioning(nn.Module):
    """Turns the previous step's soft embedding into a signal added to the canvas embedding."""

    def __init__(self, config: ModelConfig):
        super().__init__()
        H = config.hidden_size
        self.pre_norm = RMSNorm(H, config.rms_norm_eps)
        self.gate_proj = nn.Linear(H, config.intermediate_size, bias=False)
        self.up_proj = nn.Linear(H, config.intermediate_size, bias=False)
        self.down_proj = nn.Linear(config.intermediate_size, H, bias=False)
        self.eps = config.rms_norm_eps

    def __call__(self, canvas_embeds: mx.array, soft_embeds: mx.array | None) -> mx.array:
        x = canvas_embeds
        if soft_embeds is not None:  # first step: the signal is exactly zero (no biases anywhere)
            n = self.pre_norm(soft_embeds)
            x = x + self.down_proj(nn.gelu_approx(self.gate_proj(n)) * self.up_proj(n))
        return rms_norm(x, None, self.eps)  # post_norm has no weight

