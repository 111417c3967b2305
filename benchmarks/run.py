"""`python -m benchmarks.run`: every system on the same weights, prompt and step settings, in one run.

    python -m benchmarks.run --sizes tiny,small,full-slice --shared   # this CPU
    python -m benchmarks.run --smoke --out /tmp/smoke                  # CI-fast: tiny, one repeat
    bash benchmarks/gpu.sh                                             # NVIDIA GPU (MLX CUDA + torch)

Writes benchmarks/results/<stamp>-<device>.json (machine record + one row per system x size x
scenario), a markdown table and PNG plots beside it. Every system runs in its own subprocess.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path

from mlx_diffgemma.files import write_text_atomic

from . import machine, report
from .flops import step_flops
from .sizes import GPU_PLANS, PLANS, SIZES, SMOKE_PLAN, text_config

REPO = Path(__file__).resolve().parent.parent
RESULTS = REPO / "benchmarks" / "results"
OPENBLAS = "/usr/lib/x86_64-linux-gnu/openblas-pthread/libblas.so.3"
ALL_PREFIXES = [128, 1024, 8192]
SYSTEMS = ["ours-reference", "ours-fast", "transformers", "mlx-vlm", "ar-twin"]
MLX_SYSTEMS = {"ours-reference", "ours-fast", "mlx-vlm", "ar-twin", "gemm-mlx"}
BACKEND = {"transformers": "torch", "gemm-torch": "torch"}  # everything else is MLX
SCHEMA = 1

ROW_FIELDS = [
    "system", "size", "scenario", "status", "reason", "prefix_tokens", "ms_per_step", "ms_per_step_min",
    "ms_per_step_max", "committed_tokens_per_s", "prefill_tokens_per_s", "peak_memory_bytes",
    "row_passes_per_token", "step_flops", "gemm_flops_per_s", "gemm_fraction",
]


def prefix_name(p: int) -> str:
    return f"{p // 1024}k" if p >= 1024 else str(p)


def scenarios(system: str, plan: dict, smoke: bool) -> list[tuple[str, int | None]]:
    steps = [(f"step@{prefix_name(p)}", p) for p in plan["prefixes"]]
    if not plan.get("generate", True):
        return [] if system == "ours-fast" else steps
    if system == "ar-twin":
        return steps + [("generate", 128)]
    adaptive = [] if smoke or not plan.get("adaptive", True) else [("generate-adaptive", 128)]
    if system == "ours-fast":
        return [("generate-16", 128)] + adaptive
    return steps + [("generate-16", 128)] + adaptive


def worker_env(system: str, openblas: str | None, threads: int | None = None) -> dict:
    env = dict(os.environ)
    if threads:  # oversubscribed cores make spinning BLAS/OpenMP threads crawl (seen: torch 20x)
        for k in ("DGBENCH_THREADS", "OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
            env[k] = str(threads)
    env["PYTHONPATH"] = os.pathsep.join([str(REPO)] + ([env["PYTHONPATH"]] if env.get("PYTHONPATH") else []))
    env.pop("LD_PRELOAD", None)
    if system in MLX_SYSTEMS and openblas:  # never in a torch process: it slows transformers 7-30x
        env["LD_PRELOAD"] = openblas
    return env


DEADLINE = [float("inf")]  # perf_counter time after which no job starts (--budget-s)


def run_job(job: dict, python: str, env: dict, timeout: float) -> dict:
    left = DEADLINE[0] - time.perf_counter()
    if left <= 0:
        return {"status": "skipped", "reason": "the run's time budget (--budget-s) was spent"}
    timeout = min(timeout, left + 30)
    with tempfile.TemporaryDirectory(prefix="dgbench-job-") as tmp:
        job_path, out_path = Path(tmp) / "job.json", Path(tmp) / "out.json"
        job_path.write_text(json.dumps(job))
        try:
            proc = subprocess.run([python, "-m", "benchmarks.worker", str(job_path), str(out_path)],
                                  cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout)
        except subprocess.TimeoutExpired:
            return {"status": "failed", "reason": f"timed out after {timeout:.0f} s"}
        if proc.returncode != 0 or not out_path.exists():
            lines = [line for line in (proc.stderr or "").strip().splitlines() if line.strip()]
            reason = lines[-1] if lines else f"exit code {proc.returncode}"
            if proc.returncode < 0:
                reason = f"killed by signal {-proc.returncode} (out of memory?)"
            return {"status": "failed", "reason": reason[:300], "stderr_tail": lines[-15:]}
        return json.loads(out_path.read_text())


def build_checkpoint(size: str, work_dir: Path, dtype: str, timeout: float) -> dict:
    proc = subprocess.run([sys.executable, "-m", "benchmarks.checkpoints", size, str(work_dir), "--dtype", dtype],
                          cwd=REPO, env=worker_env("builder", None), capture_output=True, text=True, timeout=timeout)
    if proc.returncode != 0:
        raise RuntimeError(f"building the {size} checkpoint failed: {proc.stderr.strip().splitlines()[-1:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def add_fractions(rows: list[dict]) -> None:
    """FLOPs of each measured step and the share of the backend's own GEMM rate it reaches."""
    # the peak is a property of backend and dtype, not of the size: take the best rate measured in
    # the run, so one measurement disturbed by a neighbour's job does not inflate the shares
    peaks: dict[str, float] = {}
    for r in rows:
        if r["scenario"] == "gemm" and r["status"] == "ok":
            key = BACKEND.get(r["system"], "mlx")
            peaks[key] = max(peaks.get(key, 0.0), r["gemm_flops_per_s"])
    for r in rows:
        if r["status"] != "ok" or r["scenario"] == "gemm" or not r.get("ms_per_step"):
            continue
        text = text_config(r["size"])
        C = SIZES[r["size"]]["canvas_length"]
        ar = r["system"] == "ar-twin"
        if r["scenario"].startswith("step@"):
            flops = step_flops(text, C, r["prefix_tokens"], autoregressive=ar)
        elif r["system"] != "ours-fast":  # mean context over a generate run: prefix + half the output
            flops = step_flops(text, C, r["prefix_tokens"] + (64 if ar else C // 2), autoregressive=ar)
        else:
            continue  # the fast path does not run full-width steps
        r["step_flops"] = flops
        peak = peaks.get(BACKEND.get(r["system"], "mlx"))
        if peak:
            r["gemm_flops_per_s"] = peak
            r["gemm_fraction"] = flops / (r["ms_per_step"] / 1e3) / peak


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.run", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", default="tiny,small,full-slice", help=f"comma list of {', '.join(SIZES)}")
    parser.add_argument("--systems", default=",".join(SYSTEMS), help="comma list of " + ", ".join(SYSTEMS))
    parser.add_argument("--smoke", action="store_true", help="CI mode: tiny, one repeat, ours + transformers")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    parser.add_argument("--work-dir", default=os.environ.get("DGBENCH_WORK", "/tmp/mlx-diffgemma-bench"),
                        help="where the checkpoints are written (once) and reused")
    parser.add_argument("--out", default=str(RESULTS), help="results folder")
    parser.add_argument("--tag", default=None, help="suffix of the result file names (default: cpu or cuda)")
    parser.add_argument("--bench-python", default=str(REPO / ".venv-bench" / "bin" / "python"),
                        help="python of the bench-only virtualenv that has mlx-vlm")
    parser.add_argument("--openblas", default=OPENBLAS if Path(OPENBLAS).exists() else None,
                        help="BLAS preloaded into MLX processes on the CPU ('' for none)")
    parser.add_argument("--fast-mode", default="turbo", help="the fast path's mode run as ours-fast (mlx_diffgemma.fast.MODES)")
    parser.add_argument("--append", default=None, metavar="RESULT.json",
                        help="add this run's rows to an earlier result file of the same machine")
    parser.add_argument("--shared", action="store_true", help="record that the machine was shared with other jobs")
    parser.add_argument("--threads", type=int, default=None,
                        help="CPU threads per worker (BLAS, OpenMP, torch); default: all cores")
    parser.add_argument("--timeout", type=float, default=3600, help="seconds per system x scenario")
    parser.add_argument("--budget-s", type=float, default=None,
                        help="stop starting jobs after this many seconds (rows left are marked skipped)")
    args = parser.parse_args(argv)
    if args.budget_s:
        DEADLINE[0] = time.perf_counter() + args.budget_s

    sizes = ["tiny"] if args.smoke else [s.strip() for s in args.sizes.split(",") if s.strip()]
    systems = ["ours-reference", "transformers"] if args.smoke else [s.strip() for s in args.systems.split(",") if s.strip()]
    for s in sizes:
        if s not in SIZES:
            parser.error(f"--sizes: unknown size {s!r}; choose from {', '.join(SIZES)}")
    for s in systems:
        if s not in SYSTEMS:
            parser.error(f"--systems: unknown system {s!r}; choose from {', '.join(SYSTEMS)}")
    work_dir, out_dir = Path(args.work_dir), Path(args.out)
    work_dir.mkdir(parents=True, exist_ok=True)
    out_dir.mkdir(parents=True, exist_ok=True)
    bench_python = args.bench_python if Path(args.bench_python).exists() else None
    gpu = bool(machine._gpus())
    plans = GPU_PLANS if gpu else PLANS
    for s in [] if args.smoke else sizes:
        if s not in plans:
            parser.error(f"--sizes: no {'GPU' if gpu else 'CPU'} plan for size {s!r}; choose from {', '.join(plans)}")
    tag = args.tag or ("smoke" if args.smoke else "cuda" if gpu else "cpu")
    stamp = datetime.now(timezone.utc).strftime("%Y%m%d-%H%M%S")
    stem = out_dir / f"{stamp}-{tag}"
    if args.append:
        earlier = Path(args.append)
        if not earlier.is_file():
            parser.error(f"--append: {earlier} is not a result file")
        stem = earlier.with_suffix("")
    result = {
        "schema": SCHEMA,
        "started": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "command": "python -m benchmarks.run " + " ".join(sys.argv[1:] if argv is None else argv),
        "machine": machine.record(args.shared, bench_python),
        "settings": {"dtype": args.dtype, "openblas_for_mlx": args.openblas or None, "smoke": args.smoke,
                     "threads_per_worker": args.threads or os.cpu_count(),
                     "fast_mode": args.fast_mode,
                     "plans": {s: (SMOKE_PLAN if args.smoke else plans[s]) for s in sizes},
                     "prompt": "random token ids (seeded), 128 tokens for generate-*; EOS off everywhere",
                     "sampler": "entropy-bound 0.1, temperature 0.8 -> 0.4, whole 256-token canvases"},
        "rows": [],
    }
    if args.append:  # one result, several invocations: keep the first record, note each command
        first = json.loads(Path(args.append).read_text())
        first.setdefault("continued", []).append({k: result[k] for k in ("started", "command", "settings")}
                                                 | {"load_average_start": result["machine"]["load_average_start"]})
        result = first
    rows = result["rows"]

    def save():
        write_text_atomic(stem.with_suffix(".json"), json.dumps(result, indent=1))

    def add(row):
        row = {**{k: None for k in ROW_FIELDS}, **row}  # every row carries every field
        rows.append(row)
        shown = f"{row['ms_per_step']:.2f} ms/step" if row.get("ms_per_step") else row.get("reason", "")
        print(f"  {row['system']:15s} {row['size']:10s} {row['scenario']:18s} {row['status']:11s} {shown}", flush=True)
        save()

    for size in sizes:
        plan = dict(SMOKE_PLAN if args.smoke else plans[size])
        print(f"[{size}] checkpoint", flush=True)
        paths = build_checkpoint(size, work_dir, args.dtype, args.timeout)
        base = {"size": size, "dtype": args.dtype, "hf": paths["hf"], "ar": paths["ar"], "plan": plan,
                "fast_mode": args.fast_mode}
        for system in ["gemm-mlx", "gemm-torch"]:
            res = run_job({**base, "system": system, "scenario": "gemm"}, sys.executable,
                          worker_env(system, args.openblas, args.threads), args.timeout)
            add({"system": system, "size": size, "scenario": "gemm", "prefix_tokens": None, **res})
        for system in systems:
            python = sys.executable
            if system == "mlx-vlm":
                if not bench_python:
                    add({"system": system, "size": size, "scenario": "*", "status": "unavailable",
                         "reason": f"no bench virtualenv at {args.bench_python} (see docs/benchmarks.md)"})
                    continue
                python = bench_python
            skipped = [p for p in ALL_PREFIXES if p not in plan["prefixes"]]
            if skipped and not args.smoke and system != "ours-fast":
                add({"system": system, "size": size, "scenario": "step@" + ",".join(map(prefix_name, skipped)),
                     "status": "skipped", "reason": plan.get("skip_reason", "not in this size's plan")})
            if not plan.get("generate", True):
                add({"system": system, "size": size, "scenario": "generate-*", "status": "skipped",
                     "reason": plan.get("generate_skip_reason", "not in this size's plan")})
            if plan.get("generate", True) and not plan.get("adaptive", True) and system != "ar-twin":
                add({"system": system, "size": size, "scenario": "generate-adaptive", "status": "skipped",
                     "reason": plan.get("adaptive_skip_reason", "not in this size's plan")})
            for scenario, prefix in scenarios(system, plan, args.smoke):
                tic = time.perf_counter()
                res = run_job({**base, "system": system, "scenario": scenario, "prefix": prefix}, python,
                              worker_env(system, args.openblas, args.threads), args.timeout)
                res.setdefault("wall_s", round(time.perf_counter() - tic, 3))
                add({"system": system, "size": size, "scenario": scenario, "prefix_tokens": prefix, **res})
                if res["status"] == "unavailable":
                    break  # the same reason holds for every scenario of this system

    add_fractions(rows)
    result["finished"] = datetime.now(timezone.utc).isoformat(timespec="seconds")
    result["machine"]["load_average_end"] = list(os.getloadavg()) if hasattr(os, "getloadavg") else None
    for r in rows:
        for k in ("hf", "ar", "plan", "fast_mode"):
            r.pop(k, None)
    save()
    write_text_atomic(stem.with_suffix(".md"), report.markdown(result))
    pngs = report.plots(result, stem)
    print(f"wrote {stem.with_suffix('.json')}, {stem.with_suffix('.md')}" + "".join(f", {p}" for p in pngs))
    return 0


if __name__ == "__main__":
    sys.exit(main())
