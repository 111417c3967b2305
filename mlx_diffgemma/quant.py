"""Quantization recipes: which format each module of DiffusionGemma is stored in.

A recipe maps the model's module groups (embedding, attention, router, dense MLP, self-conditioning,
experts) to a format: an MLX quantization mode with its bits and group size, or None (kept in the
unquantized dtype). The converter resolves a recipe to one choice per module and records every
choice in config.json's `quantization` block, so `load` rebuilds the same modules with no flags.

Sizes and bits-per-weight are computed from shapes alone (the model tree is built lazily), so the
table for the real 26B-A4B config needs no weights: `python -m mlx_diffgemma.quant`.
"""

from __future__ import annotations

from dataclasses import dataclass

import mlx.core as mx

# mode -> (allowed bits, allowed group sizes, default bits, default group size), as in mx.quantize
MODES = {
    "affine": ((2, 3, 4, 5, 6, 8), (32, 64, 128), 4, 64),
    "mxfp4": ((4,), (32,), 4, 32),
    "nvfp4": ((4,), (16,), 4, 16),
    "mxfp8": ((8,), (32,), 8, 32),
}

GROUPS = ("embed", "attention", "router", "mlp", "self_conditioning", "experts")


@dataclass(frozen=True)
class Format:
    """One quantized storage format (an `mx.quantize` mode with its bits and group size)."""

    bits: int
    group_size: int
    mode: str = "affine"

    @classmethod
    def make(cls, bits: int | None = None, group_size: int | None = None, mode: str = "affine") -> "Format":
        """A checked format; missing bits / group size take the mode's defaults."""
        if mode not in MODES:
            raise ValueError(f"--q-mode {mode!r} is not one of {', '.join(MODES)}")
        allowed_bits, allowed_groups, default_bits, default_group = MODES[mode]
        bits = default_bits if bits is None else int(bits)
        group_size = default_group if group_size is None else int(group_size)
        if bits not in allowed_bits:
            raise ValueError(f"--q-bits {bits} is not valid for mode {mode} (allowed: {_list(allowed_bits)})")
        if group_size not in allowed_groups:
            raise ValueError(
                f"--q-group-size {group_size} is not valid for mode {mode} (allowed: {_list(allowed_groups)})"
            )
        return cls(bits, group_size, mode)

    def as_dict(self) -> dict:
        return {"group_size": self.group_size, "bits": self.bits, "mode": self.mode}

    def __str__(self) -> str:
        return f"{self.mode}-{self.bits}b-g{self.group_size}" if self.mode == "affine" else self.mode


def _list(values) -> str:
    return ", ".join(str(v) for v in values)


Q8 = Format(8, 64, "affine")


@dataclass(frozen=True)
class Recipe:
    """A named choice of format per module group (None keeps the group unquantized)."""

    name: str
    formats: dict  # group -> Format | None
    about: str
    bulk: Format  # the format named by --q-bits / --q-group-size / --q-mode (top-level default)

    def format_for(self, path: str) -> Format | None:
        return self.formats[module_group(path)]


def _mixed(name: str, experts: Format, about: str) -> Recipe:
    # the field's lesson: noisier logits cost denoising steps and a coarse tied embedding hurts
    # convergence, so only the experts (90% of the weights) go below 8 bits; the router is tiny
    formats = dict(embed=Q8, attention=Q8, router=None, mlp=Q8, self_conditioning=Q8, experts=experts)
    return Recipe(name, formats, about, experts)


def _uniform(name: str, fmt: Format, about: str) -> Recipe:
    return Recipe(name, {g: fmt for g in GROUPS}, about, fmt)


# The parametric recipes: --q-bits / --q-group-size / --q-mode set their bulk format.
PARAMETRIC = {
    "mixed": lambda f: _mixed("mixed", f, "experts in the given format (default affine 4-bit g64); "
                              "embedding, attention, dense MLP, self-conditioning affine 8-bit g64; router unquantized"),
    "uniform": lambda f: _uniform("uniform", f, "every linear layer, the experts and the embedding in one format"),
}

RECIPES = {
    "mixed": PARAMETRIC["mixed"](Format(4, 64)),
    "q4": _uniform("q4", Format(4, 64), "uniform affine 4-bit g64 (mlx-lm's plain -q)"),
    "q8": _uniform("q8", Q8, "uniform affine 8-bit g64"),
    "mxfp4": _mixed("mxfp4", Format(4, 32, "mxfp4"), "experts mxfp4; the rest as in mixed"),
    "nvfp4": _mixed("nvfp4", Format(4, 16, "nvfp4"), "experts nvfp4; the rest as in mixed"),
    "mxfp8": _mixed("mxfp8", Format(8, 32, "mxfp8"), "experts mxfp8; the rest as in mixed"),
}
DEFAULT_RECIPE = "mixed"


def get_recipe(name: str | None = None, bits=None, group_size=None, mode=None) -> Recipe:
    """The named recipe; for `mixed` and `uniform` the --q-* options set the bulk format."""
    name = name or DEFAULT_RECIPE
    if name == "uniform" or (name == "mixed" and (bits, group_size, mode) != (None, None, None)):
        return PARAMETRIC[name](Format.make(bits, group_size, mode or "affine"))
    if name not in RECIPES:
        raise ValueError(f"--recipe {name!r} is unknown; choose one of {', '.join(sorted({*RECIPES, 'uniform'}))}")
    if (bits, group_size, mode) != (None, None, None):
        raise ValueError(
            f"--recipe {name} fixes its formats; --q-bits/--q-group-size/--q-mode apply to "
            "--recipe mixed (the experts) or --recipe uniform (everything)"
        )
    return RECIPES[name]


def module_group(path: str) -> str:
    """The recipe group of a quantizable module path (engine names)."""
    if path == "embed_tokens":
        return "embed"
    if path.startswith("self_conditioning."):
        return "self_conditioning"
    if ".self_attn." in path:
        return "attention"
    if ".router." in path:
        return "router"
    if ".experts." in path:
        return "experts"
    if ".mlp." in path:
        return "mlp"
    raise ValueError(f"{path}: no recipe group for this module")


def quantizable_modules(model) -> dict[str, tuple[int, ...]]:
    """path -> weight shape of every module that has a quantized form (Linear, Embedding, SwitchLinear)."""
    return {
        path: tuple(m.weight.shape)
        for path, m in model.named_modules()
        if hasattr(m, "to_quantized") and "weight" in m
    }


def resolve(recipe: Recipe, modules: dict[str, tuple[int, ...]]) -> dict[str, Format | None]:
    """One choice per module; refuses a group size that does not divide a module's input width."""
    choices = {}
    for path, shape in sorted(modules.items()):
        fmt = recipe.format_for(path)
        if fmt is not None and shape[-1] % fmt.group_size:
            raise ValueError(
                f"{path}: input width {shape[-1]} is not a multiple of group size {fmt.group_size} "
                f"({fmt}); pick a group size that divides it"
            )
        choices[path] = fmt
    return choices


def quantization_block(recipe: Recipe, choices: dict[str, Format | None]) -> dict:
    """config.json's `quantization` block: the bulk format as the default plus every module's choice
    (False = unquantized), mlx-lm's per-module convention."""
    block = {**recipe.bulk.as_dict(), "recipe": recipe.name}
    for path, fmt in choices.items():
        block[path] = fmt.as_dict() if fmt is not None else False
    return block


def quantized_parts(shape, fmt: Format, dtype: mx.Dtype) -> list[tuple[str, tuple, mx.Dtype]]:
    """(suffix, shape, dtype) of the arrays `mx.quantize` makes from a weight of `shape`.

    Taken from MLX itself on a lazy one-row array (nothing is computed), so it can never drift."""
    parts = mx.quantize(mx.zeros((1, shape[-1]), dtype), fmt.group_size, fmt.bits, mode=fmt.mode)
    names = ("weight", "scales", "biases")
    return [(n, tuple(shape[:-1]) + (p.shape[-1],), p.dtype) for n, p in zip(names, parts)]


def stored_bytes(shape, fmt: Format | None, dtype: mx.Dtype) -> int:
    """Bytes a weight of `shape` takes on disk in `fmt` (None: unquantized in `dtype`)."""
    if fmt is None:
        return _numel(shape) * dtype.size
    return sum(_numel(s) * d.size for _, s, d in quantized_parts(shape, fmt, dtype))


def _numel(shape) -> int:
    n = 1
    for d in shape:
        n *= int(d)
    return n


def recipe_size(recipe: Recipe | None, config, dtype: mx.Dtype = mx.bfloat16) -> dict:
    """Bytes, parameters and bits per weight of the whole text model under `recipe` (None = unquantized),
    from shapes only, with per-group bytes."""
    from mlx.utils import tree_flatten

    from .model import DiffusionGemma

    model = DiffusionGemma(config)  # lazy: nothing is allocated
    modules = quantizable_modules(model)
    choices = resolve(recipe, modules) if recipe else {p: None for p in modules}
    total, params, by_group = 0, 0, {g: 0 for g in GROUPS}
    by_group["other"] = 0
    for name, p in tree_flatten(model.parameters()):
        path = name.rsplit(".", 1)[0]
        params += p.size
        if name.endswith(".weight") and path in choices:
            n = stored_bytes(p.shape, choices[path], dtype)
            by_group[module_group(path)] += n
        else:
            n = p.size * dtype.size
            by_group["other"] += n
        total += n
    return {"bytes": total, "parameters": params, "bits_per_weight": 8 * total / params, "by_group": by_group}


def size_table(config, dtype: mx.Dtype = mx.bfloat16) -> str:
    """Markdown table of every recipe's size for `config` (shapes only)."""
    rows = [("none (bf16)", None)] + [(name, RECIPES[name]) for name in RECIPES]
    lines = [
        "| recipe | experts | embedding | attention | router | dense MLP | self-cond | bits/weight | size (GB) | size (GiB) |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for name, recipe in rows:
        s = recipe_size(recipe, config, dtype)
        f = (lambda g: str(recipe.formats[g]) if recipe and recipe.formats[g] else "bf16")
        lines.append(
            f"| {name} | {f('experts')} | {f('embed')} | {f('attention')} | {f('router')} | {f('mlp')} "
            f"| {f('self_conditioning')} | {s['bits_per_weight']:.2f} | {s['bytes'] / 1e9:.2f} | {s['bytes'] / 2**30:.2f} |"
        )
    return "\n".join(lines)


REAL_TEXT_CONFIG = dict(
    vocab_size=262144, hidden_size=2816, intermediate_size=2112, num_hidden_layers=30,
    num_attention_heads=16, num_key_value_heads=8, head_dim=256, global_head_dim=512,
    num_global_key_value_heads=2, sliding_window=1024, num_experts=128, top_k_experts=8,
    moe_intermediate_size=704,
)


def real_config():
    """The released google/diffusiongemma-26B-A4B-it text geometry (reference spec 1.1)."""
    from .config import ModelConfig

    return ModelConfig.from_dict({"model_type": "diffusion_gemma", "text_config": dict(REAL_TEXT_CONFIG)})


if __name__ == "__main__":
    print(size_table(real_config()))
