"""Reading checkpoint configs, and the full 26B-A4B geometry instantiated lazily."""

import json

import pytest
from mlx.utils import tree_flatten

from mlx_diffgemma.config import ConfigError, GenerationConfig, ModelConfig, load_configs
from mlx_diffgemma.loading import LoadError, load
from mlx_diffgemma.model import DiffusionGemma

# The released checkpoint's text config (reference spec, section 1.1), written the 5.11 way.
REAL_TEXT_CONFIG = dict(
    vocab_size=262144, hidden_size=2816, intermediate_size=2112, num_hidden_layers=30,
    num_attention_heads=16, num_key_value_heads=8, head_dim=256, global_head_dim=512,
    num_global_key_value_heads=2, sliding_window=1024, num_experts=128, top_k_experts=8,
    moe_intermediate_size=704, rms_norm_eps=1e-6, final_logit_softcapping=30.0,
    max_position_embeddings=262144,
)


def real_config(**text):
    return {"model_type": "diffusion_gemma", "canvas_length": 256, "eos_token_id": [1, 106],
            "text_config": {**REAL_TEXT_CONFIG, **text}}


def test_full_model_shapes_and_parameter_count():
    model = DiffusionGemma(ModelConfig.from_dict(real_config()))  # lazy: nothing is allocated
    shapes = {k: v.shape for k, v in tree_flatten(model.parameters())}
    full = [5, 11, 17, 23, 29]
    assert [i for i, s in enumerate(model.config.layers) if not s.is_sliding] == full
    expect = {
        "embed_tokens.weight": (262144, 2816),
        "norm.weight": (2816,),
        "self_conditioning.gate_proj.weight": (2112, 2816),
        "self_conditioning.down_proj.weight": (2816, 2112),
        "layers.0.self_attn.q_proj.weight": (4096, 2816),
        "layers.0.self_attn.k_proj.weight": (2048, 2816),
        "layers.0.self_attn.v_proj.weight": (2048, 2816),
        "layers.0.self_attn.o_proj.weight": (2816, 4096),
        "layers.0.self_attn.q_norm.weight": (256,),
        "layers.5.self_attn.q_proj.weight": (8192, 2816),
        "layers.5.self_attn.k_proj.weight": (1024, 2816),
        "layers.5.self_attn.o_proj.weight": (2816, 8192),
        "layers.5.self_attn.k_norm.weight": (512,),
        "layers.0.mlp.gate_proj.weight": (2112, 2816),
        "layers.0.mlp.down_proj.weight": (2816, 2112),
        "layers.0.router.proj.weight": (128, 2816),
        "layers.0.router.scale": (2816,),
        "layers.0.router.per_expert_scale": (128,),
        "layers.0.experts.gate_up_proj.weight": (128, 1408, 2816),
        "layers.0.experts.down_proj.weight": (128, 2816, 704),
        "layers.0.layer_scalar": (1,),
    }
    for name, shape in expect.items():
        assert shapes[name] == shape, name
    assert not any(f"layers.{i}.self_attn.v_proj.weight" in shapes for i in full)
    total = sum(v.size for _, v in tree_flatten(model.parameters()))
    assert total == pytest.approx(25.2e9, rel=0.01)


def test_global_sizes_read_both_ways():
    legacy = ModelConfig.from_dict(real_config())
    per_layer = {str(i): {"head_dim": 512, "num_key_value_heads": 2} for i in (5, 11, 17, 23, 29)}
    text = {k: v for k, v in REAL_TEXT_CONFIG.items() if k not in ("global_head_dim", "num_global_key_value_heads")}
    modern = ModelConfig.from_dict({**real_config(), "text_config": {**text, "per_layer_config": per_layer}})
    assert legacy.layers == modern.layers
    assert modern.layers[5].head_dim == 512 and modern.layers[5].num_kv_heads == 2
    assert modern.layers[4].head_dim == 256 and modern.layers[4].num_kv_heads == 8
    assert modern.layers[5].rope_type == "proportional" and modern.layers[5].partial_rotary_factor == 0.25


def test_global_sizes_as_transformers_writes_them():
    # transformers zero-pads per_layer_config keys ("05" in a 30-layer model): read what it writes,
    # not what a hand-written dict looks like
    from transformers import DiffusionGemmaConfig

    from mlx_diffgemma.testing import tiny_vision_config

    text = {k: v for k, v in REAL_TEXT_CONFIG.items() if k not in ("global_head_dim", "num_global_key_value_heads")}
    written = DiffusionGemmaConfig(text_config={**text, "global_head_dim": 512, "num_global_key_value_heads": 2},
                                   vision_config=tiny_vision_config(), canvas_length=256).to_dict()
    ours = ModelConfig.from_dict(written)
    assert ours.layers == ModelConfig.from_dict(real_config()).layers
    assert [i for i, spec in enumerate(ours.layers) if spec.num_kv_heads == 2] == [5, 11, 17, 23, 29]


@pytest.mark.parametrize(
    "config, message",
    [
        ({"model_type": "gemma4", "text_config": REAL_TEXT_CONFIG}, "model_type is 'gemma4'"),
        ({"model_type": "diffusion_gemma"}, "text_config"),
        (real_config(num_experts=None), "text_config.num_experts is missing"),
        (real_config(per_layer_config={"five": {"head_dim": 512}}), "per_layer_config keys must be layer indices"),
    ],
)
def test_bad_configs_say_what_is_wrong(config, message):
    with pytest.raises(ConfigError, match=message):
        ModelConfig.from_dict(config)


def test_generation_config_reads_the_shipped_file(tmp_path):
    shipped = {
        "max_new_tokens": 256, "max_denoising_steps": 48, "t_min": 0.4, "t_max": 0.8,
        "sampler_config": {"_cls_name": "EntropyBoundSamplerConfig", "entropy_bound": 0.1},
        "stability_threshold": 1, "confidence_threshold": 0.005, "eos_token_id": [1, 106, 50], "pad_token_id": 0,
    }
    gen = GenerationConfig.from_dict(shipped)
    assert gen == GenerationConfig()
    # a freshly saved tiny model has nulls everywhere: the reference defaults apply
    assert GenerationConfig.from_dict({k: None for k in shipped}) == GenerationConfig()
    assert GenerationConfig.from_dict({"sampler_config": {"entropy_bound": 0.3}}).entropy_bound == 0.3
    with pytest.raises(ConfigError, match="t_min"):
        GenerationConfig.from_dict({"t_min": 0.9, "t_max": 0.8})


def test_load_errors_are_one_line(tmp_path, gemma_checkpoint):
    with pytest.raises(LoadError, match="no such directory"):
        load(tmp_path / "missing")
    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(LoadError, match="not valid JSON"):
        load(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps(real_config()))
    with pytest.raises(LoadError, match="no \\*.safetensors"):
        load(tmp_path)
    path, _ = gemma_checkpoint
    config, gen = load_configs(path)
    assert config.canvas_length == 32 and gen.eos_token_id == [1, 5, 11]
