"""Logits parity with transformers' DiffusionGemmaForBlockDiffusion, fp32, on tiny random models."""

import mlx.core as mx
import numpy as np
import pytest
import torch
from transformers import DiffusionGemmaForBlockDiffusion, DynamicCache

from mlx_diffgemma import load
from reference import hf_step


def close(ours, ref):
    ours, ref = np.asarray(ours), np.asarray(ref)
    tol = 1e-4 * max(1.0, float(np.abs(ref).max()))
    diff = float(np.abs(ours - ref).max())
    assert diff <= tol, f"max abs diff {diff:.3g} > {tol:.3g}"


@pytest.fixture(scope="module")
def pair(tiny_checkpoint):
    path, _ = tiny_checkpoint
    hf = DiffusionGemmaForBlockDiffusion.from_pretrained(path, dtype=torch.float32).eval()
    model, _ = load(path)
    return hf, model


@pytest.mark.parametrize("prefix_len", [3, 40])  # 40 is longer than every tiny sliding window
def test_encode_then_denoise(pair, prefix_len):
    hf, model = pair
    V, C = model.config.vocab_size, model.config.canvas_length
    rng = np.random.default_rng(prefix_len)
    prefix, canvas = rng.integers(0, V, (1, prefix_len)), rng.integers(0, V, (1, C))

    hf_cache = DynamicCache(config=hf.config.text_config)
    ref = hf_step(hf, hf_cache, canvas, prefix_len, input_ids=prefix)
    cache = model.make_cache()
    model.encode(mx.array(prefix), cache)
    close(model.denoise(mx.array(canvas), cache), ref)

    # the next step, self-conditioned on the tempered logits of this one
    self_cond = (ref / 0.8).astype(np.float32)
    ref_sc = hf_step(hf, hf_cache, canvas, prefix_len, self_cond=self_cond)
    close(model.denoise(mx.array(canvas), cache, mx.array(self_cond)), ref_sc)
    assert cache.offset == prefix_len  # denoise never writes the cache


def test_second_block_after_commit(pair):
    hf, model = pair
    V, C = model.config.vocab_size, model.config.canvas_length
    rng = np.random.default_rng(1)
    prefix = rng.integers(0, V, (1, 21))
    canvas1, canvas2 = rng.integers(0, V, (1, C)), rng.integers(0, V, (1, C))

    hf_cache = DynamicCache(config=hf.config.text_config)
    first = hf_step(hf, hf_cache, canvas1, 21, input_ids=prefix)
    committed = first.argmax(-1)
    ref = hf_step(hf, hf_cache, canvas2, 21 + C, input_ids=committed)  # encodes the commit, then denoises

    cache = model.make_cache()
    model.encode(mx.array(prefix), cache)
    close(model.denoise(mx.array(canvas1), cache), first)
    model.encode(mx.array(committed), cache)
    close(model.denoise(mx.array(canvas2), cache), ref)
    assert cache.offset == 21 + C


def test_sliding_cache_keeps_window_minus_one(pair):
    _, model = pair
    cache = model.make_cache()
    model.encode(mx.zeros((1, 50), dtype=mx.int32), cache)
    for spec, layer_cache in zip(model.config.layers, cache.layers):
        expected = min(50, model.config.sliding_window - 1) if spec.is_sliding else 50
        assert layer_cache.length == expected


def test_chunked_encode_matches_one_pass(gemma_checkpoint):
    path, _ = gemma_checkpoint
    model, _ = load(path)
    V, C = model.config.vocab_size, model.config.canvas_length
    rng = np.random.default_rng(5)
    prefix, canvas = rng.integers(0, V, (1, 45)), mx.array(rng.integers(0, V, (1, C)))
    whole = model.make_cache()
    model.encode(mx.array(prefix), whole)
    chunked = model.make_cache()
    for a, b in [(0, 7), (7, 30), (30, 45)]:
        model.encode(mx.array(prefix[:, a:b]), chunked)
    close(model.denoise(canvas, chunked), model.denoise(canvas, whole))


def test_bf16_error_matches_the_reference_bf16_error(gemma_checkpoint):
    """In bf16 both engines drift from fp32 (random MoE models flip an expert now and then); ours
    must drift no more than transformers' own bf16 run does."""
    path, _ = gemma_checkpoint
    V, C = 320, 32
    rng = np.random.default_rng(3)
    prefix, canvas = rng.integers(0, V, (1, 20)), rng.integers(0, V, (1, C))
    out = {}
    for name, tdtype, mdtype in [("fp32", torch.float32, mx.float32), ("bf16", torch.bfloat16, mx.bfloat16)]:
        hf = DiffusionGemmaForBlockDiffusion.from_pretrained(path, dtype=tdtype).eval()
        out["hf", name] = hf_step(hf, DynamicCache(config=hf.config.text_config), canvas, 20, input_ids=prefix)
        model, _ = load(path, dtype=mdtype)
        cache = model.make_cache()
        model.encode(mx.array(prefix), cache)
        out["mlx", name] = np.array(model.denoise(mx.array(canvas), cache))
    assert out["mlx", "bf16"].dtype == np.float32
    exact = out["hf", "fp32"]
    ours = np.abs(out["mlx", "bf16"] - exact).mean()
    theirs = np.abs(out["hf", "bf16"] - exact).mean()
    assert ours <= 2 * theirs + 1e-3, (ours, theirs)
    agree = lambda a: (a.argmax(-1) == exact.argmax(-1)).mean()  # noqa: E731
    assert agree(out["mlx", "bf16"]) >= agree(out["hf", "bf16"]) - 0.15
