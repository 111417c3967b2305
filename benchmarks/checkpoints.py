"""Random-weight checkpoints at the named sizes, written once per size and reused by every system.

One weight set per size, two layouts:
- `hf/`: the Hugging Face DiffusionGemma layout (config.json, sharded safetensors, tokenizer,
  generation_config.json). Read as is by this engine, transformers and mlx-vlm. config.json also
  carries `global_head_dim` / `num_global_key_value_heads` in `text_config` (mlx-vlm and mlx-lm
  read only those) and generation_config.json real sampler values (mlx-vlm fails on nulls).
- `ar/`: the autoregressive twin for mlx-lm's `gemma4_text`: its config.json and the tokenizer.
  Its weights are the `hf/` shards read through `ar_weight_name` (model.decoder.* -> model.*,
  self-conditioning and encoder copies dropped), so the full model is never stored twice.

Weights are drawn per tensor from numpy (seeded by the tensor's name), so building a size needs
one shard of memory at a time and never instantiates the model; transformers supplies only the
names and shapes (on the meta device).
"""

from __future__ import annotations

import json
import tempfile
import zlib
from pathlib import Path

import numpy as np

from .sizes import SIZES, text_config

SHARD_BYTES = 2 << 30
FORMAT = 2  # bump when the layout changes, so stale checkpoints are rebuilt


def shard_groups(sizes: dict[str, int], limit: int) -> list[list[str]]:
    """Tensor names, in the given order, packed into consecutive shards of at most `limit` bytes
    (a tensor larger than `limit` gets a shard of its own), as the hub's checkpoints are split."""
    shards: list[list[str]] = [[]]
    total = 0
    for name, n in sizes.items():
        if shards[-1] and total + n > limit:
            shards.append([])
            total = 0
        shards[-1].append(name)
        total += n
    return shards


def generation_config(canvas_length: int) -> dict:
    """The released checkpoint's sampler settings (landscape.md section 1)."""
    from mlx_diffgemma.testing import reference_generation_config

    return reference_generation_config(canvas_length)


def ar_config(text: dict) -> dict:
    """mlx-lm `gemma4_text` config for the diffusion backbone (K=V global layers, MoE block,
    no per-layer inputs, no KV sharing)."""
    return dict(
        model_type="gemma4_text",
        hidden_size=text["hidden_size"],
        num_hidden_layers=text["num_hidden_layers"],
        intermediate_size=text["intermediate_size"],
        num_attention_heads=text["num_attention_heads"],
        head_dim=text["head_dim"],
        global_head_dim=text["global_head_dim"],
        num_key_value_heads=text["num_key_value_heads"],
        num_global_key_value_heads=text["num_global_key_value_heads"],
        num_kv_shared_layers=0,
        hidden_size_per_layer_input=0,
        vocab_size=text["vocab_size"],
        vocab_size_per_layer_input=text["vocab_size"],
        sliding_window=text["sliding_window"],
        layer_types=text["layer_types"],
        max_position_embeddings=text["max_position_embeddings"],
        attention_k_eq_v=True,
        enable_moe_block=True,
        num_experts=text["num_experts"],
        top_k_experts=text["top_k_experts"],
        moe_intermediate_size=text["moe_intermediate_size"],
        final_logit_softcapping=30.0,
        rms_norm_eps=1e-6,
        tie_word_embeddings=True,
        rope_parameters={
            "full_attention": {"partial_rotary_factor": 0.25, "rope_theta": 1000000.0, "rope_type": "proportional"},
            "sliding_attention": {"partial_rotary_factor": 1.0, "rope_theta": 10000.0, "rope_type": "default"},
        },
        eos_token_id=[],
    )


def ar_weight_name(name: str) -> str | None:
    """The AR twin's name for an hf/ tensor, or None where the twin has no such tensor."""
    prefix = "model.decoder."
    if not name.startswith(prefix) or name.startswith(prefix + "self_conditioning."):
        return None
    return "model." + name[len(prefix) :]


def _hf_config(text: dict, canvas_length: int):
    from transformers import DiffusionGemmaConfig

    from mlx_diffgemma.testing import tiny_vision_config

    return DiffusionGemmaConfig(text_config=text, vision_config=tiny_vision_config(), canvas_length=canvas_length)


def _saved_names(text: dict, canvas_length: int) -> set[str]:
    """The tensor names save_pretrained writes for this layer pattern (tied copies left out),
    learnt from the same pattern at tiny widths."""
    import torch
    from safetensors import safe_open
    from transformers import DiffusionGemmaForBlockDiffusion

    small = dict(text, hidden_size=32, intermediate_size=32, num_attention_heads=2, num_key_value_heads=1,
                 head_dim=8, global_head_dim=16, num_global_key_value_heads=1, num_experts=4,
                 top_k_experts=2, moe_intermediate_size=8, vocab_size=64)
    torch.manual_seed(0)
    model = DiffusionGemmaForBlockDiffusion(_hf_config(small, canvas_length))
    with tempfile.TemporaryDirectory() as tmp:
        model.save_pretrained(tmp)
        names = set()
        for f in Path(tmp).glob("*.safetensors"):
            with safe_open(f, "np") as s:
                names.update(s.keys())
    return names


def _shapes(text: dict, canvas_length: int) -> dict[str, tuple[int, ...]]:
    import torch
    from transformers import DiffusionGemmaForBlockDiffusion

    with torch.device("meta"):
        model = DiffusionGemmaForBlockDiffusion(_hf_config(text, canvas_length))
    return {k: tuple(v.shape) for k, v in model.state_dict().items()}


def _draw(name: str, shape: tuple[int, ...], seed: int, std: float) -> np.ndarray:
    """One tensor, seeded by its name. Norm weights, router scales and layer scalars are drawn
    around one (a fresh init sets them to exactly one); matrices are N(0, std)."""
    base = name.replace("model.encoder.language_model.", "model.decoder.")  # tied scalars stay equal
    rng = np.random.default_rng([seed, zlib.crc32(base.encode())])
    if base.endswith("layer_scalar"):
        return (0.6 + 0.8 * rng.random(shape, dtype=np.float32)).astype(np.float32)
    if base.endswith("norm.weight") or base.endswith("router.scale") or base.endswith("per_expert_scale"):
        return (0.5 + rng.random(shape, dtype=np.float32)).astype(np.float32)
    return rng.standard_normal(shape, dtype=np.float32) * np.float32(std)


def _draw_cuda(name: str, shape: tuple[int, ...], seed: int, std: float):
    """As `_draw`, drawn on the GPU (a 25B-parameter model in seconds rather than minutes)."""
    import torch

    base = name.replace("model.encoder.language_model.", "model.decoder.")
    g = torch.Generator(device="cuda").manual_seed(seed * 2**32 + zlib.crc32(base.encode()))
    if base.endswith("layer_scalar"):
        return 0.6 + 0.8 * torch.rand(shape, generator=g, device="cuda")
    if base.endswith("norm.weight") or base.endswith("router.scale") or base.endswith("per_expert_scale"):
        return 0.5 + torch.rand(shape, generator=g, device="cuda")
    return torch.randn(shape, generator=g, device="cuda") * std


def build(size: str, root: Path, dtype: str = "float32", seed: int = 0, log=print) -> dict[str, Path]:
    """Write (once) the `hf/` and `ar/` layouts of `size` under root/<size>-<dtype>/; returns both paths."""
    import torch
    from safetensors.torch import save_file

    from mlx_diffgemma.files import atomic_dir
    from mlx_diffgemma.testing import build_tokenizer

    text = text_config(size)
    canvas_length = SIZES[size]["canvas_length"]
    out = Path(root) / f"{size}-{dtype}"
    marker = out / "built.json"
    recipe = dict(format=FORMAT, size=size, dtype=dtype, seed=seed, text=text, canvas_length=canvas_length,
                  drawn_on="cuda" if torch.cuda.is_available() else "numpy")
    if marker.exists() and json.loads(marker.read_text()) == recipe:
        return {"hf": out / "hf", "ar": out / "ar"}

    log(f"building {size} ({dtype}) checkpoint in {out}")
    with atomic_dir(out, "building") as tmp:
        hf, ar = tmp / "hf", tmp / "ar"
        hf.mkdir()
        ar.mkdir()
        _hf_config(text, canvas_length).save_pretrained(hf)
        cfg = json.loads((hf / "config.json").read_text())
        cfg["text_config"]["global_head_dim"] = text["global_head_dim"]
        cfg["text_config"]["num_global_key_value_heads"] = text["num_global_key_value_heads"]
        cfg["dtype"] = dtype
        (hf / "config.json").write_text(json.dumps(cfg, indent=2))
        (hf / "generation_config.json").write_text(json.dumps(generation_config(canvas_length), indent=2))
        tokenizer = build_tokenizer()
        tokenizer.save_pretrained(hf)
        tokenizer.save_pretrained(ar)
        (ar / "config.json").write_text(json.dumps(ar_config(text), indent=2))

        names = _saved_names(text, canvas_length)
        shapes = _shapes(text, canvas_length)
        missing = names - shapes.keys()
        if missing:
            raise RuntimeError(f"names without shapes: {sorted(missing)[:5]}")
        torch_dtype = getattr(torch, dtype)
        itemsize = torch.tensor([], dtype=torch_dtype).element_size()
        shards = shard_groups({n: int(np.prod(shapes[n])) * itemsize for n in sorted(names)}, SHARD_BYTES)
        weight_map, total = {}, 0
        std = float(text.get("initializer_range", 0.02))
        for i, group in enumerate(shards):
            fname = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
            if torch.cuda.is_available():
                tensors = {n: _draw_cuda(n, shapes[n], seed, std).to(torch_dtype).cpu() for n in group}
            else:
                tensors = {n: torch.from_numpy(_draw(n, shapes[n], seed, std)).to(torch_dtype) for n in group}
            total += sum(t.numel() * t.element_size() for t in tensors.values())
            save_file(tensors, str(hf / fname), metadata={"format": "pt"})
            weight_map.update({n: fname for n in group})
            del tensors
        index = {"metadata": {"total_size": total}, "weight_map": weight_map}
        (hf / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))
        (tmp / "built.json").write_text(json.dumps(recipe, indent=2))
    log(f"built {size}: {total / 2**30:.2f} GiB of weights")
    return {"hf": out / "hf", "ar": out / "ar"}


def main(argv=None):
    """`python -m benchmarks.checkpoints SIZE ROOT [--dtype float32]`: build (once) and print the paths."""
    import argparse

    parser = argparse.ArgumentParser(description=main.__doc__)
    parser.add_argument("size", choices=sorted(SIZES))
    parser.add_argument("root")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    Path(args.root).mkdir(parents=True, exist_ok=True)
    paths = build(args.size, Path(args.root), args.dtype, args.seed, log=lambda m: print(m, flush=True))
    print(json.dumps({k: str(v) for k, v in paths.items()}))


if __name__ == "__main__":
    main()
