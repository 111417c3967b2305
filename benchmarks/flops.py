"""Model FLOPs of one step, from the config alone (multiply-adds count as two FLOPs).

A diffusion step runs every canvas row through every layer, the tied head and the full-vocabulary
self-conditioning (`softmax(z) @ E` and its MLP). An autoregressive step is one row, no
self-conditioning. Norms, softmaxes, RoPE and the sampler are left out: they are not GEMMs.
"""

from __future__ import annotations


def layer_flops_per_row(text: dict, kind: str, context: int) -> float:
    H, heads = text["hidden_size"], text["num_attention_heads"]
    if kind == "full_attention":
        D, kv, has_v = text["global_head_dim"], text["num_global_key_value_heads"], False
    else:
        D, kv, has_v = text["head_dim"], text["num_key_value_heads"], True
    proj = H * heads * D + H * kv * D * (2 if has_v else 1) + heads * D * H
    attention = 2 * heads * D * context  # QK^T and PV
    dense = 3 * H * text["intermediate_size"]
    router = H * text["num_experts"]
    experts = text["top_k_experts"] * 3 * H * text["moe_intermediate_size"]
    return 2.0 * (proj + attention + dense + router + experts)


def step_flops(text: dict, canvas: int, prefix: int, autoregressive: bool = False) -> float:
    """FLOPs of one full-width denoise step over `canvas` rows after `prefix` cached tokens, or
    (autoregressive) of one decode step after `prefix` tokens."""
    H, V, window = text["hidden_size"], text["vocab_size"], text["sliding_window"]
    rows = 1 if autoregressive else canvas
    total = 0.0
    for kind in text["layer_types"]:
        if autoregressive:
            context = min(prefix + 1, window) if kind == "sliding_attention" else prefix + 1
        else:
            context = (min(prefix, window - 1) if kind == "sliding_attention" else prefix) + canvas
        total += layer_flops_per_row(text, kind, context)
    total += 2.0 * H * V  # tied head
    if not autoregressive:
        total += 2.0 * V * H + 2.0 * 3 * H * text["intermediate_size"]  # self-conditioning
    return rows * total
