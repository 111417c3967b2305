"""What one denoising step costs as a function of the rows it runs: the trunk over a full canvas
of n rows, the same n rows as a partial pass (the rest of the canvas as cached K/V, as `compact`
runs them), the LM head with its statistics, and a canvas' first step with the prompt's encode
as a pass of its own or inside the trunk's pass (`denoise(..., prefix=)`). Fits cost = fixed + per_row * n, which says how
much of a step a fast mode can save by running fewer rows.

    python -m benchmarks.step_cost --model sudoku

Writes benchmarks/results/step_cost-<stamp>.json and .md.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import mlx.core as mx
import numpy as np

from benchmarks.machine import record as machine_record
from mlx_diffgemma import load, sudoku
from mlx_diffgemma.files import write_text_atomic
from mlx_diffgemma.kernels import head_statistics

RESULTS = Path(__file__).parent / "results"


def _ms(fn, reps: int, rounds: int) -> float:
    """Median over `rounds` of the mean of `reps` evaluated calls, in ms."""
    mx.eval(fn())
    out = []
    for _ in range(rounds):
        tic = time.perf_counter()
        for _ in range(reps):
            mx.eval(fn())
        out.append(1e3 * (time.perf_counter() - tic) / reps)
    return float(np.median(out))


def measure(model, rows: list[int], reps: int, rounds: int, seed: int = 0) -> list[dict]:
    C = model.config.canvas_length
    rng = np.random.default_rng(seed)
    cache = model.make_cache()
    if C == sudoku.CELLS:  # a Sudoku model gets a real puzzle as its prompt
        ids = sudoku.prompt_ids(sudoku.puzzle_set(seed, 1, (30, 30))[0][0])
    else:
        ids = rng.integers(0, model.config.vocab_size, 32).tolist()
    model.encode(mx.array([ids]), cache)
    mx.eval(cache.state())
    canvas = mx.array(rng.integers(0, model.config.vocab_size, (1, C)))
    _, kv = model.denoise_hidden(canvas, cache, None, rows=mx.arange(C), collect_kv=True)
    mx.eval(kv)
    prompt = mx.array([ids])

    def first_step(n: int, fused: bool):
        """A canvas' first step from an empty cache: encode the prompt, then n canvas rows; as two
        passes, or as one pass that encodes the prompt too (`prefix`)."""
        fresh = model.make_cache()
        if fused:
            return model.denoise_hidden(canvas[:, :n], fresh, prefix=prompt), fresh.state()
        model.encode(prompt, fresh)
        return model.denoise_hidden(canvas[:, :n], fresh), fresh.state()

    T, table = np.float32(0.6), []
    for n in rows:
        r = mx.arange(n)
        h = model.denoise_hidden(canvas[:, :n], cache)
        u = mx.array(rng.random((1, n), dtype=np.float32))
        table.append({
            "rows": n,
            "prompt_tokens": len(ids),
            "trunk_ms": round(_ms(lambda: model.denoise_hidden(canvas[:, :n], cache), reps, rounds), 3),
            "partial_trunk_ms": round(_ms(lambda: model.denoise_hidden(
                canvas[:, :n], cache, None, rows=r, canvas_kv=kv, collect_kv=True), reps, rounds), 3),
            "head_ms": round(_ms(lambda: head_statistics(model.logits(h), T, u), reps, rounds), 3),
            "prompt_then_trunk_ms": round(_ms(lambda: first_step(n, False), reps, rounds), 3),
            "prompt_with_trunk_ms": round(_ms(lambda: first_step(n, True), reps, rounds), 3),
        })
    return table


def fit(table: list[dict], key: str) -> tuple[float, float]:
    """Least-squares fixed + per_row * rows."""
    n = np.array([r["rows"] for r in table], dtype=np.float64)
    y = np.array([r[key] for r in table], dtype=np.float64)
    per_row, fixed = np.polyfit(n, y, 1)
    return float(fixed), float(per_row)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="sudoku")
    p.add_argument("--rows", default="4,8,16,32,64,full", help="row counts, comma-separated ('full' = the canvas)")
    p.add_argument("--reps", type=int, default=20)
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--out", default=None, help="result file stem (default: step_cost-<stamp>)")
    args = p.parse_args(argv)

    model, _ = load(args.model)
    C = model.config.canvas_length
    try:
        rows = sorted({C if x.strip() == "full" else int(x) for x in args.rows.split(",") if x.strip()})
    except ValueError:
        print(f"error: --rows {args.rows!r}: give whole numbers or 'full', e.g. 4,16,full", file=sys.stderr)
        return 2
    if not rows or rows[0] < 1 or rows[-1] > C or len(rows) < 2:
        print(f"error: --rows needs at least two counts between 1 and the canvas ({C})", file=sys.stderr)
        return 2
    table = measure(model, rows, args.reps, args.rounds)
    fits = {key: fit(table, key) for key in
            ("trunk_ms", "partial_trunk_ms", "head_ms", "prompt_then_trunk_ms", "prompt_with_trunk_ms")}

    RESULTS.mkdir(parents=True, exist_ok=True)
    stem = args.out or f"step_cost-{time.strftime('%Y%m%d-%H%M%S')}"
    doc = {"benchmark": "step_cost", "command": " ".join(["python -m benchmarks.step_cost", *(argv or sys.argv[1:])]),
           "model": args.model, "canvas_length": C, "machine": machine_record(shared=True), "rows": table,
           "fit_fixed_ms_per_row_ms": {k: [round(a, 3), round(b, 4)] for k, (a, b) in fits.items()}}
    write_text_atomic(RESULTS / f"{stem}.json", json.dumps(doc, indent=2) + "\n")
    lines = [f"# Cost of one denoising step by rows run ({args.model}, canvas {C}, batch 1)", "",
             f"Command: `{doc['command']}`. Median of {args.rounds} rounds of {args.reps} calls.", "",
             f"A canvas' first step also encodes the prompt ({table[0]['prompt_tokens']} tokens, from an empty cache): "
             "in a pass of its own before the trunk's, or in the trunk's pass (`prefix`).",
             "", "| rows | trunk ms | partial trunk ms (rest as cached K/V) | head + statistics ms | "
             "first step: prompt pass, then trunk ms | first step: one pass ms |", "|---|---|---|---|---|---|"]
    lines += [f"| {r['rows']} | {r['trunk_ms']} | {r['partial_trunk_ms']} | {r['head_ms']} | "
              f"{r['prompt_then_trunk_ms']} | {r['prompt_with_trunk_ms']} |" for r in table]
    lines += ["", "Least-squares fit, cost = fixed + per row x rows:", ""]
    for k, (a, b) in fits.items():
        share = a / (a + b * C)
        lines.append(f"- {k}: {a:.2f} ms fixed + {b:.4f} ms per row; at a full canvas the fixed part is {share:.0%}")
    m = doc["machine"]
    lines += ["", f"Machine: {m.get('cpu', '?')}; {m.get('shared_note') or ''}"]
    write_text_atomic(RESULTS / f"{stem}.md", "\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
