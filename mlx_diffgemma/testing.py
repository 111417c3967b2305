"""Random-weight DiffusionGemma checkpoints built with transformers itself (tests, benchmarks).

Needs the `test` extra (torch, transformers). Nothing here is used at inference time.
"""

from __future__ import annotations

import json
from pathlib import Path

SPECIAL_TOKENS = [
    "<pad>", "<eos>", "<bos>", "<unk>",  # ids 0-3, as in Gemma
    "<|turn>", "<turn|>", "<|channel>", "<channel|>", "<|think|>",
    "<|tool_call>", "<tool_call|>", "<|tool_response>", "<tool_response|>",
]

# A Gemma-4-shaped chat template of our own (the real checkpoint ships its own).
CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{%- set sys = messages[0]['content'] if messages and messages[0]['role'] == 'system' else none -%}"
    "{%- if enable_thinking or sys is not none -%}"
    "<|turn>system{{ '\\n' }}{%- if enable_thinking -%}<|think|>{{ '\\n' }}{%- endif -%}"
    "{%- if sys is not none -%}{{ sys }}{%- endif -%}<turn|>{{ '\\n' }}"
    "{%- endif -%}"
    "{%- for m in messages -%}{%- if m['role'] != 'system' -%}"
    "<|turn>{{ 'model' if m['role'] == 'assistant' else m['role'] }}{{ '\\n' }}{{ m['content'] }}<turn|>{{ '\\n' }}"
    "{%- endif -%}{%- endfor -%}"
    "{%- if add_generation_prompt -%}<|turn>model{{ '\\n' }}"
    "{%- if not enable_thinking -%}<|channel>thought{{ '\\n' }}<channel|>{%- endif -%}"
    "{%- endif -%}"
)

_CORPUS = [
    "user model system thought",
    "The quick brown fox jumps over the lazy dog.",
    "Diffusion models refine a whole canvas of tokens at once, step by step.",
    "Write a short poem about the sea. Why is the sky blue? 0123456789 + - * / = ( ) [ ] { }",
    "Sudoku rows columns boxes digits solve puzzle grid cell",
]


def build_tokenizer(vocab_size: int = 320):
    """A small byte-level BPE tokenizer with Gemma's special-token layout (pad 0, eos 1, bos 2)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(_CORPUS * 4, trainer=trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<bos>", eos_token="<eos>", pad_token="<pad>", unk_token="<unk>"
    )
    fast.chat_template = CHAT_TEMPLATE
    return fast


def tiny_text_config(vocab_size: int, **overrides) -> dict:
    cfg = dict(
        vocab_size=vocab_size,
        hidden_size=64,
        intermediate_size=96,
        num_hidden_layers=6,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=16,
        global_head_dim=32,
        num_global_key_value_heads=1,
        sliding_window=16,
        num_experts=8,
        top_k_experts=2,
        moe_intermediate_size=32,
        max_position_embeddings=4096,
        initializer_range=0.2,
    )
    cfg.update(overrides)
    return cfg


def tiny_vision_config() -> dict:
    return dict(hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
                num_key_value_heads=2, head_dim=8)


def reference_generation_config(canvas_length: int) -> dict:
    """The released checkpoint's sampler settings (reference spec 1.4), with this tokenizer's EOS ids."""
    return dict(
        max_new_tokens=canvas_length,
        max_denoising_steps=48,
        sampler_config={"entropy_bound": 0.1, "_cls_name": "EntropyBoundSamplerConfig"},
        t_min=0.4,
        t_max=0.8,
        stability_threshold=1,
        confidence_threshold=0.005,
        eos_token_id=[1, SPECIAL_TOKENS.index("<turn|>"), SPECIAL_TOKENS.index("<|tool_response>")],
        pad_token_id=0,
        bos_token_id=2,
    )


def build_checkpoint(
    out_dir,
    text_overrides: dict | None = None,
    canvas_length: int = 32,
    seed: int = 0,
    generation: dict | None = None,
    dtype: str = "float32",
    max_shard_size: str | None = None,
    legacy_global_keys: bool = False,
    logit_gain: float = 1.0,
):
    """Write a random DiffusionGemmaForBlockDiffusion checkpoint with a tokenizer and chat template.

    Norm weights, router scales and layer scalars are randomised too (a fresh init sets them to
    one, which would hide mistakes such as `1 + weight`). `legacy_global_keys` rewrites config.json
    the transformers-5.11 way (global_head_dim / num_global_key_value_heads, no per_layer_config).
    `logit_gain` scales the tied embedding, sharpening the output distributions so that the
    sampler's entropy-based stop can trigger on random weights. Returns (path, transformers model).
    """
    import torch
    from transformers import DiffusionGemmaConfig, DiffusionGemmaForBlockDiffusion

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    tokenizer = build_tokenizer()
    text = tiny_text_config(len(tokenizer), **(text_overrides or {}))
    config = DiffusionGemmaConfig(
        text_config=text, vision_config=tiny_vision_config(), canvas_length=canvas_length
    )
    torch.manual_seed(seed)
    model = DiffusionGemmaForBlockDiffusion(config).eval()
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for name, p in model.model.decoder.named_parameters():
            if name.endswith("norm.weight") or name.endswith("router.scale"):
                p.copy_(torch.rand(p.shape, generator=g) + 0.5)
            elif name.endswith("per_expert_scale"):
                p.copy_(torch.rand(p.shape, generator=g) + 0.5)
        model.model.decoder.embed_tokens.weight.mul_(logit_gain)
        for i, layer in enumerate(model.model.decoder.layers):
            value = 0.6 + 0.8 * torch.rand(1, generator=g)
            layer.layer_scalar.copy_(value)
            model.model.encoder.language_model.layers[i].layer_scalar.copy_(value)
    model = model.to(getattr(torch, dtype))
    kwargs = {"max_shard_size": max_shard_size} if max_shard_size else {}
    model.save_pretrained(out_dir, **kwargs)
    tokenizer.save_pretrained(out_dir)

    gen = reference_generation_config(canvas_length)
    gen.update(generation or {})
    (out_dir / "generation_config.json").write_text(json.dumps(gen, indent=2))

    if legacy_global_keys:
        cfg_path = out_dir / "config.json"
        cfg = json.loads(cfg_path.read_text())
        cfg["text_config"].pop("per_layer_config", None)
        cfg["text_config"]["global_head_dim"] = text["global_head_dim"]
        cfg["text_config"]["num_global_key_value_heads"] = text["num_global_key_value_heads"]
        cfg_path.write_text(json.dumps(cfg, indent=2))
    return out_dir, model


def quantized_copy(src: Path, dst: Path) -> Path:
    """`src` quantized the way mlx-lm writes it (8-bit affine, layer 0's experts at 4 bits, the
    routers left in float), written to `dst`: loaders and trainers meet tensors we quantized."""
    import shutil

    import mlx.core as mx
    import mlx.nn as nn
    from mlx.utils import tree_flatten

    from . import load

    src, dst = Path(src), Path(dst)
    model, _ = load(src)
    overrides = {"layers.0.experts.gate_up_proj": {"group_size": 32, "bits": 4},
                 "layers.0.experts.down_proj": {"group_size": 32, "bits": 4}}

    used = {}  # the overrides that applied: a module too narrow for groups of 32 stays in float

    def predicate(path, module):
        if path.endswith("router.proj") or not hasattr(module, "to_quantized"):
            return False
        if module.weight.shape[-1] % 32:
            return False
        used[path] = overrides.get(path, True)
        return used[path]

    nn.quantize(model, group_size=32, bits=8, class_predicate=predicate)
    shutil.copytree(src, dst)
    for f in dst.glob("*.safetensors"):
        f.unlink()
    mx.save_safetensors(str(dst / "model.safetensors"), dict(tree_flatten(model.parameters())),
                        metadata={"format": "mlx"})
    cfg = json.loads((dst / "config.json").read_text())
    cfg["quantization"] = {"group_size": 32, "bits": 8, "mode": "affine",
                           **{p: v for p, v in used.items() if p in overrides},
                           **{f"layers.{i}.router.proj": False for i in range(len(model.layers))}}
    (dst / "config.json").write_text(json.dumps(cfg))
    return dst


def main(argv=None):
    """`python -m mlx_diffgemma.testing OUT_DIR`: write a tiny random checkpoint (meaningless text)."""
    import argparse

    parser = argparse.ArgumentParser(description=main.__doc__)
    parser.add_argument("out_dir")
    parser.add_argument("--canvas-length", type=int, default=32)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    path, _ = build_checkpoint(args.out_dir, canvas_length=args.canvas_length, seed=args.seed)
    print(path)


if __name__ == "__main__":
    main()
