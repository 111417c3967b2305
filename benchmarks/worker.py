"""One system x one scenario, in its own process: `python -m benchmarks.worker JOB.json OUT.json`.

Each system runs alone in a fresh process (an OpenBLAS LD_PRELOAD in a torch process made
transformers 7-30x slower, and peak memory is per process). The job names the system, the
scenario and the checkpoint; the worker writes one measurement dict to OUT.json (atomically).

Scenarios:
- `step@P`  : encode a P-token prefix (prefill tokens/s), then `warmup + repeats` denoise steps of
              one full 256-token canvas with no early stop; the per-step times after the warm-up
              give the median and spread. For the AR twin: greedy decode steps after P tokens.
- `generate-16`: prefix 128, `canvases` whole canvases, exactly 16 steps each, EOS off.
- `generate-adaptive`: the same with the checkpoint's own stop (48 steps at most, stable and
  confident) — random weights seldom stop early; `steps_per_canvas` says what happened.
- `generate` (AR twin): greedy decoding of the same number of tokens, EOS off.
- `gemm`    : the backend's dense-GEMM rate (a plain matmul) in the run's dtype.
"""

from __future__ import annotations

import json
import os
import resource
import sys
import time
from pathlib import Path

import numpy as np

GEN_PREFIX = 128
FIRST_ID = 13  # past the special tokens


def prompt_ids(length: int, vocab: int, seed: int = 0) -> list[int]:
    rng = np.random.default_rng(seed)
    return [2] + rng.integers(FIRST_ID, vocab, size=length - 1).tolist()


def max_rss_bytes() -> int:
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(rss if sys.platform == "darwin" else rss * 1024)


def spread(samples: list[float]) -> dict:
    s = np.asarray(samples, dtype=np.float64)
    return {
        "ms_per_step": float(np.median(s)),
        "ms_per_step_min": float(s.min()),
        "ms_per_step_max": float(s.max()),
        "step_samples_ms": [round(float(x), 3) for x in s],
    }


def _mlx_dtype(name):
    import mlx.core as mx

    return getattr(mx, name)


# -- this engine ------------------------------------------------------------------------------


def _fast_mode_supported() -> bool:
    """The fast path hook: stream_generate's `mode` option (mlx_diffgemma.fast.MODES), if present."""
    import inspect

    from mlx_diffgemma.generate import stream_generate

    return "mode" in inspect.signature(stream_generate).parameters


def run_ours(job: dict) -> dict:
    import mlx.core as mx

    import mlx_diffgemma as dg
    from mlx_diffgemma.generate import denoise_canvas
    from mlx_diffgemma.sampler import NoiseSource

    fast = job["system"] == "ours-fast"
    if fast and not _fast_mode_supported():
        return {"status": "unavailable", "reason": "fast path not available yet: "
                "mlx_diffgemma.generate.stream_generate has no `mode` option"}
    model, tokenizer = dg.load(job["hf"], dtype=_mlx_dtype(job["dtype"]))
    C, V = model.config.canvas_length, model.config.vocab_size
    plan, scenario = job["plan"], job["scenario"]
    device = {"device": str(mx.default_device())}

    if scenario.startswith("step@"):
        if fast:
            return {"status": "skipped", "reason": "the fast path is measured end to end (generate-*) only"}
        P = job["prefix"]
        warm = model.make_cache()
        model.encode(mx.array([prompt_ids(16, V, 1)]), warm)
        mx.eval(*warm.state())
        cache = model.make_cache()
        ids = mx.array([prompt_ids(P, V)])
        tic = time.perf_counter()
        model.encode(ids, cache)
        mx.eval(*cache.state())
        prefill_s = time.perf_counter() - tic
        steps = plan["warmup"] + plan["repeats"]
        gen = model.generation_config.override(max_denoising_steps=steps, confidence_threshold=1e-30)
        stamps = []
        mx.reset_peak_memory()
        start = time.perf_counter()
        denoise_canvas(model, cache, gen, NoiseSource(0, V), 0, on_step=lambda s, r: stamps.append(time.perf_counter()))
        times = np.diff([start] + stamps) * 1e3
        return {
            "status": "ok", **device,
            **spread(list(times[plan["warmup"]:])),
            "prefill_tokens_per_s": P / prefill_s,
            "row_passes_per_token": None,
            "mlx_peak_bytes": int(mx.get_peak_memory()),
        }

    # the prompt in a pass of its own: generation rates exclude the prefill, as for the other systems
    overrides = {"eos_token_id": [], "fuse_prompt": False}
    if scenario == "generate-16":
        overrides.update(max_denoising_steps=16, confidence_threshold=1e-30)
    if fast:  # the fast path's most aggressive mode unless the run names another
        overrides["mode"] = job.get("fast_mode") or "turbo"
    ids = prompt_ids(GEN_PREFIX, V)
    max_tokens = C * plan["canvases"]

    def once(max_tokens, **extra):
        stats = None
        for event in dg.stream_generate(model, tokenizer, ids, max_tokens=max_tokens, seed=0, **{**overrides, **extra}):
            if event.kind == "done":
                stats = event.stats
        return stats

    try:
        once(C, max_denoising_steps=2)  # warm-up
    except (TypeError, ValueError) as e:
        if fast:
            return {"status": "unavailable", "reason": f"fast path rejected: {e}"}
        raise
    runs = [once(max_tokens) for _ in range(plan.get("gen_repeats", 1))]
    rates = [s.committed_tokens_per_s for s in runs]
    best = runs[int(np.argsort(rates)[len(rates) // 2])]
    row_passes = getattr(best, "row_passes", None) or best.denoise_steps * C
    return {
        "status": "ok", **device,
        "ms_per_step": 1e3 * best.generate_s / max(best.denoise_steps, 1),
        "committed_tokens": best.committed_tokens,
        "committed_tokens_per_s": float(np.median(rates)),
        "committed_tokens_per_s_samples": [round(r, 3) for r in rates],
        "prefill_tokens_per_s": best.prefill_tokens_per_s,
        "row_passes_per_token": row_passes / max(best.committed_tokens, 1),
        "steps_per_canvas": list(best.steps_per_canvas),
        "mlx_peak_bytes": best.peak_memory_bytes,
    }


# -- transformers -----------------------------------------------------------------------------


class _StepClock:
    """A draft-aware streamer: put_draft is called once per denoising step."""

    def __init__(self):
        self.stamps = []

    def put(self, value):
        pass

    def put_draft(self, value=None, **kw):
        self.stamps.append(time.perf_counter())

    def end(self):
        pass


def run_transformers(job: dict) -> dict:
    import torch
    from transformers import DiffusionGemmaForBlockDiffusion

    torch.set_num_threads(int(os.environ.get("DGBENCH_THREADS") or os.cpu_count() or 1))
    device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda":
        index = json.loads((Path(job["hf"]) / "model.safetensors.index.json").read_text())
        need, free = 2 * index["metadata"]["total_size"], torch.cuda.mem_get_info()[0]
        if need > free:  # it builds encoder and decoder layers separately before tying them
            return {"status": "unavailable", "reason": f"transformers needs ~{need / 2**30:.0f} GiB on the GPU "
                    f"(layers built twice before tying), {free / 2**30:.0f} GiB free"}
    model = DiffusionGemmaForBlockDiffusion.from_pretrained(job["hf"], dtype=getattr(torch, job["dtype"])).to(device).eval()
    cfg = model.config
    C, V = cfg.canvas_length, cfg.text_config.vocab_size
    plan, scenario = job["plan"], job["scenario"]
    encoder = model.model.encoder
    encode_times = []
    forward = encoder.forward

    def timed_forward(*a, **kw):
        tic = time.perf_counter()
        out = forward(*a, **kw)
        if device == "cuda":
            torch.cuda.synchronize()
        encode_times.append((tic, time.perf_counter()))
        return out

    encoder.forward = timed_forward
    no_eos = V + 7  # outside the vocabulary: EOS never fires

    def generate(ids, **kw):
        clock = _StepClock()
        encode_times.clear()
        x = torch.tensor([ids], device=device)
        with torch.no_grad():
            out = model.generate(x, streamer=clock, eos_token_id=no_eos, **kw)
        sequences = getattr(out, "sequences", out)
        return sequences[0, len(ids):], clock.stamps, list(encode_times)

    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    generate(prompt_ids(16, V, 1), max_new_tokens=C, max_denoising_steps=2, confidence_threshold=1e-30)

    def peak():
        return {"torch_cuda_peak_bytes": int(torch.cuda.max_memory_allocated())} if device == "cuda" else {}

    if scenario.startswith("step@"):
        P = job["prefix"]
        steps = plan["warmup"] + plan["repeats"]
        _, stamps, enc = generate(prompt_ids(P, V), max_new_tokens=C, max_denoising_steps=steps, confidence_threshold=1e-30)
        times = np.diff([enc[0][1]] + stamps) * 1e3
        return {"status": "ok", "device": device, **spread(list(times[plan["warmup"]:])),
                "prefill_tokens_per_s": P / (enc[0][1] - enc[0][0]), **peak()}

    kw = dict(max_new_tokens=C * plan["canvases"])
    if scenario == "generate-16":
        kw.update(max_denoising_steps=16, confidence_threshold=1e-30)
    rates, last = [], None
    for _ in range(plan.get("gen_repeats", 1)):
        tic = time.perf_counter()
        tokens, stamps, enc = generate(prompt_ids(GEN_PREFIX, V), **kw)
        total = time.perf_counter() - tic
        gen_s = total - (enc[0][1] - enc[0][0])  # prefill excluded, as in the other systems
        committed = int((tokens != cfg.text_config.pad_token_id).sum())
        rates.append(committed / gen_s)
        last = (committed, stamps, enc, gen_s)
    committed, stamps, enc, gen_s = last
    steps = len(stamps)
    return {
        "status": "ok", "device": device,
        "ms_per_step": 1e3 * gen_s / max(steps, 1),
        "committed_tokens": committed,
        "committed_tokens_per_s": float(np.median(rates)),
        "committed_tokens_per_s_samples": [round(r, 3) for r in rates],
        "prefill_tokens_per_s": GEN_PREFIX / (enc[0][1] - enc[0][0]),
        "row_passes_per_token": steps * C / max(committed, 1),
        "steps_per_canvas": _steps_per_canvas(stamps, enc),
        **peak(),
    }


def _steps_per_canvas(stamps, encodes) -> list[int]:
    """Split step timestamps at each encoder call (one per canvas)."""
    bounds = [e[1] for e in encodes[1:]] + [float("inf")]
    out, i = [], 0
    for b in bounds:
        n = 0
        while i < len(stamps) and stamps[i] < b:
            n, i = n + 1, i + 1
        out.append(n)
    return out


# -- mlx-vlm ----------------------------------------------------------------------------------


class _NeverStop:
    """mlx-vlm asks the tokenizer whether a token ends generation: EOS off for fixed lengths."""

    def __call__(self, token):
        return False

    def add_eos_token_ids(self, ids):
        pass


class _Tokenizer:
    stopping_criteria = _NeverStop()


class _NullDetokenizer:
    last_segment = ""

    def add_token(self, token, **kw):
        pass

    def finalize(self):
        pass


def run_mlx_vlm(job: dict) -> dict:
    import importlib

    import mlx.core as mx
    from mlx_vlm.utils import load

    # `mlx_vlm.generate` is also a function name in its package: import the module by path
    diffusion = importlib.import_module("mlx_vlm.generate.diffusion")

    model, processor = load(job["hf"])
    model.set_dtype(_mlx_dtype(job["dtype"]))  # the run's dtype, as the other systems
    C, V = int(model.config.canvas_length), int(model.config.text_config.vocab_size)
    plan, scenario = job["plan"], job["scenario"]
    gen_cfg = dict(model.config.generation_config)
    fixed = dict(gen_cfg)
    fixed.pop("stability_threshold", None)
    fixed.pop("confidence_threshold", None)  # no stopping config: a fixed number of steps

    stamps = []
    stop_check = diffusion._diffusion_stable_and_confident

    def timed_stop_check(argmax_canvas, logits, history, config):
        # called once per step; evaluating here is what its own adaptive stop does every step
        mx.eval(argmax_canvas)
        out = stop_check(argmax_canvas, logits, history, config)
        stamps.append(time.perf_counter())
        return out

    diffusion._diffusion_stable_and_confident = timed_stop_check
    # the checkpoints' vocabularies are larger than their 320-token test tokenizer, which the
    # streaming detokenizer indexes by id: no text is produced (the other systems decode a few
    # hundred ids per canvas, a negligible cost)
    diffusion.make_streaming_detokenizer = lambda processor: _NullDetokenizer()

    def generate(ids, max_tokens, steps, config):
        model.config.generation_config = config
        stamps.clear()
        mx.random.seed(0)
        last = None
        for r in diffusion.stream_diffusion_generate(
            model, processor, _Tokenizer(), mx.array([ids]), None, None,
            max_tokens=max_tokens, skip_special_token_ids=[], temperature=1.0,
            max_denoising_steps=steps, diffusion_full_canvas=True, diffusion_sampler="entropy-bound",
        ):
            last = r
        return last

    generate(prompt_ids(16, V, 1), C, 2, fixed)  # warm-up
    mx.reset_peak_memory()
    if scenario.startswith("step@"):
        P = job["prefix"]
        # the last step breaks out before the stop check (no stamp) and the first stamp ends
        # step 1: one step more keeps `repeats` timed steps after the same warm-up as the others
        r = generate(prompt_ids(P, V), C, plan["warmup"] + plan["repeats"] + 1, fixed)
        times = np.diff(stamps) * 1e3
        return {"status": "ok", "device": str(mx.default_device()), **spread(list(times[plan["warmup"] - 1:])),
                "prefill_tokens_per_s": r.prompt_tps, "mlx_peak_bytes": int(mx.get_peak_memory())}

    config = fixed if scenario == "generate-16" else gen_cfg
    steps = 16 if scenario == "generate-16" else None
    rates, r = [], None
    for _ in range(plan.get("gen_repeats", 1)):
        r = generate(prompt_ids(GEN_PREFIX, V), C * plan["canvases"], steps, config)
        rates.append(r.generation_tps)
    return {
        "status": "ok", "device": str(mx.default_device()),
        "ms_per_step": 1e3 * r.generation_tokens / r.generation_tps / max(r.diffusion_denoising_steps, 1),
        "committed_tokens": r.generation_tokens,
        "committed_tokens_per_s": float(np.median(rates)),
        "committed_tokens_per_s_samples": [round(x, 3) for x in rates],
        "prefill_tokens_per_s": r.prompt_tps,
        "row_passes_per_token": r.diffusion_work_tokens / max(r.generation_tokens, 1),
        "denoise_steps": r.diffusion_denoising_steps,
        "mlx_peak_bytes": int(mx.get_peak_memory()),
    }


# -- the autoregressive twin (mlx-lm gemma4_text) ---------------------------------------------


def load_ar_twin(job: dict):
    import glob

    import mlx.core as mx
    from mlx_lm.tokenizer_utils import load as load_tokenizer
    from mlx_lm.utils import _get_classes, load_config

    from .checkpoints import ar_weight_name

    config = load_config(Path(job["ar"]))
    model_class, args_class = _get_classes(config)
    model = model_class(args_class.from_dict(config))
    weights = {}
    for f in sorted(glob.glob(str(Path(job["hf"]) / "*.safetensors"))):
        for name, w in mx.load(f).items():
            new = ar_weight_name(name)
            if new is not None:
                weights[new] = w.astype(_mlx_dtype(job["dtype"]))
    model.load_weights(list(model.sanitize(weights).items()), strict=True)
    mx.eval(model.parameters())
    tokenizer = load_tokenizer(Path(job["ar"]))
    tokenizer.eos_token_ids = set()  # fixed-length runs
    return model, tokenizer, config


def run_ar_twin(job: dict) -> dict:
    import mlx.core as mx
    from mlx_lm.generate import stream_generate
    from mlx_lm.sample_utils import make_sampler

    model, tokenizer, config = load_ar_twin(job)
    V = config["vocab_size"]
    plan, scenario = job["plan"], job["scenario"]
    greedy = make_sampler(0.0)

    def generate(ids, n):
        stamps, last = [], None
        for r in stream_generate(model, tokenizer, ids, max_tokens=n, sampler=greedy):
            stamps.append(time.perf_counter())
            last = r
        return last, stamps

    generate(prompt_ids(16, V, 1), 4)  # warm-up
    mx.reset_peak_memory()
    if scenario.startswith("step@"):
        P = job["prefix"]
        r, stamps = generate(prompt_ids(P, V), plan["warmup"] + plan["repeats"] + 1)
        times = np.diff(stamps) * 1e3
        return {"status": "ok", "device": str(mx.default_device()), **spread(list(times[plan["warmup"]:])), "prefill_tokens_per_s": r.prompt_tps,
                "row_passes_per_token": 1.0, "mlx_peak_bytes": int(mx.get_peak_memory())}
    n = plan["ar_tokens"]
    rates, r = [], None
    for _ in range(plan.get("gen_repeats", 1)):
        r, stamps = generate(prompt_ids(GEN_PREFIX, V), n)
        rates.append(r.generation_tps)
    return {
        "status": "ok", "device": str(mx.default_device()),
        **spread(list(np.diff(stamps) * 1e3)),  # per-token times after the first
        "ms_per_step": 1e3 / r.generation_tps,
        "committed_tokens": r.generation_tokens,
        "committed_tokens_per_s": float(np.median(rates)),
        "committed_tokens_per_s_samples": [round(x, 3) for x in rates],
        "prefill_tokens_per_s": r.prompt_tps,
        "row_passes_per_token": 1.0,
        "mlx_peak_bytes": int(mx.get_peak_memory()),
    }


# -- the backends' dense-GEMM rate --------------------------------------------------------------


def gemm_size(job: dict, gpu: bool) -> int:
    return job["plan"].get("gemm_n") or (8192 if gpu else 2048)


def run_gemm_mlx(job: dict) -> dict:
    import mlx.core as mx

    gpu = mx.default_device().type == mx.DeviceType.gpu
    n = gemm_size(job, gpu)
    a = mx.random.normal((n, n)).astype(_mlx_dtype(job["dtype"]))
    b = mx.random.normal((n, n)).astype(_mlx_dtype(job["dtype"]))
    mx.eval(a, b)
    times = []
    for i in range(job["plan"]["repeats"] + 2):
        tic = time.perf_counter()
        mx.eval(a @ b)
        times.append(time.perf_counter() - tic)
    t = float(np.median(times[2:]))
    return {"status": "ok", "gemm_n": n, "gemm_flops_per_s": 2 * n**3 / t, "ms_per_step": t * 1e3,
            "step_samples_ms": [round(x * 1e3, 3) for x in times[2:]],
            "device": str(mx.default_device())}


def run_gemm_torch(job: dict) -> dict:
    import torch

    torch.set_num_threads(int(os.environ.get("DGBENCH_THREADS") or os.cpu_count() or 1))
    gpu = torch.cuda.is_available()
    device = "cuda" if gpu else "cpu"
    n = gemm_size(job, gpu)
    a = torch.randn(n, n, device=device, dtype=getattr(torch, job["dtype"]))
    b = torch.randn(n, n, device=device, dtype=getattr(torch, job["dtype"]))
    times = []
    for i in range(job["plan"]["repeats"] + 2):
        tic = time.perf_counter()
        _ = a @ b
        if gpu:
            torch.cuda.synchronize()
        times.append(time.perf_counter() - tic)
    t = float(np.median(times[2:]))
    return {"status": "ok", "gemm_n": n, "gemm_flops_per_s": 2 * n**3 / t, "ms_per_step": t * 1e3,
            "step_samples_ms": [round(x * 1e3, 3) for x in times[2:]], "device": device}


SYSTEMS = {
    "ours-reference": run_ours,
    "ours-fast": run_ours,
    "transformers": run_transformers,
    "mlx-vlm": run_mlx_vlm,
    "ar-twin": run_ar_twin,
    "gemm-mlx": run_gemm_mlx,
    "gemm-torch": run_gemm_torch,
}


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) != 2:
        print("usage: python -m benchmarks.worker JOB.json OUT.json", file=sys.stderr)
        return 2
    job = json.loads(Path(argv[0]).read_text())
    tic = time.perf_counter()
    result = SYSTEMS[job["system"]](job)
    result["wall_s"] = round(time.perf_counter() - tic, 3)
    result["max_rss_bytes"] = max_rss_bytes()
    # on a GPU the memory that matters is the device's; on a CPU every process is measured alike
    on_gpu = "gpu" in str(result.get("device", "")) or "cuda" in str(result.get("device", ""))
    device_peak = result.get("torch_cuda_peak_bytes") or result.get("mlx_peak_bytes")
    result["peak_memory_bytes"] = device_peak if on_gpu and device_peak else result["max_rss_bytes"]
    out = Path(argv[1])
    tmp = out.with_suffix(".tmp")
    tmp.write_text(json.dumps(result))
    os.replace(tmp, out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
