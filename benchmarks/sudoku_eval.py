"""Sudoku solve rate: the diffusion model (reference sampler) against its autoregressive baseline.

    python -m benchmarks.sudoku_eval --diffusion sudoku --autoregressive runs/sudoku-autoregressive/checkpoints/step-N

Held-out puzzles come from `sudoku.puzzle_set(puzzle_seed, n, givens)` (unique solutions, a seed
the training data never uses). A puzzle counts as solved when every row, column and box is valid
and every given is kept. Writes benchmarks/results/sudoku_eval-<stamp>.json and .md with the solve
rate overall, on puzzles with >= 30 givens, and by number of givens (buckets of 5).

`--tries K` adds a column: each puzzle denoised K times with different noise
(`sudoku.solve_tries`), solved when any try passes the rule check. Try 1 draws the reference
column's noise (the report prints both counts, which match unless batch size changes the
arithmetic), so this column can only be higher. It measures search with a checker, not the
model's one-shot solve rate.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

import numpy as np

RESULTS = Path(__file__).parent / "results"
HELD_OUT_SEED = 20261127  # the held-out puzzles (and fast_path's sort lists); sudoku_sweep refuses to tune on them
BUCKETS = [(17, 24), (25, 29), (30, 34), (35, 39), (40, 44), (45, 81)]


def solve_diffusion(model, puzzles, seed, batch, tries=1, **overrides):
    """(digits [N, 81], the try that solved each puzzle [N], -1 for none); batch i uses seed + i."""
    from mlx_diffgemma import sudoku

    grids, which = [], []
    for i in range(0, len(puzzles), batch):
        g, w = sudoku.solve_tries(model, puzzles[i : i + batch], tries, seed=seed + i, **overrides)
        grids.append(g)
        which.append(w)
    return np.concatenate(grids), np.concatenate(which)


def solve_autoregressive(model, puzzles, batch):
    from mlx_diffgemma import sudoku
    from mlx_diffgemma.train import generate_autoregressive

    out = []
    for i in range(0, len(puzzles), batch):
        ids = generate_autoregressive(model, sudoku.prompt_batch(puzzles[i : i + batch]), sudoku.CELLS)
        out.append(sudoku.canvas_digits(ids))
    return np.concatenate(out)


def per_puzzle(puzzles, solutions, grids) -> tuple[np.ndarray, np.ndarray]:
    """(solved [N] bool, share of blank cells filled right [N]); `solutions` are the generator's
    (each puzzle has exactly one)."""
    from mlx_diffgemma import sudoku

    solved = np.array([sudoku.is_solution(p, g) for p, g in zip(puzzles, grids)])
    blank = puzzles == 0
    right = np.array([(g[b] == t[b]).mean() if b.any() else 1.0 for g, t, b in zip(grids, solutions, blank)])
    return solved, right


def mean_stderr(d: np.ndarray) -> dict:
    """Mean of per-puzzle values (or paired differences) and its standard error."""
    return {"mean": round(float(d.mean()), 4), "stderr": round(float(d.std(ddof=1) / math.sqrt(len(d))), 4)}


def summarize(puzzles, solutions, grids, wall) -> dict:
    solved, cells_right = per_puzzle(puzzles, solutions, grids)
    givens = (puzzles > 0).sum(axis=1)

    def rate(mask):
        n = int(mask.sum())
        r = float(solved[mask].mean()) if n else float("nan")
        return {"puzzles": n, "solved": int(solved[mask].sum()), "solve_rate": round(r, 4),
                "stderr": round(math.sqrt(r * (1 - r) / n), 4) if n else None}

    return {
        "overall": rate(np.ones_like(solved)),
        "givens_ge_30": rate(givens >= 30),
        "by_givens": {f"{lo}-{hi}": rate((givens >= lo) & (givens <= hi)) for lo, hi in BUCKETS},
        "blank_cells_right": round(float(np.mean(cells_right)), 4),
        "seconds": round(wall, 1),
    }


def paired(puzzles, solutions, grids, other) -> dict:
    """`grids` minus `other` on the same puzzles and noise, puzzle by puzzle, with standard errors:
    solved at >= 30 givens and blank cells right."""
    ge30 = (puzzles > 0).sum(axis=1) >= 30
    (s1, c1), (s2, c2) = per_puzzle(puzzles, solutions, grids), per_puzzle(puzzles, solutions, other)
    return {"solved_ge_30": mean_stderr(s1[ge30].astype(float) - s2[ge30]), "blank_cells_right": mean_stderr(c1 - c2),
            "only_first_solved": int((s1 & ~s2)[ge30].sum()), "only_second_solved": int((s2 & ~s1)[ge30].sum())}


def _kind(args) -> str:
    # the held-out set is the default seed's; any other seed (777 is the tuning set) is not held out
    return "held-out" if args.puzzle_seed == HELD_OUT_SEED else "tuning"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--diffusion", default="sudoku", help="diffusion checkpoint (default: the bundled model)")
    p.add_argument("--autoregressive", default=None, help="autoregressive baseline checkpoint (optional)")
    p.add_argument("--puzzles", type=int, default=500)
    p.add_argument("--givens", type=int, nargs=2, default=(25, 50), metavar=("LO", "HI"))
    p.add_argument("--puzzle-seed", type=int, default=HELD_OUT_SEED)
    p.add_argument("--seed", type=int, default=0, help="sampler seed (puzzle i of a batch uses the batch's seed)")
    p.add_argument("--batch", type=int, default=50)
    p.add_argument("--steps", type=int, default=None, help="override max_denoising_steps")
    p.add_argument("--entropy-bound", type=float, default=None, help="override entropy_bound")
    p.add_argument("--t-max", type=float, default=None, help="override t_max (the first step's temperature)")
    p.add_argument("--t-min", type=float, default=None, help="override t_min")
    p.add_argument("--compare-to", default=None, help="another diffusion checkpoint: the same puzzles and noise "
                   "through the reference sampler, and the paired difference (--diffusion minus this one)")
    p.add_argument("--compare-defaults", action="store_true", help="with --compare-to, run the compared "
                   "checkpoint at its own generation_config instead of the overrides above (a paired test of a "
                   "sampler setting: --diffusion M --entropy-bound X --compare-to M --compare-defaults)")
    p.add_argument("--tries", type=int, default=1, help="also report solved within this many tries "
                   "(first valid grid of K noise draws, as `examples/sudoku.py --tries`)")
    p.add_argument("--modes", default="", help="also solve with these fast modes, comma-separated "
                   "(mlx_diffgemma.fast.MODES, knobs allowed: compact+refresh_every=8; one puzzle at a time, "
                   "puzzle i with seed + i)")
    p.add_argument("--out", default=None, help="result file stem (default: sudoku_eval-<stamp>)")
    args = p.parse_args(argv)

    from benchmarks.fast_path import run_one
    from benchmarks.machine import record as machine_record
    from mlx_diffgemma import sudoku
    from mlx_diffgemma.fast import get_mode
    from mlx_diffgemma.files import write_text_atomic
    from mlx_diffgemma.loading import LoadError, load

    if args.tries < 1:
        print("error: --tries must be >= 1", file=sys.stderr)
        return 2
    if args.compare_defaults and not args.compare_to:
        print("error: --compare-defaults needs --compare-to (the checkpoint to run at its own settings)", file=sys.stderr)
        return 2
    if args.puzzles < 1 or not 17 <= args.givens[0] <= args.givens[1] <= 81:
        print("error: need --puzzles >= 1 and 17 <= LO <= HI <= 81 for --givens", file=sys.stderr)
        return 2
    modes = [m for m in args.modes.split(",") if m and m != "reference"]
    try:
        for m in modes:
            get_mode(m)
    except ValueError as e:
        print(f"error: --modes: {e}", file=sys.stderr)
        return 2
    tic = time.perf_counter()
    puzzles, solutions = sudoku.puzzle_set(args.puzzle_seed, args.puzzles, tuple(args.givens))
    print(f"{len(puzzles)} {_kind(args)} puzzles in {time.perf_counter() - tic:.1f}s", file=sys.stderr)

    overrides = {k: v for k, v in (("max_denoising_steps", args.steps), ("entropy_bound", args.entropy_bound),
                                   ("t_max", args.t_max), ("t_min", args.t_min)) if v is not None}
    systems = {}
    try:
        model, _ = load(args.diffusion)
        gen = model.generation_config.override(**overrides)
    except (LoadError, ValueError) as e:  # a bad checkpoint, or a bad sampler override
        print(f"error: {e}", file=sys.stderr)
        return 2
    try:
        tic = time.perf_counter()
        grids, _ = solve_diffusion(model, puzzles, args.seed, args.batch, **overrides)
        systems["diffusion"] = {"model": args.diffusion, "sampler": "reference",
                                "max_denoising_steps": gen.max_denoising_steps, "entropy_bound": gen.entropy_bound,
                                "t_max": gen.t_max, "t_min": gen.t_min,
                                **summarize(puzzles, solutions, grids, time.perf_counter() - tic)}
        if args.compare_to:
            other_model, _ = load(args.compare_to)
            other_overrides = {} if args.compare_defaults else overrides
            other_gen = other_model.generation_config.override(**other_overrides)
            tic = time.perf_counter()
            other = solve_diffusion(other_model, puzzles, args.seed, args.batch, **other_overrides)[0]
            systems["compared"] = {"model": args.compare_to, "sampler": "reference, the same noise",
                                   "max_denoising_steps": other_gen.max_denoising_steps,
                                   "entropy_bound": other_gen.entropy_bound, "t_max": other_gen.t_max,
                                   "t_min": other_gen.t_min,
                                   "paired_minus_this": paired(puzzles, solutions, grids, other),
                                   **summarize(puzzles, solutions, other, time.perf_counter() - tic)}
        if args.tries > 1:
            tic = time.perf_counter()
            grids, which = solve_diffusion(model, puzzles, args.seed, args.batch, args.tries, **overrides)
            first = systems["diffusion"]["overall"]["solved"]
            systems[f"diffusion, {args.tries} tries"] = {
                "model": args.diffusion, "sampler": f"reference, first of {args.tries} tries to pass the rule check",
                "solved_on_try_1": int((which == 0).sum()), "reference_solved": first,
                **summarize(puzzles, solutions, grids, time.perf_counter() - tic)}
        gen_fast = gen.override(max_new_tokens=sudoku.CELLS)
        for mode in modes:
            tic = time.perf_counter()
            grids = np.stack([sudoku.canvas_digits(run_one(model, sudoku.prompt_ids(p), args.seed + i, mode, gen_fast)[0])
                              for i, p in enumerate(puzzles)])
            systems[f"diffusion {mode}"] = {"model": args.diffusion, "sampler": f"fast mode {mode}, one puzzle at a time",
                                            **summarize(puzzles, solutions, grids, time.perf_counter() - tic)}
        if args.autoregressive:
            model, _ = load(args.autoregressive)
            tic = time.perf_counter()
            grids = solve_autoregressive(model, puzzles, args.batch)
            systems["autoregressive"] = {"model": args.autoregressive, "sampler": "greedy, left to right",
                                         **summarize(puzzles, solutions, grids, time.perf_counter() - tic)}
    except LoadError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2

    RESULTS.mkdir(parents=True, exist_ok=True)
    stem = args.out or f"sudoku_eval-{time.strftime('%Y%m%d-%H%M%S')}"
    doc = {"benchmark": "sudoku_eval", "command": " ".join(["python -m benchmarks.sudoku_eval", *sys.argv[1:]]),
           "puzzle_seed": args.puzzle_seed, "givens": list(args.givens), "seed": args.seed,
           "machine": machine_record(shared=True), "systems": systems}
    out = RESULTS / f"{stem}.json"
    write_text_atomic(out, json.dumps(doc, indent=2) + "\n")

    names = list(systems)
    lines = [f"# Sudoku solve rate ({len(puzzles)} {_kind(args)} puzzles, givens {args.givens[0]}-{args.givens[1]}, "
             f"puzzle seed {args.puzzle_seed})", "",
             "| givens | puzzles | " + " | ".join(f"{n} solved" for n in names) + " |",
             "|---|---|" + "---|" * len(names)]

    def cell(r):
        return "—" if not r["puzzles"] else f"{r['solve_rate']:.3f} ± {r['stderr']:.3f}"

    for key, label in [("overall", "all"), ("givens_ge_30", ">= 30")]:
        lines.append(f"| {label} | {systems[names[0]][key]['puzzles']} | "
                     + " | ".join(cell(systems[n][key]) for n in names) + " |")
    for b in systems[names[0]]["by_givens"]:
        lines.append(f"| {b} | {systems[names[0]]['by_givens'][b]['puzzles']} | "
                     + " | ".join(cell(systems[n]["by_givens"][b]) for n in names) + " |")
    lines += ["", "| system | model | sampler | blank cells right | seconds |", "|---|---|---|---|---|"]
    for n in names:
        s = systems[n]
        sampler = s["sampler"] + (f" ({s['max_denoising_steps']} steps, entropy bound {s['entropy_bound']}, "
                                  f"t {s['t_max']} to {s['t_min']})" if n in ("diffusion", "compared") else "")
        lines.append(f"| {n} | {s['model']} | {sampler} | {s['blank_cells_right']:.3f} | {s['seconds']} |")
    if "compared" in systems:
        d = systems["compared"]["paired_minus_this"]
        lines += ["", f"Paired, `diffusion` minus `compared` (same puzzles, same noise): solved at >= 30 givens "
                  f"{d['solved_ge_30']['mean']:+.3f} ± {d['solved_ge_30']['stderr']:.3f} "
                  f"({d['only_first_solved']} puzzles only `diffusion` solved, {d['only_second_solved']} only "
                  f"`compared`); blank cells right {d['blank_cells_right']['mean']:+.4f} ± "
                  f"{d['blank_cells_right']['stderr']:.4f}."]
    for n in names:
        if "solved_on_try_1" in systems[n]:
            s = systems[n]
            lines += ["", f"`{n}`: try 1 alone solved {s['solved_on_try_1']} puzzles, the reference column "
                      f"{s['reference_solved']} (the same noise; they differ only if batch size changes the arithmetic)."]
    m = doc["machine"]
    lines += ["", f"Command: `{doc['command']}`", f"Machine: {m.get('cpu')}, {m.get('cpu_count')} cores. "
              f"{m.get('shared_note') or ''}"]
    write_text_atomic(out.with_suffix(".md"), "\n".join(lines) + "\n")
    print("\n".join(lines))
    print(f"wrote {out}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
