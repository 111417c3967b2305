"""DiffusionGemma on MLX: `model, tokenizer = load(path)`, then `generate` or `stream_generate`."""

from .config import GenerationConfig, ModelConfig

__version__ = "0.1.0"
__all__ = ["load", "generate", "stream_generate", "Event", "Stats", "GenerationConfig", "ModelConfig", "LoadError"]

_LAZY = {
    "load": "loading", "LoadError": "loading",
    "generate": "generate", "stream_generate": "generate", "Event": "generate", "Stats": "generate",
}


def __getattr__(name):
    # imported on first use, so `python -m mlx_diffgemma.generate` does not import itself twice
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(f".{_LAZY[name]}", __name__), name)
    raise AttributeError(f"module 'mlx_diffgemma' has no attribute {name!r}")
