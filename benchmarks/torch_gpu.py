"""The torch backend on an NVIDIA GPU, in one prepared run: parity suite, bf16 agreement, speed.

    python benchmarks/torch_gpu.py --device cuda                  # H100/H200: all three parts
    python benchmarks/torch_gpu.py --device cpu --tiny --shared   # smoke test of the script (this CPU)

1. parity: `tests/test_torch_backend.py` with MLX_DIFFGEMMA_TORCH_DEVICE=<device> (fp32 logits
   within 1e-4 of MLX and transformers, token-identical generation with MLX, dequantization).
2. bf16 agreement, on tiny random checkpoints built here: the argmax of torch-bf16 logits against
   the fp32 reference (teacher-forced, with transformers-bf16 and MLX-bf16 alongside), and the
   tokens generated in bf16 against those generated in fp32 with the same seed.
3. speed: one random-weight model with the full 26B-A4B widths (hidden 2816, 128 experts x 704,
   top-8, vocab 262144, canvas 256) in bf16, shared by transformers' reference `generate` and our
   `stream_generate` (same weight tensors, same prompt, 48 steps per canvas): ms per denoising step
   and committed tokens/s of each, plus our bare `denoise` forward. `--layers` (default: what fits
   the GPU, at most 30) trims the depth; the result says how many layers ran.

Writes benchmarks/results/torch_gpu-<stamp>-<device>.json and .md (atomically). Each part records
its own failure instead of ending the run.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from benchmarks import machine  # noqa: E402
from mlx_diffgemma.config import ModelConfig  # noqa: E402
from mlx_diffgemma.files import write_text_atomic  # noqa: E402

S, F = "sliding_attention", "full_attention"
# the released checkpoint's text widths (docs: reference-spec.md, section 1.1)
FULL_WIDTH = dict(
    vocab_size=262144, hidden_size=2816, intermediate_size=2112, num_attention_heads=16, num_key_value_heads=8,
    head_dim=256, global_head_dim=512, num_global_key_value_heads=2, sliding_window=1024, num_experts=128,
    top_k_experts=8, moe_intermediate_size=704, max_position_embeddings=262144, initializer_range=0.02,
)
TINY_WIDTH = dict(
    vocab_size=1024, hidden_size=128, intermediate_size=256, num_attention_heads=4, num_key_value_heads=2,
    head_dim=32, global_head_dim=64, num_global_key_value_heads=1, sliding_window=64, num_experts=8,
    top_k_experts=2, moe_intermediate_size=64, max_position_embeddings=8192, initializer_range=0.02,
)
GIB = 2**30
GAP = 0.1  # logits: a top-1 lead that bf16 round-off (~0.01-0.05 here) should not overturn


def sync(device):
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


# -- 1. parity suite -------------------------------------------------------------------------


def run_parity(device: str, timeout: float) -> dict:
    env = dict(os.environ, MLX_DIFFGEMMA_TORCH_DEVICE=device)
    cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "tests/test_torch_backend.py"]
    tic = time.perf_counter()
    try:
        out = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return {"status": "timeout", "seconds": timeout}
    summary = next((l for l in reversed(out.stdout.splitlines()) if re.search(r"passed|failed|error", l)), "")
    counts = {k: int(n) for n, k in re.findall(r"(\d+) (passed|failed|errors?|skipped)", summary)}
    return {
        "status": "ok" if out.returncode == 0 else "failed",
        "command": f"MLX_DIFFGEMMA_TORCH_DEVICE={device} {' '.join(cmd[1:])}",
        "summary": summary.strip("= "),
        "counts": counts,
        "seconds": round(time.perf_counter() - tic, 1),
        "tail": "" if out.returncode == 0 else (out.stdout + out.stderr)[-3000:],
    }


# -- 2. bf16 agreement -----------------------------------------------------------------------


def bf16_agreement(device: str, work: Path) -> list[dict]:
    import mlx.core as mx
    from transformers import DiffusionGemmaForBlockDiffusion, DynamicCache

    from mlx_diffgemma import load, stream_generate
    from mlx_diffgemma.testing import build_checkpoint

    rows = []
    checkpoints = {
        "gemma-pattern (canvas 32)": dict(canvas_length=32, seed=0),
        "sharp (canvas 8, logit gain 40)": dict(canvas_length=8, seed=3, logit_gain=40.0),
    }
    for name, kw in checkpoints.items():
        path, _ = build_checkpoint(work / re.sub(r"\W+", "-", name), **kw)
        V = 320
        C = kw["canvas_length"]
        rng = np.random.default_rng(0)
        prefixes = [rng.integers(0, V, (1, n)) for n in (5, 20, 60)]
        canvases = [rng.integers(0, V, (1, C)) for _ in prefixes]

        def hf_logits(dtype):
            hf = DiffusionGemmaForBlockDiffusion.from_pretrained(path, dtype=dtype).to(device).eval()
            out = []
            for prefix, canvas in zip(prefixes, canvases):
                with torch.no_grad():
                    o = hf(input_ids=torch.tensor(prefix, device=device), decoder_input_ids=torch.tensor(canvas, device=device),
                           cache=DynamicCache(config=hf.config.text_config),
                           decoder_position_ids=torch.arange(prefix.shape[1], prefix.shape[1] + C, device=device)[None])
                out.append(o.logits.float().cpu().numpy())
            return out

        def ours_logits(backend, dtype):
            model, _ = load(path, backend=backend, **({"device": device, "dtype": dtype} if backend == "torch" else {"dtype": dtype}))
            out = []
            for prefix, canvas in zip(prefixes, canvases):
                cache = model.make_cache()
                if backend == "torch":
                    model.encode(prefix, cache)
                    out.append(model.denoise(canvas, cache).cpu().numpy())
                else:
                    model.encode(mx.array(prefix), cache)
                    out.append(np.array(model.denoise(mx.array(canvas), cache)))
            return out

        exact = hf_logits(torch.float32)
        runs = {
            "torch bf16": ours_logits("torch", "bfloat16"),
            "transformers bf16": hf_logits(torch.bfloat16),
            "mlx bf16": ours_logits("mlx", mx.bfloat16),
            "torch fp32": ours_logits("torch", "float32"),
        }

        def agree(a, b):
            return float(np.mean([(x.argmax(-1) == y.argmax(-1)).mean() for x, y in zip(a, b)]))

        def mean_error(a):
            return float(np.mean([np.abs(x - y).mean() for x, y in zip(a, exact)]))

        top2 = [np.sort(x, axis=-1)[..., -2:] for x in exact]
        clear = [(t[..., 1] - t[..., 0]) > GAP for t in top2]  # fp32 top-1 ahead of top-2 by > GAP

        def agree_clear(a):
            hits = np.concatenate([(x.argmax(-1) == y.argmax(-1))[m] for x, y, m in zip(a, exact, clear)])
            return float(hits.mean()) if hits.size else float("nan")

        row = {"checkpoint": name, "positions": len(prefixes) * C,
               f"positions with fp32 top-2 gap > {GAP}": int(sum(m.sum() for m in clear))}
        for k, v in runs.items():
            row[f"argmax agreement, {k} vs transformers fp32"] = agree(v, exact)
        for k, v in runs.items():
            row[f"  same, at positions with top-2 gap > {GAP}: {k}"] = agree_clear(v)
        for k, v in runs.items():
            row[f"mean abs logit error vs transformers fp32: {k}"] = mean_error(v)
        row["argmax agreement, torch bf16 vs mlx bf16"] = agree(runs["torch bf16"], runs["mlx bf16"])
        row["argmax agreement, torch bf16 vs transformers bf16"] = agree(runs["torch bf16"], runs["transformers bf16"])

        # free-running: tokens generated in bf16 vs fp32, same seed, fixed 12 steps per canvas
        gen_kw = dict(max_tokens=4 * C, max_denoising_steps=12, confidence_threshold=1e-9, eos_token_id=[10**6], seed=5)
        prompt = [2, 4, 40, 41, 42, 43, 5, 4, 44]
        tokens = {}
        for label, dtype in [("fp32", "float32"), ("bf16", "bfloat16")]:
            model, tok = load(path, backend="torch", device=device, dtype=dtype)
            tokens[label] = list(stream_generate(model, tok, prompt, **gen_kw))[-1].token_ids
        mlx_model, tok = load(path, dtype=mx.bfloat16)
        tokens["mlx bf16"] = _mlx_tokens(mlx_model, prompt, gen_kw)
        a, b = np.array(tokens["fp32"]), np.array(tokens["bf16"])
        row["generated tokens"] = len(a)
        row["token agreement, torch bf16 vs torch fp32 generate"] = float((a == b).mean())
        row["token agreement, torch bf16 vs mlx bf16 generate"] = float((b == np.array(tokens["mlx bf16"])).mean())
        first = int(np.argmin(a == b)) if (a != b).any() else len(a)
        row["first differing token, bf16 vs fp32"] = first
        rows.append(row)
    return rows


def trained_agreement(device: str, model_ref: str, n: int) -> dict:
    """bf16 against fp32 on a trained model (random tiny models have near-flat logits, so their
    argmax flips under any rounding): the bundled Sudoku model on `n` held-out puzzles.
    - same inputs: canvases corrupted from the solutions at t in {0.2, 0.5, 0.8, 1.0}; the argmax
      of each system against torch fp32 at every canvas position;
    - free running: whole solves with the reference sampler, same seed and noise; the 81 digits
      against torch fp32 (a flip early in a solve changes the later steps' inputs)."""
    import mlx.core as mx

    from mlx_diffgemma import load, sudoku
    from mlx_diffgemma.generate import ops_for
    from mlx_diffgemma.loading import resolve

    path = resolve(model_ref)
    puzzles, solutions = sudoku.puzzle_set(20261128, n, (30, 50))
    prompts = sudoku.prompt_batch(puzzles)
    target = sudoku.canvas_ids(solutions)
    rng = np.random.default_rng(0)
    canvases = []
    for t in (0.2, 0.5, 0.8, 1.0):
        noisy = rng.random(target.shape) < t
        canvases.append(np.where(noisy, rng.integers(0, 16, target.shape), target).astype(np.int32))
    systems = {
        "torch fp32": dict(backend="torch", device=device, dtype="float32"),
        "torch bf16": dict(backend="torch", device=device, dtype="bfloat16"),
        "mlx fp32": dict(dtype=mx.float32),
        "mlx bf16": dict(dtype=mx.bfloat16),
    }
    argmax, solved, digits = {}, {}, {}
    for name, kw in systems.items():
        model, _ = load(path, **kw)
        ops = ops_for(model)
        outs = []
        for canvas in canvases:
            cache = model.make_cache()
            model.encode(ops.asarray(prompts), cache)
            outs.append(ops.to_numpy(model.denoise(ops.asarray(canvas), cache)).argmax(-1))  # fp32 logits
        argmax[name] = np.stack(outs)
        digits[name] = sudoku.solve_batch(model, puzzles, seed=3)
        solved[name] = float(np.mean([sudoku.is_solution(p, g) for p, g in zip(puzzles, digits[name])]))
    ref = "torch fp32"
    return {
        "model": str(path), "puzzles": n, "canvas positions (same inputs)": int(argmax[ref].size),
        "rows": {
            name: {
                "argmax agreement vs torch fp32, same inputs": float((argmax[name] == argmax[ref]).mean()),
                "digit agreement vs torch fp32, free-running solve": float((digits[name] == digits[ref]).mean()),
                "solved": solved[name],
                "blank cells right": float(((digits[name] == solutions) & (puzzles == 0)).sum() / (puzzles == 0).sum()),
            }
            for name in systems
        },
    }


def _mlx_tokens(model, prompt, kw):
    # the shared pieces on this thread (the MLX side of stream_generate may run on a worker thread)
    from mlx_diffgemma.generate import denoise_canvas, ops_for
    from mlx_diffgemma.sampler import NoiseSource, finalize_block

    gen = model.generation_config.override(max_new_tokens=kw["max_tokens"], eos_token_id=kw["eos_token_id"],
                                           max_denoising_steps=kw["max_denoising_steps"],
                                           confidence_threshold=kw["confidence_threshold"])
    noise, cache, ops = NoiseSource(kw["seed"], model.config.vocab_size), model.make_cache(), ops_for(model)
    model.encode(ops.asarray([prompt]), cache)
    out = []
    for block in range(kw["max_tokens"] // model.config.canvas_length):
        argmax, _ = denoise_canvas(model, cache, gen, noise, block)
        committed, _ = finalize_block(argmax, gen)
        out += committed[0].tolist()
        model.encode(ops.asarray(committed), cache)
    return out


# -- 3. speed --------------------------------------------------------------------------------


def random_hf_model(text: dict, canvas_length: int, device: str, dtype: torch.dtype, seed: int):
    """transformers' DiffusionGemmaForBlockDiffusion with random weights, built on the meta device
    and materialised once per unique tensor, so the tied encoder/decoder text weights exist once
    (building it directly would hold both copies until they are tied: twice the memory)."""
    from torch import nn
    from transformers import DiffusionGemmaConfig, DiffusionGemmaForBlockDiffusion

    from mlx_diffgemma.testing import tiny_vision_config

    def config(t):
        return DiffusionGemmaConfig(text_config=t, vision_config=tiny_vision_config(), canvas_length=canvas_length)

    with torch.device("meta"):
        hf = DiffusionGemmaForBlockDiffusion._from_config(config(text), dtype=dtype)
    # the non-learned buffers (RoPE tables, embed scale) from a two-layer, small-vocab twin on the CPU
    twin_text = dict(text, num_hidden_layers=2, layer_types=[S, F], vocab_size=64, num_experts=2, top_k_experts=1,
                     moe_intermediate_size=8, intermediate_size=8)  # buffers depend on head dims, RoPE, hidden
    twin = DiffusionGemmaForBlockDiffusion._from_config(config(twin_text), dtype=dtype)
    twin_buffers = {re.sub(r"layers\.\d+\.", "", k): v for k, v in twin.named_buffers(remove_duplicate=False)}
    del twin

    g = torch.Generator(device=device).manual_seed(seed)
    std = text["initializer_range"]
    made = {}

    def fill(name, meta):
        t = torch.empty(meta.shape, dtype=meta.dtype, device=device)
        if name.endswith("norm.weight") or name.endswith("router.scale") or name.endswith("per_expert_scale"):
            t.uniform_(0.5, 1.5, generator=g)
        elif name.endswith("layer_scalar"):
            t.fill_(1.0)
        elif meta.ndim >= 2:
            t.normal_(0.0, std, generator=g)
        else:
            t.zero_()
        return t

    for mod_name, module in hf.named_modules():
        for pname, p in list(module._parameters.items()):
            if p is not None:
                if id(p) not in made:
                    made[id(p)] = nn.Parameter(fill(f"{mod_name}.{pname}", p), requires_grad=False)
                module._parameters[pname] = made[id(p)]
        for bname, b in list(module._buffers.items()):
            if b is not None:
                if id(b) not in made:
                    full = re.sub(r"layers\.\d+\.", "", f"{mod_name}.{bname}")
                    made[id(b)] = fill(full, b) if bname == "layer_scalar" else twin_buffers[full].to(device)
                module._buffers[bname] = made[id(b)]
    return hf.eval()


def default_layers(device: str) -> int:
    if torch.device(device).type != "cuda":
        return 2
    free = torch.cuda.get_device_properties(0).total_memory / GIB
    per_layer, rest = 1.62, 1.5 + 14.0  # bf16 GiB per layer; embedding + activations + headroom
    return int(max(1, min(30, (free - rest) // per_layer)))


def timed(fn, device) -> float:
    sync(device)
    tic = time.perf_counter()
    fn()
    sync(device)
    return time.perf_counter() - tic


def speed(device: str, tiny: bool, layers: int | None, canvases: int, steps: int, prompt_len: int,
          repeats: int) -> dict:
    from mlx_diffgemma.generate import stream_generate
    from mlx_diffgemma.testing import build_tokenizer
    from mlx_diffgemma.tokenizer import load_tokenizer
    from mlx_diffgemma.torch_backend import from_weights

    dtype = torch.bfloat16
    layers = layers or default_layers(device)
    text = dict(TINY_WIDTH if tiny else FULL_WIDTH, num_hidden_layers=layers)
    text["layer_types"] = ([S if (i + 1) % 6 else F for i in range(layers)])[:-1] + [F]
    C = 32 if tiny else 256
    out = {"config": "tiny widths" if tiny else "full 26B-A4B widths", "layers": layers, "canvas_length": C,
           "dtype": "bfloat16", "prompt_tokens": prompt_len, "canvases": canvases, "steps_per_canvas": steps}
    V = text["vocab_size"]
    prompt = np.random.default_rng(0).integers(4, V, prompt_len).tolist()
    # bf16 round-off alone drifts a deep random model's logits apart: 30 tiny layers on the CPU
    # agree exactly in fp32, while transformers' own bf16 agrees with its fp32 argmax at 3% of
    # positions (ours: 16%). So the check that both run the same model is made in fp32, on a
    # two-layer slice of the same widths
    out["same_model_check_fp32"] = same_model_check_fp32(dict(text, num_hidden_layers=2, layer_types=[S, F]), C,
                                                         prompt, device)
    if torch.device(device).type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    tic = time.perf_counter()
    hf = random_hf_model(text, C, device, dtype, seed=0)
    config = ModelConfig.from_dict(hf.config.to_dict())
    ours = from_weights(config, hf.state_dict(), device=device, dtype=dtype, source="random full-width model")
    shared = ours.layers[0].experts.gate_up_proj.weight.data_ptr() == \
        hf.model.decoder.layers[0].experts.gate_up_proj.data_ptr()
    out.update(build_s=round(time.perf_counter() - tic, 1), weights_shared=shared,
               parameters=sum(p.numel() for p in ours.parameters()))
    if torch.device(device).type == "cuda":
        out["weights_gib"] = round(torch.cuda.memory_allocated() / GIB, 2)

    out["same_model_check"] = same_model_check(hf, ours, prompt, C, device)
    eos = [V - 1]  # random weights: an EOS would end the run early, so use an id that is never sampled in practice
    tokens = canvases * C

    # ours: the shared block loop (stream_generate), reference sampler, fixed steps per canvas; the
    # small test tokenizer only detokenizes (ids past its vocabulary decode to nothing)
    with tempfile.TemporaryDirectory() as tmp:
        build_tokenizer().save_pretrained(tmp)
        tokenizer = load_tokenizer(Path(tmp), eos)

    def ours_run():
        done = list(stream_generate(ours, tokenizer, prompt, max_tokens=tokens, seed=0, max_denoising_steps=steps,
                                    confidence_threshold=1e-9, eos_token_id=eos))[-1]
        return done.stats

    # the reference: transformers' generate on the same weights, prompt and sampler settings
    from transformers import DiffusionGemmaGenerationConfig

    gen_cfg = DiffusionGemmaGenerationConfig(max_new_tokens=tokens, max_denoising_steps=steps, confidence_threshold=1e-9,
                                             eos_token_id=eos, pad_token_id=0, t_min=0.4, t_max=0.8,
                                             stability_threshold=1)
    ids = torch.tensor([prompt], device=device)

    def hf_run():
        with torch.no_grad():
            return hf.generate(ids, generation_config=gen_cfg)

    def measure(name, run) -> tuple[float, float, float]:
        """(wall s, ms per denoising step, committed tokens/s) of one run."""
        holder = {}
        wall = timed(lambda: holder.setdefault("r", run()), device)
        r = holder["r"]
        if name.startswith("ours"):
            passes, committed = r.denoise_steps, r.committed_tokens
        else:
            new = r.sequences[0, len(prompt):]
            committed = int((new != 0).sum())
            passes = round(committed / float(r.tokens_per_forward[0]))
        meta[name] = {"denoise_steps": passes, "committed_tokens": committed}
        # the same accounting for both: whole wall time (prefill and commit re-encodes included) per step
        return wall, 1000 * wall / passes, committed / wall

    systems = [("ours (torch backend)", ours_run), ("transformers generate", hf_run)]
    rows, samples, meta, peaks = {}, {name: [] for name, _ in systems}, {}, {}
    for name, run in systems:  # warm-up: CUDA context, kernels, cuBLAS heuristics
        try:
            run()
        except Exception as e:  # an OOM or a kernel gap is a result too
            rows[name] = {"status": "failed", "reason": f"{type(e).__name__}: {str(e)[:300]}"}
            if torch.device(device).type == "cuda":
                torch.cuda.empty_cache()
    for _ in range(repeats):  # interleaved, so both see the same machine state
        for name, run in systems:
            if name in rows:
                continue
            if torch.device(device).type == "cuda":
                torch.cuda.reset_peak_memory_stats()
            samples[name].append(measure(name, run))
            if torch.device(device).type == "cuda":
                peaks[name] = max(peaks.get(name, 0), torch.cuda.max_memory_allocated())
    for name, _ in systems:
        if name in rows:
            continue
        walls, step_ms, tps = zip(*samples[name])
        rows[name] = {
            "status": "ok", "wall_s": round(statistics.median(walls), 3),
            "ms_per_step": round(statistics.median(step_ms), 2), "ms_per_step_min": round(min(step_ms), 2),
            "ms_per_step_max": round(max(step_ms), 2), "committed_tokens_per_s": round(statistics.median(tps), 2),
            **meta[name], "peak_memory_gib": round(peaks[name] / GIB, 2) if name in peaks else None,
        }

    # our bare denoise forward (no sampler, no host round trip), self-conditioned, median of repeats
    try:
        cache = ours.make_cache()
        ours.encode(prompt, cache)
        canvas = ours.ops.asarray(np.random.default_rng(1).integers(0, V, (1, C)))
        sc = ours.denoise(canvas, cache).to(dtype)
        ms = [1000 * timed(lambda: ours.denoise(canvas, cache, sc), device) for _ in range(max(3, repeats * 3))]
        rows["ours: denoise forward only"] = {"status": "ok", "ms_per_step": round(statistics.median(ms), 2),
                                              "ms_per_step_min": round(min(ms), 2), "ms_per_step_max": round(max(ms), 2)}
    except Exception as e:
        rows["ours: denoise forward only"] = {"status": "failed", "reason": f"{type(e).__name__}: {str(e)[:300]}"}
    out["experts_path"] = "grouped_mm" if _grouped(ours) else "per-expert loop"
    a, b = rows.get("ours (torch backend)", {}), rows.get("transformers generate", {})
    if a.get("status") == b.get("status") == "ok":
        out["speedup_per_step"] = round(b["ms_per_step"] / a["ms_per_step"], 2)
        out["speedup_tokens_per_s"] = round(a["committed_tokens_per_s"] / b["committed_tokens_per_s"], 2)
    out["rows"] = rows
    return out


def same_model_check_fp32(text: dict, C: int, prompt, device) -> dict:
    from mlx_diffgemma.torch_backend import from_weights

    try:
        hf = random_hf_model(text, C, device, torch.float32, seed=0)
        ours = from_weights(ModelConfig.from_dict(hf.config.to_dict()), hf.state_dict(), device=device,
                            dtype=torch.float32, source="random two-layer slice")
        return same_model_check(hf, ours, prompt, C, device)
    except Exception as e:
        return {"status": "failed", "reason": f"{type(e).__name__}: {str(e)[:300]}"}
    finally:
        hf = ours = None
        if torch.device(device).type == "cuda":
            torch.cuda.empty_cache()


def same_model_check(hf, ours, prompt, C, device) -> dict:
    """One canvas pass of both on the same input: the two really run the same model."""
    from transformers import DynamicCache

    try:
        canvas = np.random.default_rng(2).integers(0, ours.config.vocab_size, (1, C))
        with torch.no_grad():
            ref = hf(input_ids=torch.tensor([prompt], device=device), decoder_input_ids=torch.tensor(canvas, device=device),
                     cache=DynamicCache(config=hf.config.text_config),
                     decoder_position_ids=torch.arange(len(prompt), len(prompt) + C, device=device)[None]).logits.float()
        cache = ours.make_cache()
        ours.encode(prompt, cache)
        mine = ours.denoise(canvas, cache)
        return {"max_abs_logit_diff": round(float((mine - ref).abs().max()), 5),
                "mean_abs_logit_diff": round(float((mine - ref).abs().mean()), 6),
                "logit_abs_max": round(float(ref.abs().max()), 4),
                "argmax_agreement": round(float((mine.argmax(-1) == ref.argmax(-1)).float().mean()), 4)}
    except Exception as e:
        return {"status": "failed", "reason": f"{type(e).__name__}: {str(e)[:300]}"}


def _grouped(model) -> bool:
    e = model.layers[0].experts
    return bool(e.use_grouped_mm)


# -- report ----------------------------------------------------------------------------------


def markdown(result: dict) -> str:
    m = result["machine"]
    lines = [
        f"# torch backend: {result['device_name']}",
        "",
        f"- Started {result['started']}; command `{result['command']}`",
        f"- Machine: {m['cpu']}, {m['cpu_count']} cores; GPU: {'; '.join(m['gpus']) or 'none'}; "
        f"torch {m['versions'].get('torch')}, transformers {m['versions'].get('transformers')}; commit {m.get('commit')}",
    ]
    if m.get("shared"):
        lines.append(f"- **Shared machine**: {m['shared_note']}.")
    if result.get("note"):
        lines.append(f"- Note: {result['note']}")
    p = result.get("parity")
    if p:
        lines += ["", "## Parity suite", "", f"`{p.get('command', '')}`: **{p['status']}** — {p.get('summary', '')}"]
    agree = result.get("bf16_agreement")
    if isinstance(agree, list):
        keys = [k for k in agree[0] if k != "checkpoint"]
        lines += ["", "## bf16 agreement (tiny random checkpoints)", "", "| measure | " + " | ".join(r["checkpoint"] for r in agree) + " |",
                  "|---|" + "---|" * len(agree)]
        for k in keys:
            lines.append(f"| {k} | " + " | ".join(_fmt(r[k]) for r in agree) + " |")
    elif agree:
        lines += ["", "## bf16 agreement", "", f"failed: {agree}"]
    t = result.get("trained_agreement")
    if t and "rows" in t:
        keys = list(next(iter(t["rows"].values())))
        lines += ["", f"## bf16 on a trained model: {t['model']}, {t['puzzles']} held-out Sudoku puzzles", "",
                  f"Same inputs: {t['canvas positions (same inputs)']} canvas positions (canvases corrupted from the "
                  "solutions at t = 0.2, 0.5, 0.8, 1.0). Free running: the reference sampler, same seed and noise.", "",
                  "| system | " + " | ".join(keys) + " |", "|---|" + "---|" * len(keys)]
        for name, r in t["rows"].items():
            lines.append(f"| {name} | " + " | ".join(_fmt(r[k]) for k in keys) + " |")
    elif t:
        lines += ["", "## bf16 on a trained model", "", f"failed: {t}"]
    s = result.get("speed")
    if s and "rows" in s:
        lines += ["", f"## Speed: {s['config']}, {s['layers']} layers, {s['dtype']}, canvas {s['canvas_length']}, "
                  f"{s['steps_per_canvas']} steps x {s['canvases']} canvases, prompt {s['prompt_tokens']} tokens", "",
                  f"Weights shared between the two ({s.get('weights_shared')}), {s['parameters'] / 1e9:.2f} B parameters, "
                  f"experts via {s['experts_path']}. Same-model check, one canvas pass of both on the same input: "
                  f"fp32, two layers of these widths: {s.get('same_model_check_fp32')}; bf16, this model: "
                  f"{s.get('same_model_check')} (bf16 round-off grows with depth).", "",
                  "ms / step = wall time of the whole generate call / denoising steps (prefill and commit "
                  "re-encodes included, for both); the last row is our canvas pass alone.", "",
                  "| system | ms / step (median [min–max]) | committed tok/s | peak GiB | status |", "|---|---|---|---|---|"]
        for name, r in s["rows"].items():
            if r["status"] == "ok":
                lines.append(f"| {name} | {r['ms_per_step']} [{r['ms_per_step_min']}–{r['ms_per_step_max']}] | "
                             f"{r.get('committed_tokens_per_s', '—')} | {r.get('peak_memory_gib') or '—'} | ok |")
            else:
                lines.append(f"| {name} | — | — | — | {r['reason']} |")
        if "speedup_per_step" in s:
            lines += ["", f"Per step: **{s['speedup_per_step']}x** the reference; committed tokens/s: {s['speedup_tokens_per_s']}x."]
    elif s:
        lines += ["", "## Speed", "", f"failed: {s}"]
    return "\n".join(lines) + "\n"


def _fmt(x):
    return f"{x:.4f}" if isinstance(x, float) else str(x)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--device", default="cuda", help="cuda, cuda:N or cpu")
    ap.add_argument("--tiny", action="store_true", help="tiny widths instead of the full 26B-A4B widths (smoke test)")
    ap.add_argument("--layers", type=int, default=None, help="layers of the speed model (default: what fits, <= 30)")
    ap.add_argument("--canvases", type=int, default=2)
    ap.add_argument("--steps", type=int, default=48, help="denoising steps per canvas (fixed: no early stop)")
    ap.add_argument("--prompt-tokens", type=int, default=128)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--skip", default="", help="comma list of parts to skip: parity,agreement,trained,speed")
    ap.add_argument("--trained-model", default="sudoku", help="the trained model of the bf16 check (default: bundled)")
    ap.add_argument("--trained-puzzles", type=int, default=40)
    ap.add_argument("--parity-timeout", type=float, default=600)
    ap.add_argument("--shared", action="store_true", help="record that the machine was shared with other jobs")
    ap.add_argument("--out", default=str(REPO / "benchmarks" / "results"))
    args = ap.parse_args(argv)
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        print(f"error: --device {args.device} but torch sees no CUDA GPU; use --device cpu", file=sys.stderr)
        return 2
    skip = {s.strip() for s in args.skip.split(",") if s.strip()}
    if args.device == "cpu" and args.shared:
        torch.set_num_threads(1)  # OpenMP spin-waits on oversubscribed shared cores cost 10-100x
    torch.backends.cuda.matmul.allow_tf32 = False  # fp32 parity means fp32
    stamp = datetime.now(timezone.utc).strftime("%Y%m%dT%H%M%SZ")
    device_name = torch.cuda.get_device_name(0) if args.device.startswith("cuda") else "cpu"
    tag = "cpu" if args.device == "cpu" else re.sub(r"\W+", "-", device_name.lower()).strip("-")
    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    stem = out_dir / f"torch_gpu-{stamp}-{tag}{'-smoke' if args.tiny else ''}"
    result = {
        "started": stamp, "device": args.device, "device_name": device_name,
        "command": "python benchmarks/torch_gpu.py " + " ".join(argv if argv is not None else sys.argv[1:]),
        "machine": machine.record(args.shared),
    }
    if args.device == "cpu":
        result["note"] = "run on the CPU: no GPU numbers were measured here" + (" (tiny widths)" if args.tiny else "")

    def save():
        write_text_atomic(stem.with_suffix(".json"), json.dumps(result, indent=1))
        write_text_atomic(stem.with_suffix(".md"), markdown(result))

    parts = [
        ("parity", lambda: run_parity(args.device, args.parity_timeout)),
        ("bf16_agreement", None),
        ("trained_agreement", lambda: trained_agreement(args.device, args.trained_model, args.trained_puzzles)),
        ("speed", lambda: speed(args.device, args.tiny, args.layers, args.canvases, args.steps,
                                args.prompt_tokens, args.repeats)),
    ]
    for key, fn in parts:
        if key.split("_")[0] in skip or (key == "bf16_agreement" and "agreement" in skip):
            continue
        print(f"[torch_gpu] {key} ...", file=sys.stderr, flush=True)
        try:
            if key == "bf16_agreement":
                with tempfile.TemporaryDirectory() as tmp:
                    result[key] = bf16_agreement(args.device, Path(tmp))
            else:
                result[key] = fn()
        except Exception as e:
            result[key] = {"status": "failed", "reason": f"{type(e).__name__}: {e}", "trace": traceback.format_exc()[-2000:]}
        save()
    result["machine"]["load_average_end"] = list(os.getloadavg()) if hasattr(os, "getloadavg") else None
    save()
    print(stem.with_suffix(".md").read_text())
    print(f"wrote {stem}.json / .md", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
