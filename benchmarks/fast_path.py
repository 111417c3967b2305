"""The fast path's quality gate and speed: the trained Sudoku model, reference sampler against each
fast mode, on the same held-out puzzles and seeds, one puzzle at a time (batch 1, as a chat is).

    python -m benchmarks.fast_path --model sudoku --puzzles 300

Writes benchmarks/results/fast_path-<stamp>.json and .md: solve rate (with its standard error and
the paired disagreement against the reference), denoising steps, trunk row-passes per committed
token and wall time per committed token, each mode against the reference measured in this run.
"""

from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path

import mlx.core as mx
import numpy as np

from benchmarks.machine import record as machine_record
from mlx_diffgemma import load
from mlx_diffgemma import sudoku
from mlx_diffgemma.fast import MODES, denoise_canvas_fast
from mlx_diffgemma.files import write_text_atomic
from mlx_diffgemma.generate import denoise_canvas
from mlx_diffgemma.sampler import NoiseSource

RESULTS = Path(__file__).parent / "results"


def solve_one(model, puzzle, seed: int, mode: str, gen):
    cache = model.make_cache()
    model.encode(mx.array([sudoku.prompt_ids(puzzle)]), cache)
    mx.eval(cache.state())
    noise = NoiseSource(seed, model.config.vocab_size)
    if mode == "reference":
        argmax, steps = denoise_canvas(model, cache, gen, noise, 0)
        rows = steps * model.config.canvas_length
    else:
        r = denoise_canvas_fast(model, cache, gen, noise, 0, MODES[mode])
        argmax, steps, rows = r.argmax, r.steps, r.row_passes
    return sudoku.canvas_digits(argmax)[0], steps, rows


def run(model_path: str, n: int, givens: tuple[int, int], seed: int, modes: list[str], puzzle_seed: int):
    model, _ = load(model_path)
    gen = model.generation_config.override(max_new_tokens=sudoku.CELLS)
    puzzles, solutions = sudoku.puzzle_set(puzzle_seed, n, givens)
    blanks = puzzles == 0
    per_mode = {}
    # warm-up, so the first mode does not pay for compilation and allocation
    for mode in modes:
        solve_one(model, puzzles[0], seed, mode, gen)
    # puzzle by puzzle, every mode in turn: a change in the machine's load during the run then
    # falls on all modes alike instead of on whichever mode was running
    runs = {mode: dict(solved=[], steps=[], rows=[], right=[], wall=0.0) for mode in modes}
    for i, p in enumerate(puzzles):
        for mode in modes:
            tic = time.perf_counter()
            digits, s, r = solve_one(model, p, seed + i, mode, gen)
            m = runs[mode]
            m["wall"] += time.perf_counter() - tic
            m["solved"].append(sudoku.is_solution(p, digits))
            m["right"].append((digits == solutions[i])[blanks[i]].mean())
            m["steps"].append(s)
            m["rows"].append(r)
    for mode, m in runs.items():
        per_mode[mode] = {k: (v if k == "wall" else np.array(v)) for k, v in m.items()}

    committed = n * sudoku.CELLS
    ref = per_mode["reference"]
    table = []
    for mode, m in per_mode.items():
        rate = m["solved"].mean()
        table.append({
            "mode": mode,
            "puzzles": n,
            "solve_rate": round(float(rate), 4),
            "solve_rate_stderr": round(math.sqrt(rate * (1 - rate) / n), 4),
            "disagree_with_reference": int((m["solved"] != ref["solved"]).sum()),
            # blank cells filled with the right digit: a finer quality signal than whole grids
            "blank_cell_accuracy": round(float(m["right"].mean()), 4),
            "blank_cell_accuracy_stderr": round(float(m["right"].std(ddof=1) / math.sqrt(n)), 4),
            # paired: the same puzzles and seeds, so the per-puzzle difference has its own noise
            "accuracy_minus_reference": round(float((m["right"] - ref["right"]).mean()), 4),
            "accuracy_minus_reference_stderr": round(float((m["right"] - ref["right"]).std(ddof=1) / math.sqrt(n)), 4),
            "mean_steps": round(float(m["steps"].mean()), 2),
            "row_passes_per_token": round(float(m["rows"].sum() / committed), 3),
            "ms_per_token": round(1e3 * m["wall"] / committed, 4),
            "row_pass_reduction": round(float(ref["rows"].sum() / m["rows"].sum()), 2),
            "wall_time_reduction": round(ref["wall"] / m["wall"], 2),
            "by_givens": {
                int(g): round(float(m["solved"][np.array([np.count_nonzero(p) for p in puzzles]) == g].mean()), 3)
                for g in sorted({int(np.count_nonzero(p)) for p in puzzles})
            },
        })
    return table


def write(table, args) -> Path:
    RESULTS.mkdir(parents=True, exist_ok=True)
    stamp = time.strftime("%Y%m%d-%H%M%S")
    out = RESULTS / f"fast_path-{stamp}.json"
    doc = {"benchmark": "fast_path", "model": args.model, "givens": args.givens, "seed": args.seed,
           "puzzle_seed": args.puzzle_seed, "machine": machine_record(shared=True), "rows": table}
    write_text_atomic(out, json.dumps(doc, indent=2))
    lines = [
        f"# Fast path on the Sudoku model ({table[0]['puzzles']} puzzles, givens {args.givens[0]}-{args.givens[1]})",
        "",
        "| mode | solved | ± | cells right | ± | minus ref. (paired) | steps | row-passes/token | ms/token | row-passes ÷ | wall time ÷ |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in table:
        lines.append(
            f"| {r['mode']} | {r['solve_rate']:.3f} | {r['solve_rate_stderr']:.3f} | {r['blank_cell_accuracy']:.3f} | "
            f"{r['blank_cell_accuracy_stderr']:.3f} | {r['accuracy_minus_reference']:+.3f} ± {r['accuracy_minus_reference_stderr']:.3f} | "
            f"{r['mean_steps']} | {r['row_passes_per_token']} | {r['ms_per_token']} | {r['row_pass_reduction']}x | "
            f"{r['wall_time_reduction']}x |"
        )
    lines += ["", f"Machine: {doc['machine'].get('cpu', '?')}; {doc['machine'].get('shared_note') or ''}"]
    write_text_atomic(out.with_suffix(".md"), "\n".join(lines) + "\n")
    return out


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="sudoku")
    p.add_argument("--puzzles", type=int, default=300)
    p.add_argument("--givens", type=int, nargs=2, default=(30, 45))
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--puzzle-seed", type=int, default=20261127)
    p.add_argument("--modes", default=",".join(MODES))
    args = p.parse_args(argv)
    modes = [m for m in args.modes.split(",") if m]
    if "reference" not in modes:
        modes.insert(0, "reference")
    table = run(args.model, args.puzzles, tuple(args.givens), args.seed, modes, args.puzzle_seed)
    out = write(table, args)
    print(out.with_suffix(".md").read_text())
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
