"""The torch backend against MLX and transformers: logits, head statistics, generation, loading.

Runs on the CPU by default; `MLX_DIFFGEMMA_TORCH_DEVICE=cuda` runs the same suite on an NVIDIA GPU
(benchmarks/torch_gpu.py does that). Parity is checked in fp32.
"""

import json
import os
import shutil
import subprocess
import sys

import mlx.core as mx
import numpy as np
import pytest
import torch
from transformers import DiffusionGemmaForBlockDiffusion, DynamicCache

from mlx_diffgemma import LoadError, load, stream_generate
from mlx_diffgemma.generate import denoise_canvas, ops_for
from mlx_diffgemma.kernels.reference import head_statistics as mlx_head_statistics
from mlx_diffgemma.sampler import NoiseSource, finalize_block
from mlx_diffgemma.testing import quantized_copy
from mlx_diffgemma.torch_backend import dequantize, head_statistics
from reference import hf_step

DEVICE = os.environ.get("MLX_DIFFGEMMA_TORCH_DEVICE", "cpu")
if DEVICE.startswith("cuda") and not torch.cuda.is_available():
    pytest.skip(f"MLX_DIFFGEMMA_TORCH_DEVICE={DEVICE} but torch sees no GPU", allow_module_level=True)


@pytest.fixture(autouse=True, scope="module")
def one_cpu_thread():
    """On shared cores, torch's OpenMP spin-waits make tiny ops 10-100x slower: one thread here."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def close(ours, ref, what=""):
    ours, ref = np.asarray(ours), np.asarray(ref)
    tol = 1e-4 * max(1.0, float(np.abs(ref).max()))
    diff = float(np.abs(ours - ref).max())
    assert diff <= tol, f"{what}: max abs diff {diff:.3g} > {tol:.3g}"


def np_(x):
    return x.detach().cpu().numpy() if isinstance(x, torch.Tensor) else np.array(x)


def torch_load(path, dtype="float32"):
    model, tokenizer = load(path, backend="torch", device=DEVICE, dtype=dtype)
    assert model.device.type == torch.device(DEVICE).type
    return model, tokenizer


# -- logits ----------------------------------------------------------------------------------


def test_logits_match_mlx_and_transformers(tiny_checkpoint):
    """Prefix longer than every sliding window, self-conditioning, a commit and a second canvas."""
    path, _ = tiny_checkpoint
    hf = DiffusionGemmaForBlockDiffusion.from_pretrained(path, dtype=torch.float32).eval()
    mlx_model, _ = load(path)
    model, _ = torch_load(path)
    V, C = model.config.vocab_size, model.config.canvas_length
    rng = np.random.default_rng(4)
    prefix, canvas1, canvas2 = rng.integers(0, V, (1, 40)), rng.integers(0, V, (1, C)), rng.integers(0, V, (1, C))

    hf_cache = DynamicCache(config=hf.config.text_config)
    mlx_cache, cache = mlx_model.make_cache(), model.make_cache()
    ref = hf_step(hf, hf_cache, canvas1, 40, input_ids=prefix)
    mlx_model.encode(mx.array(prefix), mlx_cache)
    model.encode(prefix, cache)
    ours = model.denoise(canvas1, cache)
    assert ours.dtype == torch.float32 and tuple(ours.shape) == (1, C, V)
    close(np_(ours), ref, "vs transformers, first step")
    close(np_(ours), np_(mlx_model.denoise(mx.array(canvas1), mlx_cache)), "vs MLX, first step")

    self_cond = (ref / 0.8).astype(np.float32)
    ref_sc = hf_step(hf, hf_cache, canvas1, 40, self_cond=self_cond)
    ours_sc = model.denoise(canvas1, cache, model.ops.asarray(self_cond))
    close(np_(ours_sc), ref_sc, "vs transformers, self-conditioned")
    close(np_(ours_sc), np_(mlx_model.denoise(mx.array(canvas1), mlx_cache, mx.array(self_cond))), "vs MLX, self-cond")
    assert cache.offset == 40  # denoise never writes the cache

    committed = ref.argmax(-1)
    ref2 = hf_step(hf, hf_cache, canvas2, 40 + C, input_ids=committed)
    mlx_model.encode(mx.array(committed), mlx_cache)
    model.encode(committed, cache)
    ours2 = model.denoise(canvas2, cache)
    close(np_(ours2), ref2, "vs transformers, second canvas")
    close(np_(ours2), np_(mlx_model.denoise(mx.array(canvas2), mlx_cache)), "vs MLX, second canvas")
    assert cache.offset == 40 + C
    for spec, layer_cache in zip(model.config.layers, cache.layers):
        expected = min(40 + C, model.config.sliding_window - 1) if spec.is_sliding else 40 + C
        assert layer_cache.length == expected


def test_grouped_and_per_expert_paths_agree(gemma_checkpoint):
    path, _ = gemma_checkpoint
    model, _ = torch_load(path)
    experts = model.layers[0].experts
    g = torch.Generator().manual_seed(0)
    E, k = model.config.num_experts, model.config.top_k_experts
    x = torch.randn(37, model.config.hidden_size, generator=g).to(model.device)
    idx = torch.stack([torch.randperm(E, generator=g)[:k] for _ in range(37)]).to(model.device)
    w = torch.rand(37, k, generator=g).to(model.device)
    experts.use_grouped_mm = False
    loop = experts(x, idx, w)
    # the plain definition: sum_k w_k * down_e(gelu(gate_e(x)) * up_e(x))
    ref = torch.zeros_like(x)
    for n in range(37):
        for j in range(k):
            e = int(idx[n, j])
            gate, up = (experts.gate_up_proj.weight[e] @ x[n]).chunk(2)
            ref[n] += w[n, j] * (experts.down_proj.weight[e] @ (torch.nn.functional.gelu(gate, approximate="tanh") * up))
    torch.testing.assert_close(loop, ref, rtol=1e-5, atol=1e-5)
    if hasattr(torch.nn.functional, "grouped_mm") and model.device.type == "cpu":
        experts.use_grouped_mm = True
        torch.testing.assert_close(experts(x, idx, w), ref, rtol=1e-5, atol=1e-5)
    experts.use_grouped_mm = None


# -- the sampler's head statistics -----------------------------------------------------------


def test_head_statistics_matches_the_mlx_reference():
    rng = np.random.default_rng(0)
    logits = (30 * np.tanh(rng.normal(0, 8, (2, 50, 999)) / 30)).astype(np.float32)
    logits[0, 3] = -30.0  # a flat row: entropy log(V), samples spread over the vocabulary
    logits[1, 7, 5] = 30.0  # a peaked row
    uniforms = rng.random((2, 50), dtype=np.float32)
    uniforms[0, 0] = 0.0
    t = np.float32(0.6166667)
    ref = [np.array(a) for a in mlx_head_statistics(mx.array(logits), t, mx.array(uniforms))]
    for chunk in (7, 64):
        out = [np_(a) for a in head_statistics(torch.tensor(logits, device=DEVICE), t, torch.tensor(uniforms), chunk)]
        np.testing.assert_array_equal(out[0], ref[0])  # z: the same fp32 division
        np.testing.assert_array_equal(out[1], ref[1])
        np.testing.assert_allclose(out[2], ref[2], rtol=1e-5, atol=2e-5)  # fp32 reduction order
        np.testing.assert_array_equal(out[3], ref[3])
        assert out[3].dtype == np.int32 and out[2].dtype == np.float32
    assert len(set(out[3][0].tolist())) > 40  # the uniforms really drive the draw


# -- generation -----------------------------------------------------------------------------

SETTINGS = [
    dict(max_tokens=24, max_denoising_steps=12, confidence_threshold=1e-9),  # 3 canvases, fixed steps
    dict(max_tokens=40, max_denoising_steps=48, stability_threshold=1, confidence_threshold=2.0),  # early stop
    dict(max_tokens=32, max_denoising_steps=20, stability_threshold=0, confidence_threshold=0.3),
]


def generate_ids(model, tokenizer, prompt, seed, **kw):
    """`stream_generate` (the shared block loop): (done event, per-step (block, step, accepted, argmax))."""
    events = list(stream_generate(model, tokenizer, prompt, seed=seed, eos_token_id=[10**6], **kw))
    steps = [(e.block, e.step, e.accepted, e.canvas.tolist()) for e in events if e.kind == "step"]
    return events[-1].token_ids, events[-1].stats.steps_per_canvas, steps


def block_loop(model, prompt, seed, max_tokens, **overrides):
    """The same block loop written out on the calling thread, from the shared pieces (sampler,
    noise source, denoise_canvas): the MLX side of the comparison."""
    gen = model.generation_config.override(max_new_tokens=max_tokens, eos_token_id=[10**6], **overrides)
    noise, cache, ops = NoiseSource(seed, model.config.vocab_size), model.make_cache(), ops_for(model)
    model.encode(ops.asarray([prompt]), cache)
    tokens, per_canvas, steps = [], [], []
    for block in range(-(-max_tokens // model.config.canvas_length)):
        on_step = lambda i, r, b=block: steps.append((b, i, int(r.accepted[0].sum()), r.argmax[0].tolist()))  # noqa: E731
        argmax, n = denoise_canvas(model, cache, gen, noise, block, on_step=on_step)
        committed, _ = finalize_block(argmax, gen)
        tokens += committed[0].tolist()
        per_canvas.append(n)
        model.encode(ops.asarray(committed), cache)
    return tokens, per_canvas, steps


@pytest.mark.parametrize("settings", SETTINGS, ids=["fixed-steps", "stable-and-confident", "confident"])
def test_generate_token_identical_to_mlx(sharp_checkpoint, settings):
    path, _ = sharp_checkpoint
    mlx_model, tokenizer = load(path)
    model, _ = torch_load(path)
    prompt = [2, 4, 40, 41, 42, 43, 5, 4, 44]
    ref_tokens, ref_per_canvas, ref_steps = block_loop(mlx_model, prompt, 11, **settings)
    tokens, per_canvas, steps = generate_ids(model, tokenizer, prompt, 11, **settings)
    assert len(per_canvas) >= 3
    assert tokens == ref_tokens
    assert per_canvas == ref_per_canvas
    assert steps == ref_steps  # every step's argmax canvas and accepted count
    if settings["confidence_threshold"] > 1e-6:
        assert min(per_canvas) < settings["max_denoising_steps"], "no canvas stopped early"


def test_fast_modes_are_refused_in_one_line(sharp_checkpoint):
    model, tokenizer = torch_load(sharp_checkpoint[0])
    with pytest.raises(ValueError, match="the fast modes run on the MLX backend only"):
        list(stream_generate(model, tokenizer, [2, 4, 40], max_tokens=8, mode="settled"))


def test_generate_token_identical_to_mlx_on_the_gemma_pattern(gemma_checkpoint):
    """Wider distributions (no logit gain): the acceptance rule keeps few positions per step."""
    path, _ = gemma_checkpoint
    mlx_model, tokenizer = load(path)
    model, _ = torch_load(path)
    prompt = [2, 4, 60, 61, 62, 63, 64, 5, 4, 44]
    kw = dict(max_tokens=96, max_denoising_steps=8)
    ref_tokens, ref_per_canvas, ref_steps = block_loop(mlx_model, prompt, 3, **kw)
    tokens, per_canvas, steps = generate_ids(model, tokenizer, prompt, 3, **kw)
    assert per_canvas == ref_per_canvas == [8, 8, 8]
    assert tokens == ref_tokens
    assert steps == ref_steps


# -- loading --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "mode,group_size,bits",
    [("affine", 64, 4), ("affine", 32, 2), ("affine", 32, 3), ("affine", 64, 5), ("affine", 128, 6),
     ("affine", 32, 8), ("mxfp4", 32, 4), ("nvfp4", 16, 4), ("mxfp8", 32, 8)],
)
def test_dequantize_matches_mlx(mode, group_size, bits):
    w = mx.random.normal((3, 5, 256), key=mx.random.key(bits + group_size))
    kw = dict(group_size=group_size, bits=bits, mode=mode)
    packed, scales, *rest = mx.quantize(w, **kw)
    biases = rest[0] if rest and rest[0] is not None else None
    ref = np.array(mx.dequantize(packed, scales, biases, **kw).astype(mx.float32))
    t = lambda a: torch.from_numpy(np.array(a)).to(DEVICE)  # noqa: E731
    ours = dequantize(t(packed), t(scales), None if biases is None else t(biases), group_size, bits, mode,
                      dtype=torch.float32, chunk_rows=4)
    np.testing.assert_allclose(np_(ours), ref, rtol=1e-6, atol=1e-6)
    assert np.abs(ref - np.array(w)).mean() < 0.6  # a real round trip, not zeros


def test_quantized_checkpoint_matches_mlx(gemma_checkpoint, tmp_path):
    path, _ = gemma_checkpoint
    qdir = quantized_copy(path, tmp_path / "q")
    mlx_model, _ = load(qdir)
    assert mlx_model.layers[0].experts.gate_up_proj.bits == 4
    model, _ = torch_load(qdir)
    V, C = model.config.vocab_size, model.config.canvas_length
    rng = np.random.default_rng(8)
    prefix, canvas = rng.integers(0, V, (1, 20)), rng.integers(0, V, (1, C))
    mc, tc = mlx_model.make_cache(), model.make_cache()
    mlx_model.encode(mx.array(prefix), mc)
    model.encode(prefix, tc)
    ref = np.array(mlx_model.denoise(mx.array(canvas), mc))
    ours = np_(model.denoise(canvas, tc))
    close(ours, ref, "quantized checkpoint vs MLX")
    # and the dequantized weights really are the quantized ones, not the float originals
    float_model, _ = torch_load(path)
    a, b = model.layers[0].experts.gate_up_proj.weight, float_model.layers[0].experts.gate_up_proj.weight
    assert 0 < float((a - b).abs().max()) < 0.5 * float(b.abs().max())


S, F = "sliding_attention", "full_attention"
# every input width a multiple of 64, so each of the converter's recipes can quantize it
QUANTIZABLE = dict(
    hidden_size=128, num_hidden_layers=2, layer_types=[S, F], num_attention_heads=4, num_key_value_heads=2,
    head_dim=32, global_head_dim=64, num_global_key_value_heads=1, intermediate_size=128,
    moe_intermediate_size=64, num_experts=4, top_k_experts=2, sliding_window=8,
)


@pytest.fixture(scope="module")
def quantizable_checkpoint(tmp_path_factory):
    from mlx_diffgemma.testing import build_checkpoint

    path, _ = build_checkpoint(tmp_path_factory.mktemp("quantizable"), text_overrides=QUANTIZABLE, canvas_length=16,
                               seed=5, logit_gain=10.0)
    return path


@pytest.mark.parametrize("recipe", ["mixed", "mxfp4", "nvfp4", "mxfp8"])
def test_converted_checkpoints_match_mlx(quantizable_checkpoint, recipe, tmp_path):
    """The converter's output (mlx_diffgemma.convert), every recipe: affine 4/8-bit and the fp formats."""
    cv = pytest.importorskip("mlx_diffgemma.convert")
    out = cv.convert(quantizable_checkpoint, tmp_path / recipe, recipe=recipe)
    mlx_model, _ = load(out)
    model, _ = torch_load(out, dtype=None)
    assert model.dtype == torch.float32  # the checkpoint's float dtype, also for the dequantized fp4/fp8 experts
    rng = np.random.default_rng(0)
    prefix, canvas = rng.integers(4, 300, (1, 10)), rng.integers(0, 300, (1, 16))
    mc, tc = mlx_model.make_cache(), model.make_cache()
    mlx_model.encode(mx.array(prefix), mc)
    model.encode(prefix, tc)
    close(np_(model.denoise(canvas, tc)), np.array(mlx_model.denoise(mx.array(canvas), mc)), f"{recipe} vs MLX")


def test_bad_inputs_give_load_errors(gemma_checkpoint, tmp_path):
    path, _ = gemma_checkpoint
    with pytest.raises(LoadError, match="backend 'jax' is not known"):
        load(path, backend="jax")
    with pytest.raises(LoadError, match="applies to backend='torch' only"):
        load(path, device="cpu")
    with pytest.raises(LoadError, match="dtype 'int3' is not supported"):
        load(path, backend="torch", device="cpu", dtype="int3")
    if not torch.cuda.is_available():
        with pytest.raises(LoadError, match="no CUDA GPU"):
            load(path, backend="torch", device="cuda")
    broken = tmp_path / "broken"
    shutil.copytree(path, broken)
    cfg = json.loads((broken / "config.json").read_text())
    cfg["text_config"]["num_hidden_layers"] += 1
    cfg["text_config"].pop("layer_types", None)
    cfg["text_config"].pop("per_layer_config", None)
    (broken / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(LoadError, match="weights do not match config.json"):
        load(broken, backend="torch", device="cpu")


def test_importing_the_backend_runs_no_mlx():
    code = "import sys, mlx_diffgemma.torch_backend; sys.exit(any(m.split('.')[0] in ('mlx', 'mlx_lm') for m in sys.modules))"
    assert subprocess.run([sys.executable, "-c", code]).returncode == 0
