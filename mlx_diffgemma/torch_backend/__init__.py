"""The optional torch backend (CUDA or CPU): the same checkpoints, contract and sampler as MLX.

`model, tokenizer = load(path, device="cuda"|"cpu", dtype=None)` (or
`mlx_diffgemma.load(path, backend="torch", device=...)`); the model provides `make_cache`,
`encode`, `denoise`, `generation_config`, `dtype` and `ops`, so `mlx_diffgemma.generate`'s block
loop and the numpy sampler drive it unchanged. Needs the `torch` extra (`pip install
mlx-diffgemma[torch]`); importing it runs no MLX code.
"""

from .cache import Cache
from .loading import LoadError, dequantize, from_weights, load
from .model import DiffusionGemma
from .ops import TorchOps, head_statistics

__all__ = ["load", "from_weights", "dequantize", "DiffusionGemma", "Cache", "TorchOps", "head_statistics", "LoadError"]
