"""`load(path)`: a converted MLX directory, a raw Hugging Face directory, or a hub id."""

from __future__ import annotations

import glob
import os
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn

from .config import ConfigError, load_configs
from .model import DiffusionGemma
from .names import sanitize

# models shipped inside the package (mlx_diffgemma/models/NAME), loadable by name: the Sudoku demo
# and the sort model that measures the fast path on answers shorter than a canvas
BUNDLED = ("sudoku", "sort")

# what a text-only load needs from a hub repo (the vision tower lives in the same shards)
HUB_PATTERNS = ["*.json", "*.safetensors", "*.jinja", "tokenizer*", "*.model"]


class LoadError(RuntimeError):
    """The model cannot be loaded; the message names the path and what to do."""


def resolve(path_or_id: str | os.PathLike, allow_patterns=HUB_PATTERNS) -> Path:
    """A local directory as is; otherwise a hub id, downloaded (only the files needed)."""
    p = Path(path_or_id).expanduser()
    if p.exists():
        if not p.is_dir():
            raise LoadError(f"{p}: not a directory (pass the model folder, not a file)")
        return p
    text = str(path_or_id)
    if text in BUNDLED:  # a model shipped inside the package, e.g. "sudoku"
        bundled = Path(__file__).parent / "models" / text
        if not (bundled / "config.json").exists():
            raise LoadError(f"{text}: the bundled model is missing from {bundled}; reinstall the package")
        return bundled
    if text.startswith((".", "/", "~")) or text.count("/") != 1:
        raise LoadError(f"{text}: no such directory, and not a hub id of the form 'owner/name'")
    try:
        from huggingface_hub import snapshot_download

        return Path(snapshot_download(text, allow_patterns=allow_patterns))
    except Exception as e:  # offline, unknown repo, gated repo: one line, no traceback
        reason = type(e).__name__
        raise LoadError(
            f"{text}: could not download from the Hugging Face hub ({reason}); "
            "pass a local directory, or check the network / HF_TOKEN"
        ) from None


def load_weights_dict(model_dir: Path) -> dict[str, mx.array]:
    files = sorted(glob.glob(str(model_dir / "*.safetensors")))
    if not files:
        raise LoadError(f"{model_dir}: no *.safetensors files found")
    weights = {}
    for f in files:
        try:
            weights.update(mx.load(f))
        except Exception as e:
            raise LoadError(f"{f}: cannot read safetensors ({e}); re-download or re-convert it") from None
    return weights


def build_model(model_dir: Path, dtype: mx.Dtype | None = None, lazy: bool = False) -> DiffusionGemma:
    try:
        config, gen = load_configs(model_dir)
    except ConfigError as e:
        raise LoadError(str(e)) from None
    model = DiffusionGemma(config)
    weights = sanitize(load_weights_dict(model_dir), config)
    if config.quantization:
        _quantize_like_checkpoint(model, config.quantization, weights)
    if dtype is not None:
        weights = {k: (v.astype(dtype) if mx.issubdtype(v.dtype, mx.floating) else v) for k, v in weights.items()}
    try:
        model.load_weights(list(weights.items()), strict=True)
    except ValueError as e:
        raise LoadError(f"{model_dir}: weights do not match config.json ({e})") from None
    model.generation_config = gen
    if not lazy:
        mx.eval(model.parameters())
    return model


def _quantize_like_checkpoint(model: nn.Module, q: dict, weights: dict) -> None:
    """Quantize exactly the modules the checkpoint stores quantized (mlx-lm's convention:
    a per-module entry in the quantization block overrides the defaults)."""

    def predicate(path, module):
        if path in q:
            return q[path]
        if not hasattr(module, "to_quantized"):
            return False
        return f"{path}.scales" in weights

    nn.quantize(
        model,
        group_size=q.get("group_size", 64),
        bits=q.get("bits", 4),
        mode=q.get("mode", "affine"),
        class_predicate=predicate,
    )


def load(path_or_id, dtype: mx.Dtype | None = None, lazy: bool = False, backend: str = "mlx", device=None):
    """`model, tokenizer = load(path)`. `dtype` casts floating weights (e.g. mx.float32 for tests).

    `backend="torch"` loads the same checkpoint into the optional torch backend on `device`
    ("cuda", "cpu"; default: CUDA when available); `dtype` may then be a torch dtype or a name."""
    if backend == "torch":
        return _load_torch(path_or_id, dtype, device)
    if backend != "mlx":
        raise LoadError(f"backend {backend!r} is not known; use 'mlx' or 'torch'")
    if device is not None:
        raise LoadError(f"device={device!r} applies to backend='torch' only; MLX picks its own device")
    from .tokenizer import load_tokenizer

    model_dir = resolve(path_or_id)
    model = build_model(model_dir, dtype=dtype, lazy=lazy)
    tokenizer = load_tokenizer(model_dir, model.generation_config.eos_token_id)
    return model, tokenizer


def _load_torch(path_or_id, dtype, device):
    try:
        from .torch_backend import loading as torch_loading
    except ImportError as e:
        raise LoadError(f"backend='torch' needs PyTorch ({e}); pip install 'mlx-diffgemma[torch]'") from None
    try:
        return torch_loading.load(path_or_id, device=device, dtype=dtype)
    except torch_loading.LoadError as e:
        raise LoadError(str(e)) from None
