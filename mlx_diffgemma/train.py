"""Training DiffusionGemma-architecture models in MLX: `python -m mlx_diffgemma.train --config FILE`.

The objective is uniform-state corruption (NeMo's `corrupt_uniform_random`): per example draw
t ~ U(eps, 1), replace each canvas position by a uniform random token (the whole vocabulary, as
the sampler's noise) with probability t, and take the cross-entropy of the denoised canvas against
the clean one at every canvas position. The prompt goes through `model.encode` (a fresh cache per
batch) and the canvas through `model.denoise`, the same two calls inference makes.

Self-conditioning is trained the two-pass way: with probability `self_cond_prob` a batch first runs
a no-grad denoise of the same corrupted canvas, and its logits, divided by a temperature drawn
from `self_cond_temperatures` (default: the generation section's [t_min, t_max], since inference
feeds the temperature-scaled logits), become the second pass's `self_cond`. The loss is taken on
the second pass only.

`objective: autoregressive` trains the same network as a left-to-right model over the canvas (a
causal mask over [prompt ; target]): the baseline that shows what bidirectional denoising buys.

Full fine-tuning or LoRA (mlx-lm's LoRA layers on the attention, MLP, expert and
self-conditioning projections). Checkpoints are model directories `load` reads (bare weight names,
config.json, generation_config.json, tokenizer files) plus the optimizer state, written atomically
under OUT/checkpoints/step-N; a rerun of the same command resumes from the last one, and the
batches are a function of (seed, step), so a resumed run makes the same updates as an unbroken one.

The config file (YAML or JSON):

    out_dir: runs/sudoku          # where checkpoints go
    seed: 0
    task: sudoku                  # the data source (see TASKS)
    objective: diffusion          # or autoregressive
    init_from: null               # a checkpoint directory to fine-tune, or null with `model:` below
    grow_depth: null              # with init_from (not quantized): its layers stacked this many times, each
                                  # copy after the first the identity, so training starts from its function
    model: {canvas_length: 81, text_config: {...}}   # a fresh network (DiffusionGemma config)
    generation: {...}             # generation_config.json of the checkpoints, applied again on export
    steps: 3000
    batch_size: 64
    micro_batches: 1              # split each batch into this many equal slices: the same update in smaller
                                  # passes (MLX 0.32.4 CUDA failed to launch one autoregressive pass at 512)
    learning_rate: 1.0e-3
    warmup_steps: 100
    weight_decay: 0.0
    grad_clip: 1.0
    eps: 0.001                    # lower end of t
    self_cond_prob: 0.5
    lora: null                    # or {rank: 8, scale: 20.0, keys: [q_proj, ...]}
    save_every: 500
    log_every: 20
    data: {...}                   # task options (sudoku: givens curriculum, unique puzzles; sort: list lengths)

`base: other.yaml` (relative to the file) starts from another config and changes what the file
lists: mappings merge key by key, anything else is replaced, and the file must name its own
`out_dir`. A one-change experiment or an autoregressive twin is then only its change.
"""

from __future__ import annotations

import functools
import json
import math
import shutil
import sys
import time
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn
import mlx.optimizers as optim
import numpy as np
from mlx.utils import tree_flatten, tree_map, tree_unflatten

from .config import ConfigError, GenerationConfig, ModelConfig
from .files import atomic_dir
from .model import DiffusionGemma

LORA_KEYS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj", "gate_up_proj")


class TrainError(ValueError):
    """A training config or checkpoint cannot be used; the message names the culprit."""


@dataclass
class TrainConfig:
    out_dir: str
    seed: int = 0
    task: str = "sudoku"
    objective: str = "diffusion"
    init_from: str | None = None
    grow_depth: int | None = None
    model: dict | None = None
    generation: dict = field(default_factory=dict)
    steps: int = 1000
    batch_size: int = 32
    micro_batches: int = 1
    learning_rate: float = 1e-3
    warmup_steps: int = 50
    weight_decay: float = 0.0
    grad_clip: float = 1.0
    eps: float = 1e-3
    self_cond_prob: float = 0.5
    # [lo, hi]: training divides the first pass's self-conditioning logits by a temperature drawn
    # from this range; default: the generation section's t_min..t_max, the range inference feeds
    self_cond_temperatures: list | None = None
    lora: dict | None = None
    save_every: int = 500
    keep_checkpoints: int = 2
    log_every: int = 20
    compile: bool = True
    data: dict = field(default_factory=dict)

    @classmethod
    def from_file(cls, path) -> "TrainConfig":
        """A YAML or JSON config. `base: other.yaml` (relative to this file) starts from another
        config's settings: this file's go on top, mappings merged key by key, anything else replaced."""
        path = Path(path)
        raw = _read_settings(path)
        cfg = cls.from_dict(raw, str(path))
        # a relative out_dir / init_from is relative to the config file
        base = path.parent
        cfg.out_dir = str((base / cfg.out_dir) if not Path(cfg.out_dir).is_absolute() else cfg.out_dir)
        if cfg.init_from and not Path(cfg.init_from).is_absolute() and (base / cfg.init_from).exists():
            cfg.init_from = str(base / cfg.init_from)
        return cfg

    @classmethod
    def from_dict(cls, raw: dict, source: str = "config") -> "TrainConfig":
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(raw) - known)
        if unknown:
            raise TrainError(f"{source}: unknown setting(s) {', '.join(unknown)} (known: {', '.join(sorted(known))})")
        if "out_dir" not in raw:
            raise TrainError(f"{source}: out_dir is missing (where checkpoints are written)")
        cfg = cls(**raw)
        cfg.validate(source)
        return cfg

    def validate(self, source: str = "config"):
        def bad(msg):
            raise TrainError(f"{source}: {msg}")

        if self.objective not in ("diffusion", "autoregressive"):
            bad(f"objective is {self.objective!r}, expected 'diffusion' or 'autoregressive'")
        if self.task not in TASKS:
            bad(f"task is {self.task!r}, known tasks: {', '.join(sorted(TASKS))}")
        if (self.model is None) == (self.init_from is None):
            bad("give exactly one of `model` (a fresh network) or `init_from` (a checkpoint directory)")
        if self.grow_depth is not None:
            if not (isinstance(self.grow_depth, int) and self.grow_depth >= 2):
                bad(f"grow_depth must be an integer >= 2 (how many times to stack the layers), got {self.grow_depth!r}")
            if self.init_from is None:
                bad("grow_depth deepens a trained network: give it with init_from, not with model")
            if self.lora is not None:
                bad("grow_depth trains new layers in full; it cannot be combined with lora")
        for name in ("steps", "batch_size", "micro_batches", "save_every", "log_every", "keep_checkpoints"):
            if not (isinstance(getattr(self, name), int) and getattr(self, name) > 0):
                bad(f"{name} must be a positive integer, got {getattr(self, name)!r}")
        if self.batch_size % self.micro_batches:
            bad(f"batch_size {self.batch_size} is not a multiple of micro_batches {self.micro_batches}")
        if not 0 < self.eps < 1:
            bad(f"eps must be in (0, 1), got {self.eps}")
        if not 0 <= self.self_cond_prob <= 1:
            bad(f"self_cond_prob must be in [0, 1], got {self.self_cond_prob}")
        t = self.self_cond_temperatures
        if t is not None and not (isinstance(t, (list, tuple)) and len(t) == 2 and 0 < t[0] <= t[1]):
            bad(f"self_cond_temperatures must be [lo, hi] with 0 < lo <= hi, got {t!r}")
        if not self.learning_rate > 0:
            bad(f"learning_rate must be > 0, got {self.learning_rate}")
        if self.lora is not None:
            if not isinstance(self.lora, dict) or int(self.lora.get("rank", 8)) <= 0:
                bad("lora must be a mapping with a positive rank, e.g. {rank: 8, scale: 20.0}")
            keys = self.lora.get("keys", LORA_KEYS)
            if not set(keys) <= set(LORA_KEYS):
                bad(f"lora.keys may only name {', '.join(LORA_KEYS)}")


def _read_settings(path: Path, children: tuple = ()) -> dict:
    """One config file's settings, its `base:` chain merged under them."""
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as e:
        raise TrainError(f"{path}: cannot read the config ({e.strerror})") from None
    try:
        if path.suffix in (".yaml", ".yml"):
            import yaml

            raw = yaml.safe_load(text)
        else:
            raw = json.loads(text)
    except Exception as e:
        raise TrainError(f"{path}: not valid {path.suffix.lstrip('.').upper() or 'JSON'} ({e})") from None
    if not isinstance(raw, dict):
        raise TrainError(f"{path}: the config must be a mapping of settings")
    if "base" not in raw:
        return raw
    base = raw.pop("base")
    if not isinstance(base, str):
        raise TrainError(f"{path}: base must be the path of another config, got {base!r}")
    if "out_dir" not in raw:
        # inheriting it would resume (and overwrite) the base's run
        raise TrainError(f"{path}: a config with `base:` needs its own out_dir, so its run does not resume the base's")
    base_path = path.parent / base
    if base_path.resolve() in children + (path.resolve(),):
        raise TrainError(f"{path}: base {base!r} leads back to this config (a cycle)")
    inherited = _read_settings(base_path, children + (path.resolve(),))
    init = inherited.get("init_from")
    if isinstance(init, str) and not Path(init).is_absolute() and (base_path.parent / init).exists():
        inherited["init_from"] = str((base_path.parent / init).resolve())  # relative to the file naming it
    return _merged(inherited, raw)


def _merged(base: dict, top: dict) -> dict:
    out = dict(base)
    for key, value in top.items():
        out[key] = _merged(out[key], value) if isinstance(value, dict) and isinstance(out.get(key), dict) else value
    return out


# -- data --------------------------------------------------------------------------------------


def task_options(cfg: TrainConfig, defaults: dict, task: str) -> dict:
    """The config's `data:` section over a task's defaults; an unknown option is a TrainError."""
    unknown = set(cfg.data) - set(defaults)
    if unknown:
        raise TrainError(f"data: unknown {task} option(s) {', '.join(sorted(unknown))}")
    return {**defaults, **cfg.data}


class SudokuTask:
    """Batches of (prompt ids [B, 82], canvas target ids [B, 81]) from the seeded generator:
    a pool of backtracked grids, shuffled by validity-preserving symmetries, dug to a number of
    givens that follows a curriculum from `givens_start` down to `givens_end` (the lower end of a
    uniform range whose upper end is `givens_max`) over the first `curriculum_fraction` of the run.

    By default the digging keeps random cells, so most puzzles with few givens have many
    solutions (99% at 30 givens, 80% at 35) and the target is just the grid they came from. With
    `unique: true` the pool holds grids dug to minimal unique puzzles (`sudoku.dig_pool`: about
    70 ms each on a CPU core, once per run, spread over the cores) and every puzzle has exactly
    one solution, as the held-out puzzles do (on the bundled model's size it trained no better:
    docs/sudoku.md, "Unique puzzles")."""

    defaults = dict(pool=2048, givens_start=50, givens_end=24, givens_max=60, curriculum_fraction=0.5,
                    unique=False)

    def __init__(self, cfg: TrainConfig):
        from . import sudoku

        self.sudoku = sudoku
        self.opts = task_options(cfg, self.defaults, "sudoku")
        self.cfg = cfg
        self._pool = None

    @property
    def pool(self) -> tuple[np.ndarray, np.ndarray | None]:
        """(grids [N, 81], removal ranks [N, 81] with `unique`, else None)."""
        if self._pool is None:
            n = int(self.opts["pool"])
            if self.opts["unique"]:
                self._pool = _unique_pool(self.cfg.seed, n)
            else:
                rng = np.random.default_rng([self.cfg.seed, 7919])
                self._pool = np.stack([self.sudoku.solved_grid(rng) for _ in range(n)]), None
        return self._pool

    def givens_low(self, step: int) -> int:
        o = self.opts
        frac = min(1.0, step / max(1.0, o["curriculum_fraction"] * self.cfg.steps))
        return int(round(o["givens_start"] + (o["givens_end"] - o["givens_start"]) * frac))

    def batch(self, step: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
        B = self.cfg.batch_size
        pool, ranks = self.pool
        pick = rng.integers(0, len(pool), B)
        if ranks is None:
            grids = self.sudoku.augment(pool[pick], rng)
        else:
            grids, ranks = self.sudoku.augment(pool[pick], rng, ranks[pick])
        lo = self.givens_low(step)
        hi = max(lo, int(self.opts["givens_max"]))
        givens = rng.integers(lo, hi + 1, B)
        if ranks is None:
            puzzles = self.sudoku.dig(grids, givens, rng)
        else:
            puzzles = self.sudoku.keep_givens(grids, ranks, givens)
        return self.sudoku.prompt_batch(puzzles), self.sudoku.canvas_ids(grids)

    def canvas_lengths(self, model) -> list[int]:
        return [model.config.canvas_length]

    def save_tokenizer(self, out: Path) -> None:
        write_char_tokenizer(out)


@functools.lru_cache(maxsize=2)
def _unique_pool(seed: int, n: int) -> tuple[np.ndarray, np.ndarray]:
    # kept for the process: `train_sudoku.py --budget-s` trains a probe on the same pool first
    from . import sudoku

    return sudoku.dig_pool([[seed, 7927, i] for i in range(n)])


class SortTask:
    """Batches of (prompt ids, canvas target ids) for sorting random digit lists of
    `length_min`..`length_max` digits (mlx_diffgemma.sorting): answers of every length, most of the
    canvas EOS tail.

    With the default `canvas_lengths: [128]` a batch is prompts [B, 49] and whole canvases [B, 128].
    Listing shorter lengths trains the block-autoregressive loop on short canvases too: a batch
    draws one canvas length c and a block index k, its prompts carry the first k*c answer tokens as
    already committed (the loop re-encodes a commit into the cache), and its targets are the next c
    rows. Only lists whose answer has not ended before the block are drawn (the loop stops at a
    committed EOS), so a block may start with the EOS, never after it."""

    defaults = dict(length_min=1, length_max=48, canvas_lengths=[128])

    def __init__(self, cfg: TrainConfig):
        from . import sorting

        self.sorting = sorting
        self.opts = task_options(cfg, self.defaults, "sort")
        lo, hi = self.opts["length_min"], self.opts["length_max"]
        if not (isinstance(lo, int) and isinstance(hi, int) and 1 <= lo <= hi <= sorting.WIDTH):
            raise TrainError(f"data: length_min..length_max must lie in 1..{sorting.WIDTH}, got {lo}..{hi}")
        lengths = self.opts["canvas_lengths"]
        if not (isinstance(lengths, list) and lengths
                and all(isinstance(c, int) and 1 <= c <= sorting.CANVAS for c in lengths)):
            raise TrainError(f"data: canvas_lengths must be a list of row counts in 1..{sorting.CANVAS}, got {lengths!r}")
        canvas = (cfg.model or {}).get("canvas_length", sorting.CANVAS)
        if canvas != sorting.CANVAS:
            raise TrainError(f"model.canvas_length is {canvas}; the sort task fills a {sorting.CANVAS}-row canvas")
        self.cfg = cfg

    def batch(self, step: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
        lo, hi = self.opts["length_min"], self.opts["length_max"]
        lengths = self.opts["canvas_lengths"]
        if lengths == [self.sorting.CANVAS]:  # whole canvases (the draws the bundled model was trained on)
            lists = self.sorting.random_lists(rng, self.cfg.batch_size, (lo, hi))
            return self.sorting.prompt_batch(lists), self.sorting.canvas_ids(lists)
        c = int(lengths[rng.integers(len(lengths))])
        k = int(rng.integers(0, hi // c + 1))  # blocks already committed: k*c <= the answer's length
        lists = self.sorting.random_lists(rng, self.cfg.batch_size, (max(lo, k * c), hi))
        answers = self.sorting.canvas_ids(lists)
        prompt = np.concatenate([self.sorting.prompt_batch(lists), answers[:, : k * c]], axis=1)
        return prompt, answers[:, k * c : k * c + c]

    def canvas_lengths(self, model) -> list[int]:
        return sorted(set(self.opts["canvas_lengths"]))

    def save_tokenizer(self, out: Path) -> None:
        write_char_tokenizer(out)


TASKS = {"sudoku": SudokuTask, "sort": SortTask}


def write_char_tokenizer(out: Path) -> None:
    """The small models' tokenizer: one token per character (digits, '.', newline) plus
    Gemma's special tokens at the same low ids (pad 0, eos 1, bos 2, unk 3)."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    from .sudoku import VOCAB

    tok = Tokenizer(models.WordLevel({t: i for i, t in enumerate(VOCAB)}, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Split(Regex(r"[\s\S]"), behavior="isolated")
    tok.decoder = decoders.Fuse()
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<bos>", eos_token="<eos>", pad_token="<pad>", unk_token="<unk>"
    )
    fast.save_pretrained(out)


# -- the model ---------------------------------------------------------------------------------


def build(cfg: TrainConfig) -> tuple[DiffusionGemma, dict, GenerationConfig, Path | None]:
    """(model, config.json dict, generation config, directory holding the tokenizer or None)."""
    if cfg.init_from:
        from .loading import LoadError, build_model, resolve

        try:
            src = resolve(cfg.init_from)
            model = build_model(src, dtype=mx.float32)
        except LoadError as e:
            raise TrainError(f"init_from: {e}") from None
        raw = dict(model.config.raw)
        quantized = raw.pop("quantization", None)
        gen = with_generation(model.generation_config, cfg.generation)
        if cfg.grow_depth:
            if quantized:  # the copies train in full, so they need full-precision weights to copy
                raise TrainError(f"grow_depth: init_from {src} is quantized; grow from the full-precision "
                                 "checkpoint it was converted from (convert without --quantize)")
            model, raw = grow_depth(model, raw, cfg.grow_depth)
        return model, raw, gen, src
    raw = {"model_type": "diffusion_gemma", "architectures": ["DiffusionGemmaForBlockDiffusion"], **cfg.model}
    try:
        config = ModelConfig.from_dict(raw, source="model")
    except (ConfigError, TypeError, ValueError) as e:
        raise TrainError(str(e)) from None
    gen = with_generation(GenerationConfig(), cfg.generation)
    mx.random.seed(cfg.seed)
    model = DiffusionGemma(config)
    mx.eval(model.parameters())
    return model, raw, gen, None


# the two writes a layer makes into the residual stream; zero scales make it return its input
RESIDUAL_WRITES = ("post_attention_layernorm", "post_feedforward_layernorm")


def grow_depth(model: DiffusionGemma, raw: dict, times: int) -> tuple[DiffusionGemma, dict]:
    """The network with its layers stacked `times` over (layer i + k·n a copy of layer i) and the
    config.json dict that describes it. Each copy after the first has its residual writes scaled
    to zero and its layer scalar at 1: it passes its input through unchanged, so the deeper network
    computes what the trained one did, and training moves the copies' scales off zero."""
    text = dict(raw["text_config"])
    n = model.config.num_hidden_layers
    text["num_hidden_layers"] = n * times
    text["layer_types"] = [spec.kind for spec in model.config.layers] * times
    if text.get("per_layer_config"):
        per_layer = {int(i): v for i, v in text["per_layer_config"].items()}
        text["per_layer_config"] = {str(i + k * n): v for k in range(times) for i, v in sorted(per_layer.items())}
    raw = {**raw, "text_config": text}
    deeper = DiffusionGemma(ModelConfig.from_dict(raw, source="grow_depth"))
    grown = []
    for name, value in tree_flatten(model.parameters()):
        if not name.startswith("layers."):
            grown.append((name, value))
            continue
        _, i, rest = name.split(".", 2)
        for k in range(times):
            if k and rest.split(".")[0] in RESIDUAL_WRITES:
                value_k = mx.zeros_like(value)
            elif k and rest == "layer_scalar":
                value_k = mx.ones_like(value)
            else:
                value_k = value
            grown.append((f"layers.{int(i) + k * n}.{rest}", value_k))
    deeper.load_weights(grown, strict=True)
    mx.eval(deeper.parameters())
    return deeper, raw


def apply_lora(model: nn.Module, lora: dict, seed: int) -> None:
    """Freeze the model and wrap the named projections in mlx-lm LoRA layers (trainable)."""
    from mlx_lm.models.switch_layers import SwitchLinear
    from mlx_lm.tuner.lora import LoRALinear, LoRASwitchLinear

    rank, scale = int(lora.get("rank", 8)), float(lora.get("scale", 20.0))
    keys = set(lora.get("keys", LORA_KEYS))
    mx.random.seed(seed + 1)
    model.freeze()
    swaps = []
    for path, module in model.named_modules():
        name = path.rsplit(".", 1)[-1]
        if name not in keys:
            continue
        if isinstance(module, SwitchLinear):
            swaps.append((path, LoRASwitchLinear.from_base(module, r=rank, scale=scale)))
        elif isinstance(module, nn.Linear):
            swaps.append((path, LoRALinear.from_base(module, r=rank, scale=scale)))
    if not swaps:
        raise TrainError(f"lora: no projection named {sorted(keys)} found in the model")
    model.update_modules(tree_unflatten(swaps))


def fused_weights(model: nn.Module) -> dict[str, mx.array]:
    """The model's weights with every LoRA layer folded into its base (bare engine names)."""
    from mlx_lm.tuner.lora import LoRALinear, LoRASwitchLinear

    lora_paths = [p for p, m in model.named_modules() if isinstance(m, (LoRALinear, LoRASwitchLinear))]
    weights = dict(tree_flatten(model.parameters()))
    for path in lora_paths:
        module = model
        for part in path.split("."):
            module = module[int(part)] if part.isdigit() else getattr(module, part)
        fused = module.fuse()
        for k in [k for k in weights if k.startswith(path + ".")]:
            del weights[k]
        for k, v in tree_flatten(fused.parameters()):
            weights[f"{path}.{k}"] = v
    return weights


# -- the objectives ----------------------------------------------------------------------------


def corrupt(target: np.ndarray, rng: np.random.Generator, vocab_size: int, eps: float):
    """Uniform-state corruption: per row t ~ U(eps, 1), each position replaced by a uniform random
    token (the whole vocabulary) with probability t. Returns (canvas, t)."""
    B, C = target.shape
    t = rng.uniform(eps, 1.0, size=(B, 1)).astype(np.float32)
    noisy = rng.random((B, C)) < t
    noise = rng.integers(0, vocab_size, size=(B, C))
    return np.where(noisy, noise, target).astype(np.int32), t


def draw_batch(task, cfg: TrainConfig, gen: GenerationConfig, step: int, vocab_size: int) -> list[np.ndarray]:
    """Step `step`'s loss arguments, a function of (seed, step) only, for every backend:
    [prompt, target] for the autoregressive objective; [prompt, target, canvas] for diffusion,
    plus the self-conditioning temperatures [B, 1, 1] on the steps that train the two-pass way."""
    rng = np.random.default_rng([cfg.seed, step])
    prompt, target = task.batch(step, rng)
    args = [prompt, target]
    if cfg.objective == "diffusion":
        canvas, _ = corrupt(target, rng, vocab_size, cfg.eps)
        args.append(canvas)
        if rng.random() < cfg.self_cond_prob:
            lo, hi = cfg.self_cond_temperatures or (gen.t_min, gen.t_max)
            args.append(rng.uniform(lo, hi, size=(len(target), 1, 1)).astype(np.float32))
    return args


def diffusion_loss(model, prompt, target, canvas, self_cond_temperature=None):
    """Mean canvas cross-entropy. With `self_cond_temperature` ([B, 1, 1]), a first no-grad pass
    supplies the second pass's self_cond (its logits divided by that temperature)."""
    cache = model.make_cache()
    model.encode(prompt, cache)
    self_cond = None
    if self_cond_temperature is not None:
        first = mx.stop_gradient(model.denoise(canvas, cache))
        self_cond = first / self_cond_temperature
    logits = model.denoise(canvas, cache, self_cond)
    return nn.losses.cross_entropy(logits, target, reduction="mean")


def causal_logits(model, ids, cache) -> mx.array:
    """The same network run left to right: every layer under the causal (and sliding) mask,
    appending to `cache`, and the tied head on every position -> fp32 logits [B, L, V]."""
    L, offset, masks = ids.shape[1], cache.offset, {}
    h = model.embed(ids)
    for layer, spec, c in zip(model.layers, model.config.layers, cache.layers):
        mask = model._encoder_mask(masks, spec, L, offset, c.length) if L > 1 else None
        h = layer(h, c, offset, mask, commit=L)
    cache.offset += L
    return model.logits(model.norm(h))


def autoregressive_loss(model, prompt, target):
    """Next-token cross-entropy over the canvas cells, left to right: cell i is predicted at
    position P-1+i from the prompt and cells < i (the same positions the canvas occupies)."""
    ids = mx.concatenate([prompt, target[:, :-1]], axis=1)
    logits = causal_logits(model, ids, model.make_cache())[:, prompt.shape[1] - 1 :]
    return nn.losses.cross_entropy(logits, target, reduction="mean")


def generate_autoregressive(model, prompt: np.ndarray, length: int) -> np.ndarray:
    """Greedy left-to-right decoding of `length` tokens after `prompt` [B, P] -> [B, length]."""
    cache = model.make_cache()
    logits = causal_logits(model, mx.array(prompt), cache)[:, -1]
    out = []
    for _ in range(length):
        nxt = mx.argmax(logits, axis=-1).astype(mx.int32)
        out.append(nxt)
        logits = causal_logits(model, nxt[:, None], cache)[:, -1]
        mx.eval(logits)
    return np.array(mx.stack(out, axis=1))


# -- checkpoints -------------------------------------------------------------------------------


def save_model_dir(out: Path, model, config_json: dict, gen: GenerationConfig, tokenizer_src, task) -> None:
    """A loadable model directory: weights (LoRA fused), config.json, generation_config.json, tokenizer."""
    out.mkdir(parents=True, exist_ok=True)
    weights = fused_weights(model)
    mx.save_safetensors(str(out / "model.safetensors"), weights, metadata={"format": "mlx"})
    (out / "config.json").write_text(json.dumps(config_json, indent=2) + "\n")
    (out / "generation_config.json").write_text(generation_json(gen, model.config.bos_token_id))
    if tokenizer_src is not None:
        for f in Path(tokenizer_src).iterdir():
            if f.name.startswith("tokenizer") or f.name in ("special_tokens_map.json", "chat_template.jinja"):
                shutil.copy(f, out / f.name)
    else:
        task.save_tokenizer(out)


def save_checkpoint(cfg, step, model, optimizer, config_json, gen, tokenizer_src, task) -> Path:
    """OUT/checkpoints/step-N: written in a temporary directory, then renamed into place."""
    root = Path(cfg.out_dir) / "checkpoints"
    root.mkdir(parents=True, exist_ok=True)
    final = root / f"step-{step:07d}"
    with atomic_dir(final) as tmp:
        save_model_dir(tmp, model, config_json, gen, tokenizer_src, task)
        # training state lives in a subfolder: `load` reads every *.safetensors beside config.json
        (tmp / "state").mkdir()
        mx.save_safetensors(str(tmp / "state" / "optimizer.safetensors"), dict(tree_flatten(optimizer.state)))
        if cfg.lora is not None:
            mx.save_safetensors(str(tmp / "state" / "adapters.safetensors"),
                                dict(tree_flatten(model.trainable_parameters())))
        (tmp / "trainer_state.json").write_text(json.dumps({"step": step, "config": asdict(cfg)}, indent=2))
    for old in sorted(p for p in root.glob("step-*") if p.is_dir())[: -cfg.keep_checkpoints]:
        shutil.rmtree(old, ignore_errors=True)
    return final


def latest_checkpoint(out_dir) -> Path | None:
    root = Path(out_dir) / "checkpoints"
    done = sorted(p for p in root.glob("step-*") if (p / "trainer_state.json").exists()) if root.exists() else []
    return done[-1] if done else None


def restore(ckpt: Path, cfg: TrainConfig, model, optimizer) -> int:
    """Load weights (or adapters) and optimizer state from `ckpt`; returns its step."""
    state = json.loads((ckpt / "trainer_state.json").read_text())
    state_dir = ckpt / "state" if (ckpt / "state").is_dir() else ckpt  # early checkpoints kept it beside
    if cfg.lora is not None:
        model.load_weights(str(state_dir / "adapters.safetensors"), strict=False)
    else:
        model.load_weights(str(ckpt / "model.safetensors"), strict=True)
    opt = mx.load(str(state_dir / "optimizer.safetensors"))
    optimizer.state = tree_unflatten(list(opt.items()))
    mx.eval(model.parameters(), optimizer.state)
    return int(state["step"])


# -- the loop ----------------------------------------------------------------------------------


def schedule(cfg: TrainConfig):
    warm = optim.linear_schedule(cfg.learning_rate * 0.01, cfg.learning_rate, max(1, cfg.warmup_steps))
    decay = optim.cosine_decay(cfg.learning_rate, max(1, cfg.steps - cfg.warmup_steps), cfg.learning_rate * 0.05)
    return optim.join_schedules([warm, decay], [max(1, cfg.warmup_steps)])


def accumulate(loss_and_grad, args, n: int):
    """(loss, grads) of a batch-mean loss over `args` (batch first), from `n` equal slices of the batch:
    the mean of the slices' losses and gradients is the whole batch's."""
    if n == 1:
        return loss_and_grad(*args)
    loss, grads = 0.0, None
    for part in zip(*(mx.split(a, n) for a in args)):
        l, g = loss_and_grad(*part)
        loss = loss + l / n
        grads = tree_map(lambda x: x / n, g) if grads is None else tree_map(lambda a, b: a + b / n, grads, g)
    return loss, grads


def prepare(cfg: TrainConfig, log=print):
    """What a run starts from, for either trainer: (task, MLX model with LoRA applied, config.json
    dict, generation config, tokenizer source, AdamW initialised, start step, latest checkpoint),
    restored from that checkpoint when there is one."""
    task = TASKS[cfg.task](cfg)
    model, config_json, gen, tokenizer_src = build(cfg)
    # what the fast path's short canvases check (fast.check_model)
    config_json = {**config_json, "objective": cfg.objective, "trained_canvas_lengths": task.canvas_lengths(model)}
    if cfg.lora is not None:
        apply_lora(model, cfg.lora, cfg.seed)
    optimizer = optim.AdamW(learning_rate=schedule(cfg), weight_decay=cfg.weight_decay)
    optimizer.init(model.trainable_parameters())
    start, ckpt = 0, latest_checkpoint(cfg.out_dir)
    if ckpt is not None:
        start = restore(ckpt, cfg, model, optimizer)
        log(f"resuming from {ckpt} (step {start})")
    return task, model, config_json, gen, tokenizer_src, optimizer, start, ckpt


def train(cfg: TrainConfig, progress: bool = True, log=print, stop_at: int | None = None, on_step=None,
          deadline: float | None = None) -> Path:
    """Run (or resume) training; returns the directory of the last checkpoint. `stop_at` ends the
    run early at that step (with a checkpoint) while keeping the schedule of the full `steps`;
    `deadline` (a time.time() value) does the same at the first step that ends after it.
    `on_step(step, loss, seconds)` sees every finished step (seconds: that step's wall time)."""
    task, model, config_json, gen, tokenizer_src, optimizer, start, ckpt = prepare(cfg, log)
    V = model.config.vocab_size
    n_params = sum(v.size for _, v in tree_flatten(model.parameters()))
    n_train = sum(v.size for _, v in tree_flatten(model.trainable_parameters()))
    log(f"{cfg.objective} training: {n_params / 1e6:.2f}M parameters, {n_train / 1e6:.3f}M trainable")

    def loss_fn(*args):
        if cfg.objective == "autoregressive":
            return autoregressive_loss(model, *args[:2])
        return diffusion_loss(model, *args)

    loss_and_grad = nn.value_and_grad(model, loss_fn)

    def update(*args):
        loss, grads = accumulate(loss_and_grad, args, cfg.micro_batches)
        if cfg.grad_clip:
            grads, _ = optim.clip_grad_norm(grads, cfg.grad_clip)
        optimizer.update(model, grads)
        return loss

    state = [model.state, optimizer.state]
    step_fn = mx.compile(update, inputs=state, outputs=state) if cfg.compile else update

    def take_step(step: int) -> float:
        loss = step_fn(*(mx.array(a) for a in draw_batch(task, cfg, gen, step, V)))
        mx.eval(loss, model.state, optimizer.state)
        return float(loss)

    def save(done: int) -> Path:
        return save_checkpoint(cfg, done, model, optimizer, config_json, gen, tokenizer_src, task)

    return run_steps(cfg, start, stop_at, take_step, save, ckpt, progress, log, on_step, deadline,
                     lr=lambda: float(optimizer.learning_rate))


def run_steps(cfg: TrainConfig, start: int, stop_at: int | None, take_step, save, last: Path | None,
              progress: bool = True, log=print, on_step=None, deadline: float | None = None, lr=None) -> Path | None:
    """The loop both trainers share: `take_step(step)` trains one step and returns its loss;
    `save(done)` writes a checkpoint and returns it. Checks the loss, keeps its running mean for
    the progress bar (or log lines), calls `on_step(done, loss, seconds)`, checkpoints every
    `save_every` steps, at the end, and at the first step ending after `deadline`. Returns the
    last checkpoint."""
    end = cfg.steps if stop_at is None else min(stop_at, cfg.steps)
    bar = None
    if progress and start < end:
        from tqdm import tqdm

        bar = tqdm(total=cfg.steps, initial=start, unit="step", dynamic_ncols=True, file=sys.stderr)
    running, tic = None, time.perf_counter()
    for step in range(start, end):
        step_tic = time.perf_counter()
        loss = take_step(step)
        if not math.isfinite(loss):
            raise TrainError(f"step {step}: the loss is {loss}; lower learning_rate or raise warmup_steps")
        running = loss if running is None else 0.95 * running + 0.05 * loss
        done = step + 1
        if on_step is not None:
            on_step(done, loss, time.perf_counter() - step_tic)
        if bar is not None:
            bar.update(1)
            bar.set_postfix(loss=f"{running:.4f}", **({"lr": f"{lr():.2e}"} if lr else {}))
        if done % cfg.log_every == 0 and bar is None:
            log(f"step {done}/{cfg.steps} loss {running:.4f} ({time.perf_counter() - tic:.0f}s)")
        late = deadline is not None and time.time() > deadline and done < end
        if done % cfg.save_every == 0 or done == end or late:
            last = save(done)
        if late:
            log(f"deadline reached: stopped at step {done} of {cfg.steps} (checkpoint {last})")
            break
    if bar is not None:
        bar.close()
    return last


def with_generation(base: GenerationConfig, section: dict) -> GenerationConfig:
    """`base` with the config's `generation:` section applied; a bad section is a TrainError."""
    try:
        return base.override(**section)
    except (TypeError, ValueError) as e:
        raise TrainError(f"generation: {e}") from None


def generation_json(gen: GenerationConfig, bos_token_id) -> str:
    """generation_config.json as transformers writes it (the entropy bound also under sampler_config)."""
    g = asdict(gen)
    g["sampler_config"] = {"entropy_bound": gen.entropy_bound, "_cls_name": "EntropyBoundSamplerConfig"}
    g["bos_token_id"] = bos_token_id
    return json.dumps(g, indent=2) + "\n"


def export(checkpoint: Path, out: Path, generation: dict | None = None) -> None:
    """Copy the loadable part of a checkpoint (no optimizer state) to `out`, atomically.
    `generation` (the config's `generation:` section) is applied to its generation_config.json, so
    the export samples as the config says. Without `self_cond_temperatures`, training reads the same
    section (self-conditioning draws its temperatures from t_min..t_max): then edit it in a new
    stage's config, not a finished one."""
    with atomic_dir(out) as tmp:
        for f in Path(checkpoint).iterdir():
            if f.is_file() and f.name not in ("optimizer.safetensors", "trainer_state.json"):
                shutil.copy(f, tmp / f.name)
        if generation:
            saved = json.loads((tmp / "generation_config.json").read_text())
            gen = with_generation(GenerationConfig.from_dict(saved), generation)
            (tmp / "generation_config.json").write_text(generation_json(gen, saved.get("bos_token_id")))
        state = Path(checkpoint) / "trainer_state.json"
        if state.exists():  # how the model was trained (steps, batch, seed...), for the record
            shutil.copy(state, tmp / "training.json")


def main(argv=None) -> int:
    import argparse

    parser = argparse.ArgumentParser(prog="python -m mlx_diffgemma.train", description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", required=True, help="training config (YAML or JSON)")
    parser.add_argument("--steps", type=int, default=None, help="override the config's steps")
    parser.add_argument("--stop-at", type=int, default=None,
                        help="stop at this step (with a checkpoint), keeping the learning-rate schedule of `steps`")
    parser.add_argument("--export", default=None, help="after training, copy the final model directory here")
    parser.add_argument("--no-progress", action="store_true", help="log lines instead of a progress bar")
    parser.add_argument("--backend", choices=["mlx", "torch"], default="mlx",
                        help="take the steps with MLX (default) or torch (mlx_diffgemma/torch_backend/train.py)")
    parser.add_argument("--device", default="cuda", help="with --backend torch: cuda (default) or cpu")
    args = parser.parse_args(argv)
    run = train
    if args.backend == "torch":
        try:
            from .torch_backend.train import train as run
        except ImportError as e:
            print(f"error: --backend torch needs torch ({e}); pip install 'mlx-diffgemma[torch]'", file=sys.stderr)
            return 2
    try:
        cfg = TrainConfig.from_file(args.config)
        if args.steps is not None:
            cfg.steps = args.steps
            cfg.validate(args.config)
        kw = {"device": args.device} if args.backend == "torch" else {}
        last = run(cfg, progress=not args.no_progress, stop_at=args.stop_at, **kw)
        if args.export:
            export(last, Path(args.export), cfg.generation)
            print(f"exported {last} -> {args.export}")
        else:
            print(last)
    except TrainError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
