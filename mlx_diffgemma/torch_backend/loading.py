"""`load(path, device, dtype)` for the torch backend: raw Hugging Face directories and converted
MLX directories, whose MLX-quantized tensors are dequantized on the target device.

Quantized tensors follow mlx-lm: `X.weight` (packed uint32), `X.scales` and, for affine, `X.biases`,
with group size, bits and mode from config.json's `quantization` block (a per-module entry such as
"layers.0.experts.gate_up_proj": {"bits": 8, ...} overrides the defaults).
"""

from __future__ import annotations

import glob
import os
from pathlib import Path

import torch

from ..config import ConfigError, GenerationConfig, ModelConfig, load_configs
from ..names import sanitize
from .model import DiffusionGemma
from .ops import TorchOps


class LoadError(RuntimeError):
    """The model cannot be loaded; the message names the path and what to do.
    (`mlx_diffgemma.load(..., backend="torch")` re-raises it as `mlx_diffgemma.LoadError`.)"""


_DTYPES = {
    "float32": torch.float32, "fp32": torch.float32, "float16": torch.float16, "fp16": torch.float16,
    "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
}


def resolve_dtype(dtype) -> torch.dtype | None:
    """None, a torch dtype, a name ('float32', 'bf16', ...) or an mlx dtype."""
    if dtype is None or isinstance(dtype, torch.dtype):
        return dtype
    name = str(dtype).rsplit(".", 1)[-1]  # also accepts mlx.core.float32
    if name not in _DTYPES:
        raise LoadError(f"dtype {dtype!r} is not supported; use one of float32, bfloat16, float16")
    return _DTYPES[name]


def resolve_device(device) -> torch.device:
    """None picks CUDA when available, else the CPU."""
    if device is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(device)
    except (RuntimeError, TypeError):
        raise LoadError(f"device {device!r} is not a torch device; use 'cuda', 'cuda:1' or 'cpu'") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise LoadError(f"device {str(device)!r} requested but torch sees no CUDA GPU; use device='cpu'")
    return device


# -- names ------------------------------------------------------------------------------------


# -- MLX quantization ------------------------------------------------------------------------

_FP4_E2M1 = [0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0, -0.0, -0.5, -1.0, -1.5, -2.0, -3.0, -4.0, -6.0]
_MODE_DEFAULTS = {"affine": (64, 4), "mxfp4": (32, 4), "nvfp4": (16, 4), "mxfp8": (32, 8)}


def unpack_bits(packed: torch.Tensor, bits: int) -> torch.Tensor:
    """MLX packed rows (uint32 [.., P]) -> integer codes int32 [.., P * 32 / bits].

    MLX packs each row as a little-endian bit stream: code j occupies bits j*bits .. (j+1)*bits-1
    (for 2, 4 and 8 bits that is also "code j at bit (j % per_word) * bits of word j // per_word")."""
    raw = packed.contiguous().view(torch.int32).view(torch.uint8)  # [.., 4P] bytes, little-endian
    n = raw.shape[-1] * 8 // bits
    raw = torch.nn.functional.pad(raw, (0, 1)).to(torch.int32)  # one spare byte for the last read
    pos = torch.arange(n, device=packed.device) * bits
    lo = raw.index_select(-1, pos // 8)
    hi = raw.index_select(-1, pos // 8 + 1)
    return (((hi << 8) | lo) >> (pos % 8).to(torch.int32)) & ((1 << bits) - 1)


def dequantize(
    packed: torch.Tensor,
    scales: torch.Tensor,
    biases: torch.Tensor | None,
    group_size: int,
    bits: int,
    mode: str = "affine",
    dtype: torch.dtype | None = None,
    chunk_rows: int = 4096,
) -> torch.Tensor:
    """Undo `mx.quantize` (affine, mxfp4, nvfp4, mxfp8) on the tensors' device; computed in fp32
    and returned in `dtype` (default: the scales' dtype, bf16 for the fp modes). Works through
    the rows in chunks so the int32 / fp32 temporaries stay small."""
    if mode not in _MODE_DEFAULTS:
        raise ValueError(f"quantization mode {mode!r} is not supported (affine, mxfp4, nvfp4, mxfp8)")
    if mode == "affine":
        dtype = dtype or scales.dtype
        if biases is None:
            raise ValueError("affine quantization needs biases")
    else:
        dtype = dtype or torch.bfloat16
    lead, P = packed.shape[:-1], packed.shape[-1]
    n = P * 32 // bits
    if n % group_size or scales.shape[-1] != n // group_size:
        raise ValueError(
            f"packed width {P} at {bits} bits gives {n} columns, which does not match "
            f"{scales.shape[-1]} scales of group size {group_size}"
        )
    rows_q = packed.reshape(-1, P)
    rows_s = scales.reshape(-1, scales.shape[-1])
    rows_b = biases.reshape(-1, biases.shape[-1]) if biases is not None else None
    out = torch.empty(rows_q.shape[0], n, dtype=dtype, device=packed.device)
    lut = torch.tensor(_FP4_E2M1, dtype=torch.float32, device=packed.device)
    for a in range(0, rows_q.shape[0], chunk_rows):
        codes = unpack_bits(rows_q[a : a + chunk_rows], bits)
        r = codes.shape[0]
        if mode == "affine":
            values = codes.float().view(r, -1, group_size)
            s = rows_s[a : a + chunk_rows].float()[..., None]
            b = rows_b[a : a + chunk_rows].float()[..., None]
            w = values * s + b
        else:
            if bits == 4:
                values = lut[codes]
            else:  # mxfp8: fp8 e4m3 codes
                values = codes.to(torch.uint8).view(torch.float8_e4m3fn).float()
            s_raw = rows_s[a : a + chunk_rows]
            if mode == "nvfp4":  # fp8 e4m3 scales
                s = s_raw.to(torch.uint8).view(torch.float8_e4m3fn).float()
            else:  # e8m0: a power of two
                s = torch.exp2(s_raw.to(torch.float32) - 127.0)
            w = values.view(r, -1, group_size) * s[..., None]
        out[a : a + r] = w.reshape(r, n).to(dtype)
    return out.reshape(*lead, n)


def _quant_params(q: dict, module: str) -> tuple[int, int, str]:
    """(group_size, bits, mode) of one module: its own entry, else the block's defaults (when the
    entry changes the mode, that mode's defaults)."""
    entry = q.get(module) if isinstance(q.get(module), dict) else {}
    mode = entry.get("mode", q.get("mode", "affine"))
    group, bits = _MODE_DEFAULTS.get(mode, (64, 4))
    if mode == q.get("mode", "affine"):
        group, bits = q.get("group_size", group), q.get("bits", bits)
    return int(entry.get("group_size", group)), int(entry.get("bits", bits)), mode


# -- building the model ----------------------------------------------------------------------


def read_safetensors(model_dir: Path, device: torch.device) -> dict[str, torch.Tensor]:
    from safetensors import safe_open

    files = sorted(glob.glob(str(model_dir / "*.safetensors")))
    if not files:
        raise LoadError(f"{model_dir}: no *.safetensors files found")
    weights = {}
    for f in files:
        try:
            with safe_open(f, framework="pt", device="cpu") as st:
                for name in st.keys():
                    weights[name] = st.get_tensor(name).to(device)
        except LoadError:
            raise
        except Exception as e:
            raise LoadError(f"{f}: cannot read safetensors ({e}); re-download or re-convert it") from None
    return weights


def prepare_weights(weights: dict, config: ModelConfig, dtype: torch.dtype | None, source: str = "") -> dict:
    """Sanitized names, MLX-quantized tensors dequantized, floating tensors cast to `dtype`
    (None: the dtype of the checkpoint's float tensors)."""
    weights = sanitize(weights)
    q = config.quantization or {}
    if dtype is None:  # one dtype for the model: that of the float tensors, never quantized (norms)
        dtype = next((w.dtype for k, w in weights.items() if k.endswith("norm.weight")), None)
    out = {}
    for name, w in weights.items():
        if name.endswith(".scales") or name.endswith(".biases"):
            continue
        module = name[: -len(".weight")] if name.endswith(".weight") else None
        if module is not None and f"{module}.scales" in weights:
            if not q:
                raise LoadError(f"{source}: {module} is quantized but config.json has no 'quantization' block; re-convert it")
            if q.get(module) is False:
                raise LoadError(f"{source}: {module} is stored quantized but config.json's quantization block says it is not")
            group, bits, mode = _quant_params(q, module)
            try:
                w = dequantize(w, weights[f"{module}.scales"], weights.get(f"{module}.biases"), group, bits, mode, dtype)
            except ValueError as e:
                raise LoadError(f"{source}: cannot dequantize {module} ({e}); check config.json's quantization block") from None
        elif dtype is not None and w.is_floating_point():
            w = w.to(dtype)
        out[name] = w
    return out


def from_weights(
    config: ModelConfig,
    weights: dict,
    generation_config: GenerationConfig | None = None,
    device=None,
    dtype=None,
    source: str = "weights",
) -> DiffusionGemma:
    """A model from a name -> tensor dict (raw HF, converted or quantized names). Tensors already
    on `device` with the right dtype are used as they are, without a copy (e.g. a transformers
    model's state_dict, for side-by-side benchmarks)."""
    device = resolve_device(device)
    dtype = resolve_dtype(dtype)
    weights = prepare_weights({k: v.to(device) for k, v in weights.items()}, config, dtype, source)
    with torch.device("meta"):
        model = DiffusionGemma(config)
    expected = set(model.state_dict())
    missing, unexpected = sorted(expected - set(weights)), sorted(set(weights) - expected)
    if missing or unexpected:
        raise LoadError(
            f"{source}: weights do not match config.json (missing {missing[:5]}, unexpected {unexpected[:5]})"
        )
    try:
        model.load_state_dict(weights, strict=True, assign=True)
    except RuntimeError as e:
        first = str(e).strip().splitlines()[-1].strip()
        raise LoadError(f"{source}: weights do not match config.json ({first})") from None
    for p in model.parameters():
        p.requires_grad_(False)
    model.eval()
    model.generation_config = generation_config or GenerationConfig()
    model.ops = TorchOps(device)
    return model


def build_model(model_dir: Path, device=None, dtype=None) -> DiffusionGemma:
    try:
        config, gen = load_configs(model_dir)
    except ConfigError as e:
        raise LoadError(str(e)) from None
    device = resolve_device(device)
    return from_weights(config, read_safetensors(model_dir, device), gen, device, dtype, source=str(model_dir))


def load(path_or_id, device=None, dtype=None):
    """`model, tokenizer = load(path, device="cuda"|"cpu", dtype=None)`: a raw HF or converted MLX
    directory (or a hub id). `dtype` casts floating weights ('float32', 'bfloat16', a torch dtype);
    None keeps the checkpoint's (dequantized tensors take their scales' dtype)."""
    from ..tokenizer import load_tokenizer

    model_dir = _resolve(path_or_id)
    model = build_model(model_dir, device=device, dtype=dtype)
    tokenizer = load_tokenizer(model_dir, model.generation_config.eos_token_id)
    return model, tokenizer


def _resolve(path_or_id: str | os.PathLike) -> Path:
    # the MLX loader's resolver (local directory or hub id); imported here, not at module import
    from ..loading import LoadError as MLXLoadError
    from ..loading import resolve

    try:
        return resolve(path_or_id)
    except MLXLoadError as e:
        raise LoadError(str(e)) from None
