"""Tune the Sudoku model's sampler settings (its generation_config) on a tuning set, never on the
held-out one: reference sampler, the same puzzles and seeds for every setting, so the differences
are paired.

    python -m benchmarks.sudoku_sweep --model sudoku "t_max=1.0,t_min=0.6" "entropy_bound=0.5"

The model's own settings always run first, as the baseline. Writes
benchmarks/results/sudoku_sweep-<stamp>.json and .md.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

import numpy as np

from benchmarks.sudoku_eval import HELD_OUT_SEED

RESULTS = Path(__file__).parent / "results"
KNOBS = {"t_max": float, "t_min": float, "entropy_bound": float, "max_denoising_steps": int,
         "stability_threshold": int, "confidence_threshold": float}


def parse_setting(text: str) -> dict:
    """'t_max=1.0,t_min=0.6' -> {'t_max': 1.0, 't_min': 0.6}."""
    out = {}
    for part in filter(None, (p.strip() for p in text.split(","))):
        key, sep, value = part.partition("=")
        if not sep or key not in KNOBS:
            raise ValueError(f"setting {text!r}: {part!r} is not KNOB=VALUE with KNOB one of {', '.join(KNOBS)}")
        try:
            out[key] = KNOBS[key](value)
        except ValueError:
            raise ValueError(f"setting {text!r}: {key} needs a {KNOBS[key].__name__}, got {value!r}") from None
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("settings", nargs="*", help="KNOB=VALUE[,KNOB=VALUE...], one sampler setting each")
    p.add_argument("--model", default="sudoku")
    p.add_argument("--puzzles", type=int, default=200)
    p.add_argument("--givens", type=int, nargs=2, default=(30, 50), metavar=("LO", "HI"))
    p.add_argument("--puzzle-seed", type=int, default=777, help="the tuning set (not the held-out seed)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--batch", type=int, default=50)
    p.add_argument("--out", default=None)
    args = p.parse_args(argv)

    from benchmarks.machine import record as machine_record
    from benchmarks.sudoku_eval import mean_stderr, per_puzzle, solve_diffusion
    from mlx_diffgemma import load, sudoku
    from mlx_diffgemma.files import write_text_atomic

    if args.puzzle_seed == HELD_OUT_SEED:
        print(f"error: --puzzle-seed {HELD_OUT_SEED} is the held-out set; tune on another seed (default 777)",
              file=sys.stderr)
        return 2
    try:
        settings = [{}] + [parse_setting(s) for s in args.settings]
        model, _ = load(args.model)
        for s in settings:
            model.generation_config.override(**s)  # checks the combination (t_min < t_max, ...)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    puzzles, solutions = sudoku.puzzle_set(args.puzzle_seed, args.puzzles, tuple(args.givens))
    n, rows, base = len(puzzles), [], None
    for s in settings:
        tic = time.perf_counter()
        grids, _ = solve_diffusion(model, puzzles, args.seed, args.batch, **s)
        wall = time.perf_counter() - tic
        solved, right = per_puzzle(puzzles, solutions, grids)
        solved = solved.astype(np.float64)
        if base is None:
            base = solved
        diff = mean_stderr(solved - base)
        rows.append({
            "setting": s or "model default", "wall_s": round(wall, 1),
            "solve_rate": round(float(solved.mean()), 4),
            "solve_rate_stderr": round(math.sqrt(solved.mean() * (1 - solved.mean()) / n), 4),
            "solved_minus_default": diff["mean"],
            "solved_minus_default_stderr": diff["stderr"],
            "blank_cells_right": round(float(right.mean()), 4),
        })
        print(json.dumps(rows[-1]), file=sys.stderr, flush=True)

    RESULTS.mkdir(parents=True, exist_ok=True)
    stem = args.out or f"sudoku_sweep-{time.strftime('%Y%m%d-%H%M%S')}"
    cmd = " ".join(["python -m benchmarks.sudoku_sweep", *(argv if argv is not None else sys.argv[1:])])
    doc = {"benchmark": "sudoku_sweep", "command": cmd, "model": args.model, "puzzle_seed": args.puzzle_seed,
           "givens": list(args.givens), "seed": args.seed, "defaults": model.generation_config.__dict__,
           "machine": machine_record(shared=True), "rows": rows}
    write_text_atomic(RESULTS / f"{stem}.json", json.dumps(doc, indent=2, default=str) + "\n")
    lines = [f"# Sampler settings on the tuning set ({n} puzzles, givens {args.givens[0]}-{args.givens[1]}, "
             f"puzzle seed {args.puzzle_seed})", "", f"Command: `{cmd}`", "",
             "| setting | solved | ± | minus default (paired) | blank cells right | wall s |", "|---|---|---|---|---|---|"]
    for r in rows:
        name = r["setting"] if isinstance(r["setting"], str) else ", ".join(f"{k}={v}" for k, v in r["setting"].items())
        lines.append(f"| {name} | {r['solve_rate']:.3f} | {r['solve_rate_stderr']:.3f} | "
                     f"{r['solved_minus_default']:+.3f} ± {r['solved_minus_default_stderr']:.3f} | "
                     f"{r['blank_cells_right']:.3f} | {r['wall_s']} |")
    write_text_atomic(RESULTS / f"{stem}.md", "\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
