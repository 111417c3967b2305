"""Model and generation settings read from a checkpoint's `config.json` and `generation_config.json`.

Accepts the raw Hugging Face layout (model_type `diffusion_gemma`, nested `text_config`) and our
converted layout (the same file with a `quantization` block). Global-layer sizes may be written the
transformers-5.11 way (`global_head_dim`, `num_global_key_value_heads`) or the 5.24 way
(`per_layer_config`); both are read.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import Any


class ConfigError(ValueError):
    """A checkpoint's configuration cannot be used; the message names the file and field."""


SLIDING, FULL = "sliding_attention", "full_attention"

_DEFAULT_ROPE = {
    SLIDING: {"rope_type": "default", "rope_theta": 10_000.0},
    FULL: {"rope_type": "proportional", "partial_rotary_factor": 0.25, "rope_theta": 1_000_000.0},
}


@dataclass(frozen=True)
class LayerSpec:
    """Attention geometry of one layer."""

    kind: str  # SLIDING or FULL
    head_dim: int
    num_kv_heads: int
    rope_type: str
    rope_theta: float
    partial_rotary_factor: float = 1.0
    rope_factor: float = 1.0

    @property
    def is_sliding(self) -> bool:
        return self.kind == SLIDING


@dataclass
class ModelConfig:
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    layers: list[LayerSpec]
    num_experts: int
    top_k_experts: int
    moe_intermediate_size: int
    sliding_window: int
    rms_norm_eps: float = 1e-6
    final_logit_softcapping: float = 30.0
    canvas_length: int = 256
    hidden_activation: str = "gelu_pytorch_tanh"
    pad_token_id: int = 0
    bos_token_id: int = 2
    eos_token_id: list[int] = field(default_factory=lambda: [1])
    quantization: dict | None = None
    raw: dict = field(default_factory=dict, repr=False)

    @classmethod
    def from_dict(cls, config: dict, source: str = "config.json") -> "ModelConfig":
        model_type = config.get("model_type")
        if model_type != "diffusion_gemma":
            raise ConfigError(
                f"{source}: model_type is {model_type!r}, expected 'diffusion_gemma' "
                "(a google/diffusiongemma-* checkpoint or one converted by mlx_diffgemma.convert)"
            )
        text = config.get("text_config")
        if not isinstance(text, dict):
            raise ConfigError(f"{source}: missing the nested 'text_config' block of a diffusion_gemma config")

        def need(key):
            if text.get(key) is None:
                raise ConfigError(f"{source}: text_config.{key} is missing; re-save the config with transformers>=5.11")
            return text[key]

        n_layers = int(need("num_hidden_layers"))
        layer_types = text.get("layer_types") or [
            SLIDING if (i + 1) % 6 else FULL for i in range(n_layers)
        ]
        if len(layer_types) != n_layers:
            raise ConfigError(f"{source}: text_config.layer_types has {len(layer_types)} entries for {n_layers} layers")
        layer_types = list(layer_types)
        layer_types[-1] = FULL  # the reference forces the last layer to full attention
        for t in layer_types:
            if t not in (SLIDING, FULL):
                raise ConfigError(f"{source}: unknown layer type {t!r} in text_config.layer_types")

        rope = text.get("rope_parameters") or {}
        head_dim = int(text.get("head_dim") or 256)
        kv_heads = int(need("num_key_value_heads"))
        global_head_dim = int(text.get("global_head_dim") or 512)
        global_kv = text.get("num_global_key_value_heads")
        # transformers zero-pads the layer keys to the width of the largest index ("05" of 30 layers)
        try:
            per_layer = {int(k): v for k, v in (text.get("per_layer_config") or {}).items()}
        except ValueError:
            raise ConfigError(f"{source}: per_layer_config keys must be layer indices, "
                              f"got {sorted(text['per_layer_config'])}") from None

        specs = []
        for i, kind in enumerate(layer_types):
            hd, kv = head_dim, kv_heads
            if kind == FULL:
                hd = global_head_dim
                kv = int(global_kv) if global_kv is not None else kv_heads
            override = per_layer.get(i) or {}
            hd = int(override.get("head_dim", hd))
            kv = int(override.get("num_key_value_heads", kv))
            r = {**_DEFAULT_ROPE[kind], **(rope.get(kind) or {})}
            if r["rope_type"] not in ("default", "proportional"):
                raise ConfigError(f"{source}: rope_type {r['rope_type']!r} for {kind} layers is not supported")
            specs.append(
                LayerSpec(
                    kind=kind,
                    head_dim=hd,
                    num_kv_heads=kv,
                    rope_type=r["rope_type"],
                    rope_theta=float(r["rope_theta"]),
                    partial_rotary_factor=float(r.get("partial_rotary_factor", 1.0)),
                    rope_factor=float(r.get("factor", 1.0)),
                )
            )

        eos = config.get("eos_token_id", text.get("eos_token_id", 1))
        return cls(
            vocab_size=int(need("vocab_size")),
            hidden_size=int(need("hidden_size")),
            intermediate_size=int(need("intermediate_size")),
            num_hidden_layers=n_layers,
            num_attention_heads=int(need("num_attention_heads")),
            layers=specs,
            num_experts=int(need("num_experts")),
            top_k_experts=int(need("top_k_experts")),
            moe_intermediate_size=int(need("moe_intermediate_size")),
            sliding_window=int(text.get("sliding_window") or 512),
            rms_norm_eps=float(text.get("rms_norm_eps") or 1e-6),
            final_logit_softcapping=float(text.get("final_logit_softcapping") or 30.0),
            canvas_length=int(config.get("canvas_length") or 256),
            hidden_activation=text.get("hidden_activation") or "gelu_pytorch_tanh",
            pad_token_id=int(text.get("pad_token_id") if text.get("pad_token_id") is not None else 0),
            bos_token_id=int(text.get("bos_token_id") if text.get("bos_token_id") is not None else 2),
            eos_token_id=list(eos) if isinstance(eos, (list, tuple)) else [int(eos)],
            quantization=config.get("quantization"),
            raw=config,
        )


@dataclass
class GenerationConfig:
    """The reference sampler's knobs (`DiffusionGemmaGenerationConfig`), with the reference defaults."""

    max_new_tokens: int = 256
    max_denoising_steps: int = 48
    entropy_bound: float = 0.1
    t_min: float = 0.4
    t_max: float = 0.8
    stability_threshold: int = 1
    confidence_threshold: float = 0.005
    eos_token_id: list[int] = field(default_factory=lambda: [1, 106, 50])
    pad_token_id: int = 0

    @classmethod
    def from_dict(cls, d: dict, source: str = "generation_config.json") -> "GenerationConfig":
        out = cls()
        values: dict[str, Any] = {}
        sampler = d.get("sampler_config")
        if isinstance(sampler, dict) and sampler.get("entropy_bound") is not None:
            values["entropy_bound"] = sampler["entropy_bound"]
        for f in fields(cls):
            if f.name in d and d[f.name] is not None:
                values[f.name] = d[f.name]
        if "eos_token_id" in values and not isinstance(values["eos_token_id"], (list, tuple)):
            values["eos_token_id"] = [values["eos_token_id"]]
        try:
            return out.override(**values)
        except (TypeError, ValueError) as e:
            raise ConfigError(f"{source}: {e}") from None

    def override(self, **kw) -> "GenerationConfig":
        """A copy with the given (non-None) fields replaced and checked."""
        kw = {k: v for k, v in kw.items() if v is not None}
        new = replace(self, **kw)
        new.eos_token_id = [int(t) for t in new.eos_token_id]
        new.validate()
        return new

    def validate(self):
        if not (isinstance(self.max_denoising_steps, int) and self.max_denoising_steps > 0):
            raise ValueError(f"max_denoising_steps must be a positive integer, got {self.max_denoising_steps}")
        if not self.max_new_tokens > 0:
            raise ValueError(f"max_new_tokens must be positive, got {self.max_new_tokens}")
        if not self.entropy_bound > 0:
            raise ValueError(f"entropy_bound must be > 0, got {self.entropy_bound}")
        if self.t_min < 0 or self.t_max <= self.t_min:
            raise ValueError(f"need 0 <= t_min < t_max, got t_min={self.t_min}, t_max={self.t_max}")
        if self.stability_threshold < 0:
            raise ValueError(f"stability_threshold must be >= 0, got {self.stability_threshold}")
        if not self.confidence_threshold > 0:
            raise ValueError(f"confidence_threshold must be > 0, got {self.confidence_threshold}")


def read_json(path: Path) -> dict:
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except FileNotFoundError:
        raise ConfigError(f"{path}: not found") from None
    except json.JSONDecodeError as e:
        raise ConfigError(f"{path}: not valid JSON ({e.msg} at line {e.lineno})") from None


def load_configs(model_dir: Path) -> tuple[ModelConfig, GenerationConfig]:
    cfg_path = Path(model_dir) / "config.json"
    config = ModelConfig.from_dict(read_json(cfg_path), source=str(cfg_path))
    gen_path = Path(model_dir) / "generation_config.json"
    gen = GenerationConfig.from_dict(read_json(gen_path), str(gen_path)) if gen_path.exists() else GenerationConfig()
    return config, gen
