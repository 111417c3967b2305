"""100 sequential requests through the Python API on one loaded model: is memory and latency flat?

    python -m mlx_diffgemma.testing /tmp/seq-tiny          # once, without OpenBLAS (it imports torch)
    LD_PRELOAD=/usr/lib/x86_64-linux-gnu/openblas-pthread/libblas.so.3 \\
        python benchmarks/sequential_requests.py --model /tmp/seq-tiny

Each request is `stream_generate` with a different prompt (lengths vary) and seed, consumed to the
end, as an app would; EOS is disabled, so every request denoises the same canvases and steps and
latencies compare. Per request: wall latency, time to first text, MLX active / cache / peak
memory, the process RSS and its thread count. Compares the first ten requests with the last ten.
Writes benchmarks/results/sequential_requests.{json,md} (temp file, then rename).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import threading
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))

from mlx_diffgemma.files import write_text_atomic  # noqa: E402

NO_EOS = 10**9  # an id no model emits

PROMPTS = [
    "Why is the sky blue?",
    "Write a short poem about the sea.",
    "Diffusion models refine a whole canvas of tokens at once, step by step. Explain how.",
    "Sudoku rows columns boxes digits solve puzzle grid cell " * 3,
    "The quick brown fox jumps over the lazy dog.",
]


def rss_bytes() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * (1 if sys.platform == "darwin" else 1024)


def threads() -> int:
    try:
        return len(os.listdir("/proc/self/task"))
    except OSError:
        return threading.active_count()


def summary(rows: list[dict]) -> dict:
    def med(key):
        return statistics.median(r[key] for r in rows)

    return {k: med(k) for k in ("latency_s", "ms_per_step", "first_text_s", "rss_bytes", "active_bytes", "cache_bytes",
                                "peak_bytes", "threads")}


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", required=True, help="model directory (e.g. from `python -m mlx_diffgemma.testing`)")
    p.add_argument("--requests", type=int, default=100)
    p.add_argument("--max-tokens", type=int, default=64)
    p.add_argument("--steps", type=int, default=8)
    p.add_argument("--shared", action="store_true", help="the machine's cores were shared with other jobs")
    p.add_argument("--out", default=str(HERE / "results" / "sequential_requests"))
    args = p.parse_args(argv)

    import mlx.core as mx

    from mlx_diffgemma import load, stream_generate

    model, tokenizer = load(args.model)
    rows = []
    for i in range(args.requests):
        prompt = PROMPTS[i % len(PROMPTS)] + " " + "more " * (i % 7)
        tic = time.perf_counter()
        # no EOS: every request does the same work (canvases x steps), so latencies compare
        for event in stream_generate(model, tokenizer, prompt, max_tokens=args.max_tokens, seed=i,
                                     max_denoising_steps=args.steps, eos_token_id=[NO_EOS]):
            if event.kind == "done":
                done = event
        latency = time.perf_counter() - tic
        rows.append({
            "request": i, "latency_s": latency, "ms_per_step": latency * 1e3 / max(done.stats.denoise_steps, 1), "first_text_s": done.stats.first_text_s or 0.0,
            "prompt_tokens": done.stats.prompt_tokens, "committed_tokens": done.stats.committed_tokens,
            "denoise_steps": done.stats.denoise_steps, "rss_bytes": rss_bytes(),
            "active_bytes": int(mx.get_active_memory()), "cache_bytes": int(mx.get_cache_memory()),
            "peak_bytes": done.stats.peak_memory_bytes, "threads": threads(),
        })
        print(f"{i:3d} {latency * 1e3:7.1f} ms  rss {rows[-1]['rss_bytes'] / 2**20:7.1f} MiB  "
              f"active {rows[-1]['active_bytes'] / 2**20:6.2f} MiB  threads {rows[-1]['threads']}", flush=True)

    first, last = summary(rows[:10]), summary(rows[-10:])
    ratio = {k: (last[k] / first[k] if first[k] else None) for k in first}
    try:
        from benchmarks.machine import record

        machine = record(shared=args.shared)
    except Exception as e:  # the machine record is a nicety; never lose the measurements over it
        machine = {"error": repr(e)}
    result = {
        "benchmark": "sequential_requests",
        "command": " ".join([os.path.basename(sys.executable), *sys.argv]),
        "ld_preload": os.environ.get("LD_PRELOAD", ""),
        "settings": {"model": args.model, "requests": args.requests, "max_tokens": args.max_tokens,
                     "max_denoising_steps": args.steps, "canvas_length": model.config.canvas_length},
        "machine": machine, "shared_cores": args.shared,
        "first_ten_median": first, "last_ten_median": last, "last_over_first": ratio, "requests": rows,
    }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    write_text_atomic(out.with_suffix(".json"), json.dumps(result, indent=2))

    def fmt(k, v):
        if k.endswith("bytes"):
            return f"{v / 2**20:.2f} MiB"
        if k == "ms_per_step":
            return f"{v:.2f} ms"
        if k.endswith("_s"):
            return f"{v * 1e3:.1f} ms"
        return f"{v:g}"

    lines = [
        "# Sequential requests: memory and latency over 100 requests on one loaded model", "",
        f"`{result['command']}`" + (f" (LD_PRELOAD={result['ld_preload']})" if result["ld_preload"] else ""), "",
        f"Model: {args.model} (canvas {model.config.canvas_length}); {args.requests} requests of "
        f"max_tokens={args.max_tokens}, max_denoising_steps={args.steps} (EOS disabled: the same work each), "
        "prompts of varying length, seed = request index.",
        f"Machine: {machine.get('cpu', machine)}" + ("; the 2 cores were shared with other jobs." if args.shared else "."),
        "", "| median of | first 10 | last 10 | last / first |", "|---|---|---|---|",
    ]
    for k in first:
        r = ratio[k]
        lines.append(f"| {k} | {fmt(k, first[k])} | {fmt(k, last[k])} | {'' if r is None else f'{r:.3f}'} |")
    write_text_atomic(out.with_suffix(".md"), "\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
