"""Where a small canvas pass's fixed cost goes, on the device MLX runs on (the CPU here):

- MLX's evaluation cost per graph node (a chain of additions on an [8, H] array);
- how many graph nodes a canvas pass is: a whole 48-row pass and an 8-row partial one;
- the experts' `gather_mm` per (token, expert) pair;
- RoPE by its cos / sin tables (built once per pass, q and k together) against `mx.fast.rope`,
  over a whole 128-row pass;
- RMSNorm: the compiled norm `layers.rms_norm` uses for small inputs on the CPU against
  `mx.fast.rms_norm`, per call in a chain of 40, by input size;
- whole passes under `mx.compile` (one shape each, the weights and cache as constants) against
  the plain graph: 8-row partial, whole 48-row and 128-row canvas passes, and what the first
  call with a new shape costs (tracing, and on a machine's first run compiling the fused CPU
  kernels with the system C++ compiler, which MLX caches on disk).

    python -m benchmarks.pass_overhead --model sort

Writes benchmarks/results/pass_overhead-<stamp>.json and .md. Minimum over rounds (the machine's
noise is one-sided).
"""

from __future__ import annotations

import argparse
import io
import json
import re
import sys
import time
from pathlib import Path

import mlx.core as mx
import numpy as np

from benchmarks.machine import record as machine_record
from mlx_diffgemma import layers, load
from mlx_diffgemma.files import write_text_atomic
from mlx_diffgemma.loading import LoadError

RESULTS = Path(__file__).parent / "results"


def _best_us(fn, calls: int, rounds: int) -> float:
    """Minimum over `rounds` of the mean time of `calls` evaluated calls, in µs."""
    mx.eval(fn())
    best = float("inf")
    for _ in range(rounds):
        tic = time.perf_counter()
        for _ in range(calls):
            mx.eval(fn())
        best = min(best, (time.perf_counter() - tic) / calls * 1e6)
    return best


def graph_nodes(*outputs) -> int:
    """Graph nodes behind `outputs` that are not evaluated yet (MLX's dot export, counted)."""
    f = io.StringIO()
    mx.export_to_dot(f, *outputs)
    return len(re.findall(r"label =", f.getvalue()))


def measure(model, rounds: int) -> dict:
    rng = np.random.default_rng(0)
    H, V = model.config.hidden_size, model.config.vocab_size
    cache = model.make_cache()
    model.encode(mx.array(rng.integers(0, V, (1, 30))), cache)
    mx.eval(cache.state())
    C = min(48, model.config.canvas_length)
    canvas = mx.array(rng.integers(0, V, (1, C)))
    soft = mx.array(rng.normal(size=(1, C, H)).astype(np.float32))
    _, kv = model.denoise_hidden(canvas, cache, soft, rows=mx.arange(C), collect_kv=True)
    mx.eval(kv)
    rows = mx.array(np.sort(rng.choice(C, 8, replace=False)))
    mx.eval(rows)
    out = {}

    x = mx.array(rng.normal(size=(8, H)).astype(np.float32))
    mx.eval(x)

    def chain(n):
        y = x
        for _ in range(n):
            y = y + 1
        return y

    out["eval_us_per_node"] = round((_best_us(lambda: chain(700), 5, rounds) - _best_us(lambda: chain(100), 5, rounds))
                                    / 600, 3)
    out["nodes_whole_pass"] = graph_nodes(model.denoise_hidden(canvas, cache, soft, rows=mx.arange(C)))
    h, new_kv = model.denoise_hidden(canvas[:, rows], cache, soft[:, rows], rows=rows, canvas_kv=kv, collect_kv=True)
    out["nodes_partial_pass_8_rows"] = graph_nodes(h, *[a for pair in new_kv for a in pair])
    out["whole_pass_rows"] = C

    W = mx.array(rng.normal(size=(4, H, 2 * H)).astype(np.float32))
    for pairs in (16, 256):
        xs = mx.array(rng.normal(size=(pairs, 1, 1, H)).astype(np.float32))
        idx = mx.array(np.sort(rng.integers(0, 4, (pairs, 1))).astype(np.uint32))
        mx.eval(W, xs, idx)
        t = _best_us(lambda: mx.gather_mm(xs, W, rhs_indices=idx, sorted_indices=True), 50, rounds)
        out[f"gather_mm_us_per_pair_{pairs}"] = round(t / pairs, 3)

    # a pass's RoPE work on 128 rows, every layer: q and k rotated by mx.fast.rope, or by the cos / sin
    # tables built once per pass and q and k rotated together (what the CPU path does)
    attns = [layer.self_attn for layer in model.layers]
    q = [mx.array(rng.normal(size=(1, a.num_heads, 128, a.head_dim)).astype(np.float32)) for a in attns]
    k = [mx.array(rng.normal(size=(1, a.num_kv_heads, 128, a.head_dim)).astype(np.float32)) for a in attns]
    mx.eval(q, k)
    positions = cache.offset + mx.arange(128)

    def rope_fast():
        return [y for a, qi, ki in zip(attns, q, k) for y in (a.rope(qi, cache.offset), a.rope(ki, cache.offset))]

    def rope_tables():
        tables = {}
        return [a.rope.at(mx.concatenate([qi, ki], axis=1), positions, tables) for a, qi, ki in zip(attns, q, k)]

    out["rope_fast_us_pass_128_rows"] = round(_best_us(rope_fast, 50, rounds), 1)
    out["rope_tables_us_pass_128_rows"] = round(_best_us(rope_tables, 50, rounds), 1)

    w = mx.ones((H,))
    norms = []
    for n in (4, 48, 128):
        y0 = mx.array(rng.normal(size=(1, n, H)).astype(np.float32))
        mx.eval(y0)

        def norm_chain(fn):
            y = y0
            for _ in range(40):
                y = fn(y, w, 1e-6) + 0.1
            return y

        compiled = layers._cpu_rms_norm(1e-6, True, H)
        norms.append({
            "rows": n, "elements": n * H,
            "fast_us": round(_best_us(lambda: norm_chain(mx.fast.rms_norm), 10, rounds) / 40, 1),
            "compiled_us": round(_best_us(lambda: norm_chain(lambda a, b, e: compiled(a, b)), 10, rounds) / 40, 1),
        })
    out["rms_norm_per_call"] = norms
    out["compiled_passes"] = compiled_passes(model, cache, kv, rng, rounds)
    return out


def compiled_passes(model, cache, kv, rng, rounds: int) -> list[dict]:
    """Each pass plain and under mx.compile (ms), and the compiled pass' first call at a new shape."""
    H, V, C = model.config.hidden_size, model.config.vocab_size, kv[0][0].shape[2]

    def partial(n):
        rows = mx.array(np.sort(rng.choice(C, n, replace=False)))
        x, soft = mx.array(rng.integers(0, V, (1, n))), mx.array(rng.normal(size=(1, n, H)).astype(np.float32))
        mx.eval(rows, x, soft)

        def run():
            h, new_kv = model.denoise_hidden(x, cache, soft, rows=rows, canvas_kv=kv, collect_kv=True)
            return [h] + [a for pair in new_kv for a in pair]
        return run

    def whole(n):
        x, soft = mx.array(rng.integers(0, V, (1, n))), mx.array(rng.normal(size=(1, n, H)).astype(np.float32))
        mx.eval(x, soft)
        return lambda: [model.denoise_hidden(x, cache, soft)]

    out = []
    for name, build, n, fresh in (("partial", partial, 8, 7), ("whole", whole, C, C - 1), ("whole", whole, 128, 127)):
        run = build(n)
        compiled = mx.compile(run)
        plain_ms = _best_us(run, 20, rounds) / 1e3
        compiled_ms = _best_us(compiled, 20, rounds) / 1e3
        diff = max(float(mx.abs(a - b).max()) for a, b in zip(run(), compiled()))
        other = mx.compile(build(fresh))  # a new function: nothing traced yet at this shape
        tic = time.perf_counter()
        mx.eval(other())
        first_ms = (time.perf_counter() - tic) * 1e3
        out.append({"pass": name, "rows": n, "plain_ms": round(plain_ms, 2), "compiled_ms": round(compiled_ms, 2),
                    "first_call_new_shape_ms": round(first_ms, 1), "max_abs_diff": diff})
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="sort")
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--shared", action="store_true", help="other jobs share the CPU: the result says its timings are noisy")
    args = p.parse_args(argv)
    try:
        model, _ = load(args.model)
    except LoadError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if len(model.layers) < 2:
        print(f"error: --model {args.model}: needs at least two layers (a sliding and a full one)", file=sys.stderr)
        return 2
    r = measure(model, args.rounds)
    RESULTS.mkdir(parents=True, exist_ok=True)
    stem = f"pass_overhead-{time.strftime('%Y%m%d-%H%M%S')}"
    command = "python -m benchmarks.pass_overhead " + " ".join(sys.argv[1:] if argv is None else argv)
    doc = {"benchmark": "pass_overhead", "command": command, "model": args.model, "device": str(mx.default_device()),
           "machine": machine_record(shared=args.shared), **r}
    write_text_atomic(RESULTS / f"{stem}.json", json.dumps(doc, indent=2) + "\n")
    lines = [f"# Fixed cost of a small canvas pass ({args.model}, {doc['device']})", "", f"Command: `{command}`", "",
             f"- MLX evaluation: {r['eval_us_per_node']} µs per graph node (additions on an [8, H] array)",
             f"- graph nodes: {r['nodes_whole_pass']} for a whole {r['whole_pass_rows']}-row trunk pass, "
             f"{r['nodes_partial_pass_8_rows']} for an 8-row partial one (with its K/V)",
             f"- experts' gather_mm: {r['gather_mm_us_per_pair_16']} µs per (token, expert) pair at 16 pairs, "
             f"{r['gather_mm_us_per_pair_256']} at 256",
             f"- RoPE of a 128-row pass, every layer: mx.fast.rope on q and k {r['rope_fast_us_pass_128_rows']} µs, "
             f"the cos / sin tables (built once) on q and k together {r['rope_tables_us_pass_128_rows']} µs",
             "", "RMSNorm per call, in a chain of 40 (µs):", "", "| rows | elements | mx.fast.rms_norm | compiled |",
             "|---|---|---|---|"]
    lines += [f"| {n['rows']} | {n['elements']} | {n['fast_us']} | {n['compiled_us']} |" for n in r["rms_norm_per_call"]]
    lines += ["", "Whole passes under mx.compile, one shape each (ms; the first call at a new shape traces, and "
              "on a machine's first run compiles the fused kernels too):", "",
              "| pass | rows | plain | compiled | first compiled call, new shape |", "|---|---|---|---|---|"]
    lines += [f"| {c['pass']} | {c['rows']} | {c['plain_ms']} | {c['compiled_ms']} | {c['first_call_new_shape_ms']} |"
              for c in r["compiled_passes"]]
    m = doc["machine"]
    lines += ["", f"Machine: {m.get('cpu', '?')}, {m.get('cpu_count')} cores; "
              f"{m.get('shared_note') or 'no other benchmark on the CPU'}"]
    write_text_atomic(RESULTS / f"{stem}.md", "\n".join(lines) + "\n")
    print("\n".join(lines))
    print(f"wrote {RESULTS / stem}.json")
    return 0


if __name__ == "__main__":
    sys.exit(main())
