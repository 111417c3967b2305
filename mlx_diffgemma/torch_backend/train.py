"""The MLX trainer's run on torch, for NVIDIA GPUs: `train(cfg, device="cuda")`.

Everything but the arithmetic is the MLX trainer's (`mlx_diffgemma.train`): the config, the
seeded initial weights (built in MLX and copied over), every batch and corruption draw
(`draw_batch`, a function of (seed, step)), the learning-rate schedule, AdamW as MLX applies it
(no bias correction, decay folded into the weights first), gradient clipping, and the
checkpoints, written by the MLX trainer's own `save_checkpoint` with the optimizer state in MLX's
layout. So a run can be resumed by either trainer and its checkpoints load everywhere.
`tests/test_torch_train.py` checks the two trainers take the same steps.

Full fine-tuning only (LoRA trains with the MLX trainer). The passes are the torch backend's
own, in training mode: the same modules as inference, with autograd on and the experts run
densely (`Experts._every_expert`).
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import mlx.core as mx
import numpy as np
import torch
import torch.nn.functional as F
from mlx.utils import tree_flatten, tree_unflatten

from ..train import (
    TrainConfig,
    TrainError,
    draw_batch,
    prepare,
    run_steps,
    save_checkpoint,
    schedule,
)
from .loading import from_weights
from .model import DiffusionGemma, causal_mask

BETAS, ADAM_EPS = (0.9, 0.999), 1e-8  # MLX's AdamW defaults, which the MLX trainer uses


def diffusion_loss(model: DiffusionGemma, prompt, target, canvas, self_cond_temperature=None) -> torch.Tensor:
    """Mean canvas cross-entropy; with `self_cond_temperature` ([B, 1, 1]) a first pass without
    gradients supplies the second pass's self_cond, as in the MLX trainer."""
    cache = model.make_cache()
    model.encode(prompt, cache)
    self_cond = None
    if self_cond_temperature is not None:
        with torch.no_grad():
            self_cond = model.denoise(canvas, cache) / self_cond_temperature
    logits = model.denoise(canvas, cache, self_cond)
    return F.cross_entropy(logits.flatten(0, 1), target.flatten())


def autoregressive_loss(model: DiffusionGemma, prompt, target) -> torch.Tensor:
    """Next-token cross-entropy over the canvas cells, left to right (the MLX trainer's baseline):
    every layer under the causal (and sliding) mask, cell i predicted at position P-1+i."""
    ids = torch.cat([prompt, target[:, :-1]], dim=1)
    L = ids.shape[1]
    cache = model.make_cache()
    h = model.embed(ids)
    masks = {}
    for layer, spec, c in zip(model.layers, model.config.layers, cache.layers):
        if spec.is_sliding not in masks:
            window = model.config.sliding_window if spec.is_sliding else None
            masks[spec.is_sliding] = causal_mask(L, 0, 0, window, ids.device)
        h = layer(h, c, 0, masks[spec.is_sliding], write=True)
    logits = model.logits(model.norm(h))[:, prompt.shape[1] - 1 :]
    return F.cross_entropy(logits.flatten(0, 1), target.flatten())


class AdamW:
    """MLX's AdamW on torch tensors: w <- w (1 - lr wd); m, v updated; w <- w - lr m / (sqrt(v) + eps)."""

    def __init__(self, params: dict[str, torch.Tensor], weight_decay: float):
        self.params = params
        self.weight_decay = weight_decay
        self.m = {k: torch.zeros_like(p) for k, p in params.items()}
        self.v = {k: torch.zeros_like(p) for k, p in params.items()}

    @torch.no_grad()
    def update(self, lr: float) -> None:
        names = list(self.params)
        ps = [self.params[k] for k in names]
        # a parameter the objective never reaches (the autoregressive baseline's self-conditioning
        # block) gets a zero gradient in MLX, so it still decays
        gs = [torch.zeros_like(p) if p.grad is None else p.grad for p in ps]
        ms, vs = [self.m[k] for k in names], [self.v[k] for k in names]
        b1, b2 = BETAS
        torch._foreach_mul_(ps, 1 - lr * self.weight_decay)
        torch._foreach_lerp_(ms, gs, 1 - b1)  # m + (1 - b1)(g - m) = b1 m + (1 - b1) g
        torch._foreach_mul_(vs, b2)
        torch._foreach_addcmul_(vs, gs, gs, 1 - b2)
        denom = torch._foreach_add(torch._foreach_sqrt(vs), ADAM_EPS)
        torch._foreach_addcdiv_(ps, ms, denom, -lr)


def _loss_and_grads(model: DiffusionGemma, cfg: TrainConfig, args: list, bf16: bool = False) -> torch.Tensor:
    """The batch's loss, its gradients accumulated in .grad: `micro_batches` equal slices, each
    backward scaled by 1/n, so the gradients sum to the whole batch's. `bf16` runs the passes
    under autocast (weights, optimizer and loss stay fp32)."""
    loss = 0.0
    for part in zip(*(a.chunk(cfg.micro_batches) for a in args)):
        part = [a.long() if a.dtype != torch.float32 else a for a in part]
        with torch.autocast(part[0].device.type, dtype=torch.bfloat16, enabled=bf16):
            if cfg.objective == "autoregressive":
                sliced = autoregressive_loss(model, *part[:2])
            else:
                sliced = diffusion_loss(model, *part)
        (sliced / cfg.micro_batches).backward()
        loss = loss + sliced.detach() / cfg.micro_batches
    return loss


def compile_layers(model: DiffusionGemma) -> None:
    """torch.compile each layer's forward (parameter names unchanged): a training step is mostly
    small elementwise kernels (norms, RoPE, gates) that the compiler fuses. Every layer shares
    one code object, and each layer and pass (prompt, canvas, with and without gradients) is a
    graph of its own: past dynamo's default of 8 the rest would silently run uncompiled."""
    limit = 8 * len(model.layers)
    for name in ("recompile_limit", "cache_size_limit"):  # the newer name, and the older one
        if hasattr(torch._dynamo.config, name):
            setattr(torch._dynamo.config, name, max(limit, getattr(torch._dynamo.config, name)))
    for layer in model.layers:
        layer.forward = torch.compile(layer.forward, dynamic=False)


def uncompile_layers(model: DiffusionGemma) -> None:
    for layer in model.layers:
        layer.__dict__.pop("forward", None)


def _to_torch(mlx_model, config, gen, device) -> DiffusionGemma:
    weights = {k: torch.from_numpy(np.array(v)) for k, v in tree_flatten(mlx_model.parameters())}
    model = from_weights(config, weights, gen, device=device, dtype=torch.float32, source="initial weights")
    for p in model.parameters():
        p.requires_grad_(True)
    return model.train()


def _to_mlx(model: DiffusionGemma, opt: AdamW, step: int, mlx_model, mlx_opt) -> None:
    """Copy weights and optimizer state back into the MLX model and optimizer, for a checkpoint."""

    def arr(t):
        return mx.array(t.detach().float().cpu().numpy())

    mlx_model.load_weights([(k, arr(p)) for k, p in opt.params.items()], strict=True)
    state = [(k, {"m": arr(opt.m[k]), "v": arr(opt.v[k])}) for k in opt.params]
    mlx_opt.state = {**tree_unflatten(state), "step": mx.array(step, mx.uint64),
                     "learning_rate": mlx_opt.state["learning_rate"]}
    mx.eval(mlx_model.parameters(), mlx_opt.state)


def _from_mlx(mlx_opt, opt: AdamW, device) -> None:
    flat = dict(tree_flatten(mlx_opt.state))
    for k in opt.params:
        opt.m[k].copy_(torch.from_numpy(np.array(flat[f"{k}.m"])).to(device))
        opt.v[k].copy_(torch.from_numpy(np.array(flat[f"{k}.v"])).to(device))


def train(cfg: TrainConfig, device="cuda", progress: bool = True, log=print, stop_at: int | None = None,
          on_step=None, deadline: float | None = None, tf32: bool = True, bf16: bool = False) -> Path:
    """The MLX trainer's `train` (same arguments, same checkpoints) with the steps taken by torch
    on `device`. `tf32` lets CUDA matmuls run in TF32 (as MLX's CUDA backend does by default);
    `bf16` runs the passes under bf16 autocast (half the bytes for a step that is mostly
    elementwise kernels on a GPU; the MLX trainer has no such mode, so its steps differ slightly).
    `cfg.compile` compiles the layers with torch.compile; should that fail in the first steps
    (no C++ compiler, an unsupported op), training goes on without it."""
    if cfg.lora is not None:
        raise TrainError("lora: the torch trainer does full fine-tuning only; train LoRA with python -m mlx_diffgemma.train")
    try:
        device = torch.device(device)
    except RuntimeError:
        raise TrainError(f"device {device!r} is not a torch device; use cuda or cpu") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise TrainError(f"device {device}: torch sees no CUDA GPU here; use cpu")
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = tf32
        torch.backends.cudnn.allow_tf32 = tf32
    task, mlx_model, config_json, gen, tokenizer_src, mlx_opt, start, last = prepare(cfg, log)
    model = _to_torch(mlx_model, mlx_model.config, gen, device)
    params = dict(model.named_parameters())
    opt = AdamW(params, cfg.weight_decay)
    if start:
        _from_mlx(mlx_opt, opt, device)
    if cfg.compile:
        compile_layers(model)
    lr_at = schedule(cfg)
    V = model.config.vocab_size
    log(f"{cfg.objective} training on torch ({device}): {sum(p.numel() for p in params.values()) / 1e6:.2f}M parameters")

    def batch(step):  # host-side numpy, drawn one step ahead on a worker thread
        args = [torch.from_numpy(a) for a in draw_batch(task, cfg, gen, step, V)]
        if device.type == "cuda":  # pinned, so the copy does not wait for the running step
            args = [a.pin_memory().to(device, non_blocking=True) for a in args]
        return args

    end = cfg.steps if stop_at is None else min(stop_at, cfg.steps)
    ahead = None  # the next step's batch, in flight on the worker thread
    compiled, lr = bool(cfg.compile), 0.0

    def take_step(step: int) -> float:
        nonlocal ahead, compiled, lr
        args = (ahead or pool.submit(batch, step)).result()
        ahead = pool.submit(batch, step + 1) if step + 1 < end else None
        try:
            loss = _loss_and_grads(model, cfg, args, bf16)
        except Exception as e:  # each graph compiles on its first use, all within the first steps
            if not compiled or step > start + 10:
                raise
            log(f"torch.compile failed ({type(e).__name__}: {str(e).strip().splitlines()[0][:200]}); "
                "training without it")
            uncompile_layers(model)
            compiled = False
            for p in params.values():
                p.grad = None
            loss = _loss_and_grads(model, cfg, args, bf16)
        if cfg.grad_clip:
            # torch's rule is MLX's: scale by min(max_norm / (norm + 1e-6), 1)
            torch.nn.utils.clip_grad_norm_(list(params.values()), cfg.grad_clip)
        lr = float(lr_at(mx.array(step)))
        opt.update(lr)
        for p in params.values():
            p.grad = None
        return loss.item()

    def save(done: int) -> Path:
        _to_mlx(model, opt, done, mlx_model, mlx_opt)
        return save_checkpoint(cfg, done, mlx_model, mlx_opt, config_json, gen, tokenizer_src, task)

    with ThreadPoolExecutor(1) as pool:
        return run_steps(cfg, start, stop_at, take_step, save, last, progress, log, on_step, deadline,
                         lr=lambda: lr)
