"""One DiffusionGemma layer in torch, written from the spec (docs: reference-spec.md, section 3).

The same modules and parameter names as `mlx_diffgemma/layers.py`, so one checkpoint loads into
both. Every module is shared by both passes; only `Attention` knows the difference (the encoder
extends the cache under a causal mask, the canvas reads it with no mask at all).
"""

from __future__ import annotations

import math
import warnings

import torch
import torch.nn.functional as F
from torch import nn

from ..config import LayerSpec, ModelConfig
from .cache import LayerCache


def rms_norm(x: torch.Tensor, weight: torch.Tensor | None, eps: float) -> torch.Tensor:
    """Gemma 4: x * rsqrt(mean(x^2) + eps) * weight in fp32, cast back (no `1 + weight`)."""
    h = x.float()
    h = h * torch.rsqrt(h.pow(2).mean(dim=-1, keepdim=True) + eps)
    if weight is not None:
        h = h * weight.float()
    return h.to(x.dtype)


def gelu_tanh(x: torch.Tensor) -> torch.Tensor:
    return F.gelu(x, approximate="tanh")


class RMSNorm(nn.Module):
    def __init__(self, dims: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dims), requires_grad=False)
        self.eps = eps

    def forward(self, x):
        return rms_norm(x, self.weight, self.eps)


class Linear(nn.Module):
    """y = x W^T with W [out, in], no bias (there are none in the text stack)."""

    def __init__(self, dims_in: int, dims_out: int):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(dims_out, dims_in), requires_grad=False)

    def forward(self, x):
        return F.linear(x, self.weight)


class MLP(nn.Module):
    """Gated GELU-tanh MLP: the dense branch and the self-conditioning block."""

    def __init__(self, dims: int, hidden: int):
        super().__init__()
        self.gate_proj = Linear(dims, hidden)
        self.up_proj = Linear(dims, hidden)
        self.down_proj = Linear(hidden, dims)

    def forward(self, x):
        return self.down_proj(gelu_tanh(self.gate_proj(x)) * self.up_proj(x))


class RoPE:
    """Rotate-half RoPE at absolute positions. 'proportional' rotates only the first
    `partial_rotary_factor * head_dim / 2` frequency pairs (i, i + head_dim/2), with frequencies
    over the full head_dim; the remaining pairs get frequency 0 and pass through. The tables are
    built on the CPU (also when the model is built on the meta device) and moved on first use."""

    def __init__(self, spec: LayerSpec):
        half = spec.head_dim // 2
        i = torch.arange(half, dtype=torch.float32, device="cpu")
        theta = torch.tensor(spec.rope_theta, dtype=torch.float32, device="cpu")
        periods = spec.rope_factor * torch.pow(theta, 2.0 * i / spec.head_dim)
        rotated = half
        if not (spec.rope_type == "default" and spec.partial_rotary_factor == 1.0):
            rotated = int(spec.partial_rotary_factor * spec.head_dim // 2)
        self.inv_freq = torch.where(i < rotated, 1.0 / periods, torch.zeros((), device="cpu"))
        self._tables: dict = {}

    def _cos_sin(self, offset: int, length: int, device) -> tuple[torch.Tensor, torch.Tensor]:
        key = (offset, length, str(device))
        if key not in self._tables:
            if len(self._tables) > 8:  # positions move on every block: keep the few in use
                self._tables.clear()
            pos = torch.arange(offset, offset + length, dtype=torch.float32, device=device)
            freqs = pos[:, None] * self.inv_freq.to(device)[None, :]
            emb = torch.cat([freqs, freqs], dim=-1)
            self._tables[key] = (emb.cos(), emb.sin())
        return self._tables[key]

    def __call__(self, x: torch.Tensor, offset: int) -> torch.Tensor:
        """x [B, heads, L, D]; computed in fp32, returned in x's dtype."""
        cos, sin = self._cos_sin(offset, x.shape[-2], x.device)
        h = x.float()
        x1, x2 = h.chunk(2, dim=-1)
        rotated = torch.cat([-x2, x1], dim=-1)
        return (h * cos + rotated * sin).to(x.dtype)


class Attention(nn.Module):
    def __init__(self, config: ModelConfig, spec: LayerSpec):
        super().__init__()
        H, heads, D, kv = config.hidden_size, config.num_attention_heads, spec.head_dim, spec.num_kv_heads
        self.spec = spec
        self.num_heads, self.num_kv_heads, self.head_dim = heads, kv, D
        self.eps = config.rms_norm_eps
        self.q_proj = Linear(H, heads * D)
        self.k_proj = Linear(H, kv * D)
        # full layers have no v_proj: V is the raw k_proj output
        self.v_proj = Linear(H, kv * D) if spec.is_sliding else None
        self.o_proj = Linear(heads * D, H)
        self.q_norm = RMSNorm(D, self.eps)
        self.k_norm = RMSNorm(D, self.eps)
        self.rope = RoPE(spec)

    def forward(self, x, cache: LayerCache, offset: int, mask: torch.Tensor | None, write: bool):
        B, L, _ = x.shape
        q = self.q_proj(x).view(B, L, self.num_heads, self.head_dim)
        k_raw = self.k_proj(x).view(B, L, self.num_kv_heads, self.head_dim)
        v_raw = self.v_proj(x).view(B, L, self.num_kv_heads, self.head_dim) if self.v_proj is not None else k_raw

        q = self.rope(self.q_norm(q).transpose(1, 2), offset)
        k = self.rope(self.k_norm(k_raw).transpose(1, 2), offset)
        v = rms_norm(v_raw, None, self.eps).transpose(1, 2)

        k, v = cache.extend(k, v) if write else cache.read(k, v)
        # scale 1.0: the q/k norms replace 1/sqrt(d); KV head j serves query heads j*g .. j*g+g-1
        out = F.scaled_dot_product_attention(
            q, k, v, attn_mask=mask, scale=1.0, enable_gqa=self.num_heads != self.num_kv_heads
        )
        return self.o_proj(out.transpose(1, 2).reshape(B, L, -1))


class Router(nn.Module):
    """Reads the un-normalised residual; softmax over all experts, top-k, renormalise, per-expert scale."""

    def __init__(self, config: ModelConfig):
        super().__init__()
        H = config.hidden_size
        self.proj = Linear(H, config.num_experts)
        self.scale = nn.Parameter(torch.ones(H), requires_grad=False)
        self.per_expert_scale = nn.Parameter(torch.ones(config.num_experts), requires_grad=False)
        self.top_k = config.top_k_experts
        self.eps = config.rms_norm_eps
        self.root_size = H**-0.5

    def forward(self, r: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        h = rms_norm(r, None, self.eps) * self.scale
        # the reference multiplies by an unrounded Python float: do it in fp32
        h = (h.float() * self.root_size).to(r.dtype)
        probs = torch.softmax(self.proj(h).float(), dim=-1)
        w, idx = torch.topk(probs, self.top_k, dim=-1)
        w = w / w.sum(dim=-1, keepdim=True)
        scale = self.per_expert_scale.float()
        if scale.requires_grad:
            # training: an index's backward piles N*k atomic adds onto E slots (18% of a step on an
            # H200: benchmarks/results/gpu-20261204-h200/); a one-hot product reduces instead
            return idx, w * (F.one_hot(idx, scale.shape[0]).to(scale.dtype) @ scale)
        return idx, w * scale[idx]


class StackedLinear(nn.Module):
    """Per-expert weights [E, out, in] (the checkpoint's `experts.*_proj`, renamed `.weight`)."""

    def __init__(self, dims_in: int, dims_out: int, num_experts: int):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(num_experts, dims_out, dims_in), requires_grad=False)


class Experts(nn.Module):
    """The routed experts, batched by sorting (token, expert) pairs by expert.

    With `torch.nn.functional.grouped_mm` (CPU, and CUDA bf16 on SM80+) each projection is one
    grouped GEMM over all experts; otherwise a loop over the experts that received tokens (never
    over tokens) with index_select / index_copy. Gate and up are fused along the output axis."""

    def __init__(self, config: ModelConfig):
        super().__init__()
        H, I, E = config.hidden_size, config.moe_intermediate_size, config.num_experts
        self.num_experts = E
        self.gate_up_proj = StackedLinear(H, 2 * I, E)
        self.down_proj = StackedLinear(I, H, E)
        self.use_grouped_mm: bool | None = None  # None: decide on first call

    def forward(self, x: torch.Tensor, idx: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        # x [N, H], idx / weights [N, k]
        if self.training:
            return self._every_expert(x, idx, weights)
        N, k = idx.shape
        flat = idx.reshape(-1)
        order = torch.argsort(flat, stable=True)
        xs = x.index_select(0, order // k)  # pair p = (token p // k, slot p % k), sorted by expert
        counts = torch.zeros(self.num_experts, dtype=torch.int32, device=x.device)
        counts.scatter_add_(0, flat.to(torch.int64), torch.ones_like(flat, dtype=torch.int32))
        if self.use_grouped_mm is None:
            self.use_grouped_mm = _grouped_mm_works(x, self.gate_up_proj.weight)
        ys = None
        if self.use_grouped_mm:
            try:
                offs = torch.cumsum(counts, dim=0, dtype=torch.int32)
                gate, up = _grouped_mm(xs, self.gate_up_proj.weight, offs).chunk(2, dim=-1)
                ys = _grouped_mm(gelu_tanh(gate) * up, self.down_proj.weight, offs)
            except RuntimeError as e:  # a layout or build this torch's kernel rejects: loop instead
                warnings.warn(f"grouped_mm unavailable here ({str(e).splitlines()[0]}); looping over experts")
                self.use_grouped_mm = False
        if ys is None:
            ys = self._per_expert(xs, counts)
        y = torch.empty_like(ys)
        y.index_copy_(0, order, ys)  # back to (token, slot) order
        y = y.view(N, k, -1)
        return (y * weights[..., None].to(y.dtype)).sum(dim=1)

    def _every_expert(self, x: torch.Tensor, idx: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        """Training: every token through every expert, the unrouted ones weighted 0. The same sum
        as the routed path, with no sort, no host sync and no data-dependent shapes, at E/k times
        the expert FLOPs (cheap for a small model's few experts)."""
        gate, up = torch.einsum("nh,eoh->eno", x, self.gate_up_proj.weight).chunk(2, dim=-1)
        ys = torch.einsum("eni,ehi->enh", gelu_tanh(gate) * up, self.down_proj.weight)  # [E, N, H]
        dense = torch.zeros(x.shape[0], self.num_experts, dtype=weights.dtype, device=x.device)
        dense = dense.scatter(1, idx, weights)  # [N, E]: differentiable in the router's weights
        return torch.einsum("enh,ne->nh", ys, dense.to(ys.dtype))

    def _per_expert(self, xs: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
        out = torch.empty(xs.shape[0], self.down_proj.weight.shape[1], dtype=xs.dtype, device=xs.device)
        start = 0
        for e, n in enumerate(counts.tolist()):
            if n:
                rows = xs[start : start + n]
                gate, up = F.linear(rows, self.gate_up_proj.weight[e]).chunk(2, dim=-1)
                out[start : start + n] = F.linear(gelu_tanh(gate) * up, self.down_proj.weight[e])
                start += n
        return out


def _grouped_mm(x: torch.Tensor, w: torch.Tensor, offs: torch.Tensor) -> torch.Tensor:
    # w [E, out, in]: grouped_mm wants [E, in, out], and takes the transposed view as is
    return F.grouped_mm(x, w.transpose(-1, -2), offs=offs)


def _grouped_mm_works(x: torch.Tensor, w: torch.Tensor) -> bool:
    """grouped_mm exists for this device and dtype (CUDA: bf16 on SM80+; CPU: any float)."""
    if not hasattr(F, "grouped_mm"):
        return False
    if x.device.type == "cuda":
        return w.dtype == torch.bfloat16 and torch.cuda.get_device_capability(x.device) >= (8, 0)
    if x.device.type != "cpu":
        return False
    # the CPU kernel wants 16-byte aligned rows; tiny test shapes in bf16 may not have them
    return all(s * w.element_size() % 16 == 0 for s in w.shape[1:])


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
        self.layer_scalar = nn.Parameter(torch.ones(1), requires_grad=False)

    def forward(self, x, cache: LayerCache, offset: int, mask, write: bool):
        a = self.self_attn(self.input_layernorm(x), cache, offset, mask, write)
        r = x + self.post_attention_layernorm(a)

        dense = self.post_feedforward_layernorm_1(self.mlp(self.pre_feedforward_layernorm(r)))

        flat = r.reshape(-1, r.shape[-1])
        idx, w = self.router(flat)
        moe = self.experts(self.pre_feedforward_layernorm_2(flat), idx, w).view(r.shape)
        moe = self.post_feedforward_layernorm_2(moe)

        x = r + self.post_feedforward_layernorm(dense + moe)
        return x * self.layer_scalar


class SelfConditioning(nn.Module):
    """Turns the previous step's soft embedding into a signal added to the canvas embedding."""

    def __init__(self, config: ModelConfig):
        super().__init__()
        H = config.hidden_size
        self.pre_norm = RMSNorm(H, config.rms_norm_eps)
        self.gate_proj = Linear(H, config.intermediate_size)
        self.up_proj = Linear(H, config.intermediate_size)
        self.down_proj = Linear(config.intermediate_size, H)
        self.eps = config.rms_norm_eps

    def forward(self, canvas_embeds: torch.Tensor, soft_embeds: torch.Tensor | None) -> torch.Tensor:
        x = canvas_embeds
        if soft_embeds is not None:  # first step: the signal is exactly zero (no biases anywhere)
            n = self.pre_norm(soft_embeds)
            x = x + self.down_proj(gelu_tanh(self.gate_proj(n)) * self.up_proj(n))
        return rms_norm(x, None, self.eps)  # post_norm has no weight


def embed_scale(hidden_size: int) -> float:
    return math.sqrt(hidden_size)
