"""Find the operation behind a failed kernel launch in a training step, piece by piece.

On 2026-11-28, MLX 0.32.4's CUDA backend failed the autoregressive Sudoku twin's first step at
batch 512 (`cudaGraphAddKernelNode ... invalid argument`, or `cudaLaunchKernelExC ... invalid
argument` with CUDA graphs off), while batch 256 trained. This script evaluates the step's parts
one at a time (each layer forward, then each layer's backward from a fixed input, then the
attention call alone at that shape) and reports which raise, in a few seconds:

    python -m benchmarks.cuda_launch_probe --config training/sudoku_gpu_autoregressive.yaml --batch 512 --device gpu

It prints one line per part and a JSON summary; on a CPU every part passes.
"""

from __future__ import annotations

import argparse
import json
import sys

import mlx.core as mx
import mlx.nn as nn
import numpy as np

from mlx_diffgemma.model import causal_mask
from mlx_diffgemma.train import TASKS, TrainConfig, autoregressive_loss, build


def attempt(results: dict, name: str, fn) -> bool:
    try:
        mx.eval(fn())
        results[name] = "ok"
    except Exception as e:  # the point is to see which part raises, and what
        results[name] = f"{type(e).__name__}: {str(e)[:200]}"
    print(f"{name}: {results[name]}", flush=True)
    return results[name] == "ok"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--config", required=True, help="a training config (its model and task)")
    p.add_argument("--batch", type=int, default=512)
    p.add_argument("--device", choices=["gpu", "cpu"], default=None)
    args = p.parse_args(argv)
    if args.device:
        mx.set_default_device(mx.gpu if args.device == "gpu" else mx.cpu)
    cfg = TrainConfig.from_file(args.config)
    cfg.batch_size = args.batch
    model = build(cfg)[0]
    prompt, target = TASKS[cfg.task](cfg).batch(0, np.random.default_rng(0))
    ids = mx.concatenate([mx.array(prompt), mx.array(target[:, :-1])], axis=1)  # the autoregressive pass
    B, L = ids.shape
    results: dict = {"device": str(mx.default_device()), "batch": B, "length": L}

    # forward, layer by layer, each from the previous layer's evaluated output
    h, masks = model.embed(ids), {}
    inputs = []
    for i, (layer, spec) in enumerate(zip(model.layers, model.config.layers)):
        mask = model._encoder_mask(masks, spec, L, 0, 0)  # as the trainer's causal pass builds it
        inputs.append((h, mask))
        out = layer(h, model.make_cache().layers[i], 0, mask, commit=L)
        if not attempt(results, f"layer {i} ({spec.kind}) forward", lambda: out):
            break
        h = out

    # backward of each layer alone, from its fixed input
    for i, (h_in, mask) in enumerate(inputs):
        layer = model.layers[i]
        step = nn.value_and_grad(layer, lambda x: layer(x, model.make_cache().layers[i], 0, mask, commit=L).sum())
        attempt(results, f"layer {i} backward", lambda: step(h_in))

    # the attention call alone, at this step's shapes, forward and backward
    heads, D = model.config.num_attention_heads, model.config.layers[0].head_dim
    q = mx.random.normal((B, heads, L, D))
    mask = causal_mask(L, 0, 0, None)
    sdpa = lambda q: mx.fast.scaled_dot_product_attention(q, q, q, scale=1.0, mask=mask)  # noqa: E731
    attempt(results, f"sdpa [{B}, {heads}, {L}, {D}] forward", lambda: sdpa(q))
    attempt(results, "sdpa backward", lambda: mx.grad(lambda q: sdpa(q).sum())(q))
    # and the whole step, as the trainer takes it
    whole = nn.value_and_grad(model, lambda a, b: autoregressive_loss(model, a, b))
    attempt(results, "whole step (value_and_grad)", lambda: whole(mx.array(prompt), mx.array(target)))
    print(json.dumps(results, indent=1))
    return 0 if all(v == "ok" for k, v in results.items() if k not in ("device", "batch", "length")) else 1


if __name__ == "__main__":
    sys.exit(main())
