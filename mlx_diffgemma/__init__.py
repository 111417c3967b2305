"""DiffusionGemma on MLX: `model, tokenizer = load(path)`, then `generate` or `stream_generate`."""

from .config import GenerationConfig, ModelConfig
from .generate import Event, Stats, generate, stream_generate
from .loading import LoadError, load

__version__ = "0.1.0"
__all__ = ["load", "generate", "stream_generate", "Event", "Stats", "GenerationConfig", "ModelConfig", "LoadError"]
