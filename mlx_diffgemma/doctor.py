"""`python -m mlx_diffgemma.doctor`: what this machine is, whether the custom kernels work on it,
and how fast a denoising step runs. Paste its output into a bug report.
"""

from __future__ import annotations

import json
import os
import platform
import sys
import time

import click
import mlx.core as mx
import numpy as np

from . import __version__
from .kernels import epilogue, registry


def machine() -> dict:
    info = {
        "os": f"{platform.system()} {platform.release()}",
        "machine": platform.machine(),
        "python": platform.python_version(),
        "mlx": mx.__version__,
        "mlx_diffgemma": __version__,
        "backend": epilogue.gpu_target() or "cpu",
        "device": str(mx.default_device()),
    }
    try:
        info["memory_gb"] = round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30, 1)
    except (ValueError, OSError, AttributeError):
        pass
    if info["backend"] == "metal":
        d = mx.metal.device_info()
        info["chip"] = d.get("device_name", "?")
        info["gpu_memory_gb"] = round(d.get("memory_size", 0) / 2**30, 1)
    elif info["backend"] == "cuda":
        info["chip"] = _nvidia_name() or "NVIDIA GPU"
        info["cpu"] = _cpu_name()
    else:
        info["chip"] = _cpu_name()
    return info


def _nvidia_name() -> str | None:
    # MLX has no CUDA device-name query; the driver's tool does (the doctor once reported the host CPU here)
    import subprocess

    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=name", "--format=csv,noheader"], capture_output=True,
                             text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return None
    names = [line.strip() for line in out.stdout.splitlines() if line.strip()]
    return names[0] if out.returncode == 0 and names else None


def _cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def _time(fn, repeats: int = 5) -> float:
    mx.eval(*fn())
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        mx.eval(*fn())
        times.append(time.perf_counter() - t)
    return float(np.median(times))


def kernels(recheck: bool = False) -> list[dict]:
    out = []
    target = epilogue.gpu_target()
    for name, k in registry.KERNELS.items():
        if target is None:
            out.append({"kernel": name, "verdict": "not in use", "reason": "no GPU backend; the plain-mx fallback runs"})
            continue
        verdict = registry.verify(name, target) if recheck else None
        if verdict is None:
            registry.reset()
            registry.use_fast(name)
            verdict = registry._verdicts.get(name, {"ok": False, "reason": "unknown"})
        row = {"kernel": name, "verdict": "ok" if verdict["ok"] else "fallback", "reason": verdict["reason"]}
        if verdict["ok"]:
            args = k.probe()
            row["kernel_ms"] = round(1e3 * _time(lambda: k.fast(target, *args)), 4)
            row["fallback_ms"] = round(1e3 * _time(lambda: k.fallback(*args)), 4)
        out.append(row)
    return out


SIZES = {
    "small": dict(hidden_size=256, intermediate_size=512, num_hidden_layers=6, num_attention_heads=4,
                  num_key_value_heads=2, head_dim=64, global_head_dim=128, num_global_key_value_heads=1,
                  sliding_window=1024, num_experts=16, top_k_experts=4, moe_intermediate_size=128,
                  vocab_size=16384),
    # the real widths, one sliding and one full layer
    "full-width": dict(hidden_size=2816, intermediate_size=2112, num_hidden_layers=2, num_attention_heads=16,
                       num_key_value_heads=8, head_dim=256, global_head_dim=512, num_global_key_value_heads=2,
                       sliding_window=1024, num_experts=128, top_k_experts=8, moe_intermediate_size=704,
                       vocab_size=262144, layer_types=["sliding_attention", "full_attention"]),
}


def step_benchmark(size: str, budget_s: float, prefix: int = 128) -> dict:
    from .config import ModelConfig
    from .model import DiffusionGemma

    cfg = ModelConfig.from_dict({"model_type": "diffusion_gemma", "canvas_length": 256, "text_config": SIZES[size]})
    dtype = mx.bfloat16 if epilogue.gpu_target() else mx.float32  # MLX's CPU is slow in bf16
    model = DiffusionGemma(cfg)
    model.set_dtype(dtype)
    mx.eval(model.parameters())
    rng = np.random.default_rng(0)
    cache = model.make_cache()
    model.encode(mx.array(rng.integers(0, cfg.vocab_size, (1, prefix))), cache)
    mx.eval(cache.state())
    canvas = mx.array(rng.integers(0, cfg.vocab_size, (1, cfg.canvas_length)))
    mx.eval(model.denoise(canvas, cache))  # warm-up
    times, start = [], time.perf_counter()
    while time.perf_counter() - start < budget_s or len(times) < 2:
        t = time.perf_counter()
        mx.eval(model.denoise(canvas, cache))
        times.append(time.perf_counter() - t)
        if len(times) >= 50:
            break
    return {"size": size, "layers": cfg.num_hidden_layers, "dtype": str(dtype).split(".")[-1],
            "prefix": prefix, "ms_per_step": round(1e3 * float(np.median(times)), 2),
            "spread_ms": round(1e3 * float(np.percentile(times, 90) - np.percentile(times, 10)), 2),
            "steps_timed": len(times)}


@click.command(context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--json", "as_json", is_flag=True, help="Print the report as JSON.")
@click.option("--recheck", is_flag=True, help="Re-run the kernel checks instead of using cached verdicts.")
@click.option("--budget", type=click.FloatRange(min=1), default=30.0, show_default=True,
              help="Seconds for the denoise-step benchmark (split between the sizes).")
@click.option("--sizes", default=None,
              help="Comma-separated benchmark sizes (small, full-width). Default: both on a GPU, small on the CPU, "
                   "where a full-width step takes minutes.")
def main(as_json, recheck, budget, sizes):
    """Check this machine: kernels against their fallbacks, and a denoise-step benchmark."""
    if sizes is None:
        sizes = "small,full-width" if epilogue.gpu_target() else "small"
    names = [s.strip() for s in sizes.split(",") if s.strip()]
    for n in names:
        if n not in SIZES:
            raise click.UsageError(f"unknown size {n!r}; choose from {', '.join(SIZES)}")
    report = {"machine": machine(), "kernels": kernels(recheck)}
    report["denoise_step"] = [step_benchmark(n, budget / len(names)) for n in names]
    bad = [k["kernel"] for k in report["kernels"] if k["verdict"] == "fallback"]
    m = report["machine"]
    report["summary"] = (
        f"{m['chip']} / {m['backend']} / mlx {m['mlx']}: "
        + (f"kernels disabled: {', '.join(bad)}" if bad else
           "kernels ok" if m["backend"] != "cpu" else "CPU: custom kernels not in use")
        + "; " + ", ".join(f"{d['size']} {d['ms_per_step']} ms/step" for d in report["denoise_step"])
    )
    if as_json:
        click.echo(json.dumps(report, indent=2))
        return
    click.echo("machine:")
    for k, v in m.items():
        click.echo(f"  {k:14s} {v}")
    click.echo("kernels:")
    for k in report["kernels"]:
        speed = f"  kernel {k['kernel_ms']} ms vs fallback {k['fallback_ms']} ms" if "kernel_ms" in k else ""
        click.echo(f"  {k['kernel']:18s} {k['verdict']:10s} {k['reason']}{speed}")
    click.echo("denoise step (random weights, canvas 256):")
    for d in report["denoise_step"]:
        click.echo(f"  {d['size']:10s} {d['layers']} layers {d['dtype']:8s} prefix {d['prefix']}: "
                   f"{d['ms_per_step']} ms/step (p10-p90 spread {d['spread_ms']} ms, {d['steps_timed']} steps)")
    click.echo(f"summary: {report['summary']}")


if __name__ == "__main__":
    sys.exit(main())
