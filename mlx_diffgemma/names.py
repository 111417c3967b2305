"""Checkpoint tensor names -> the engine's module names, once, at the load boundary.

Framework-free (values pass through untouched), so the MLX model, the converter and the torch
backend share one mapping.
"""

from __future__ import annotations


def sanitize(weights: dict, config=None) -> dict:
    """Map a checkpoint's tensor names onto this module tree, once, at the load boundary.

    Accepts raw HF names (`model.decoder.*`, or `model.encoder.language_model.*` when only that copy
    exists) and our converted names (already bare). Drops the vision tower, rotary buffers and a
    stray `lm_head` (the head is the tied embedding)."""
    dec = "model.decoder."
    enc = "model.encoder.language_model."
    has_decoder = any(k.startswith(dec) for k in weights)
    out = {}
    for name, w in weights.items():
        if name.startswith(dec):
            name = name[len(dec) :]
        elif name.startswith(enc):
            if has_decoder:
                continue  # duplicate layer_scalars (checked by the converter) or tied copies
            name = name[len(enc) :]
        elif name.startswith("model.") or name.startswith("lm_head"):
            continue  # vision tower, embed_vision, lm_head
        if "rotary_emb" in name:
            continue
        if name.endswith("experts.gate_up_proj") or name.endswith("experts.down_proj"):
            name += ".weight"
        out[name] = w
    return out
