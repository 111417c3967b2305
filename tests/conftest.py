"""Shared fixtures: tiny random checkpoints written by transformers itself, built once per session."""

import os

import mlx.core as mx
import pytest

from mlx_diffgemma.testing import build_checkpoint

# MLX_DIFFGEMMA_TEST_DEVICE=cpu keeps MLX on the CPU where MLX's CUDA or Metal backend is installed
# (fp32 parity against torch and transformers is meant to be measured in exact fp32).
if os.environ.get("MLX_DIFFGEMMA_TEST_DEVICE"):
    mx.set_default_device(mx.cpu if os.environ["MLX_DIFFGEMMA_TEST_DEVICE"] == "cpu" else mx.gpu)

F, S = "full_attention", "sliding_attention"

# Three tiny geometries: different layer patterns, head counts, experts/top-k and windows.
CONFIGS = {
    "gemma-pattern": dict(text_overrides={}, canvas_length=32),
    "wide-gqa": dict(
        text_overrides=dict(
            num_hidden_layers=4, layer_types=[S, F, S, F], num_attention_heads=8, num_key_value_heads=4,
            head_dim=8, global_head_dim=16, num_global_key_value_heads=2, sliding_window=8,
            num_experts=4, top_k_experts=1,
        ),
        canvas_length=24,
        legacy_global_keys=True,
    ),
    "many-experts": dict(
        text_overrides=dict(
            num_hidden_layers=3, layer_types=[S, S, F], num_attention_heads=2, num_key_value_heads=1,
            head_dim=32, global_head_dim=64, num_global_key_value_heads=1, sliding_window=5,
            num_experts=16, top_k_experts=4, moe_intermediate_size=16,
        ),
        canvas_length=16,
        seed=7,
    ),
}


@pytest.fixture(scope="session", params=sorted(CONFIGS))
def tiny_checkpoint(request, tmp_path_factory):
    """(path, transformers model) for each tiny geometry."""
    path = tmp_path_factory.mktemp(request.param)
    return build_checkpoint(path, **CONFIGS[request.param])


@pytest.fixture(scope="session")
def gemma_checkpoint(tmp_path_factory):
    """The Gemma layer pattern (5 sliding + 1 full), canvas 32."""
    return build_checkpoint(tmp_path_factory.mktemp("gemma"), **CONFIGS["gemma-pattern"])


@pytest.fixture(scope="session")
def sharp_checkpoint(tmp_path_factory):
    """Peaked output distributions (canvas 8) so the stable-and-confident stop triggers."""
    return build_checkpoint(tmp_path_factory.mktemp("sharp"), canvas_length=8, seed=3, logit_gain=40.0)
