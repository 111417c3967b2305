"""Which Sudoku constraints does a model break? For every blank it fills wrongly: does its digit
clash with a given in the same row, column or box, against what a uniformly random wrong digit
would do (ratio 1: the constraint is ignored; 0: it is never broken).

    python -m benchmarks.sudoku_constraints [--model sudoku] [--puzzles 100]

Writes benchmarks/results/sudoku_constraints-<model>.md.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np

from benchmarks.sudoku_eval import HELD_OUT_SEED
from mlx_diffgemma import load, sudoku
from mlx_diffgemma.files import write_text_atomic
from mlx_diffgemma.loading import resolve


def clash_rates(puzzles: np.ndarray, solutions: np.ndarray, filled: np.ndarray) -> dict:
    """unit -> (model clash rate, random-wrong-digit clash rate, wrong blanks counted)."""
    seen = {u: [] for u in sudoku.UNIT_OF}
    chance = {u: [] for u in sudoku.UNIT_OF}
    for p, s, f in zip(puzzles, solutions, filled):
        for i in np.flatnonzero((p == 0) & (f != s)):
            for u, unit in sudoku.UNIT_OF.items():
                givens = set(p[(unit == unit[i]) & (p > 0)].tolist())
                seen[u].append(f[i] in givens)
                chance[u].append(np.mean([d in givens for d in range(1, 10) if d != s[i]]))

    def mean(x):
        return float(np.mean(x)) if x else float("nan")

    return {u: (mean(seen[u]), mean(chance[u]), len(seen[u])) for u in sudoku.UNIT_OF}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="sudoku")
    ap.add_argument("--puzzles", type=int, default=100)
    ap.add_argument("--givens", type=int, nargs=2, default=(30, 50), metavar=("LO", "HI"))
    ap.add_argument("--puzzle-seed", type=int, default=HELD_OUT_SEED)
    ap.add_argument("--out", default=None)
    args = ap.parse_args(argv)
    model, _ = load(resolve(args.model))
    puzzles, solutions = sudoku.puzzle_set(args.puzzle_seed, args.puzzles, tuple(args.givens))
    filled = np.concatenate([sudoku.solve_batch(model, puzzles[i:i + 50], seed=0) for i in range(0, len(puzzles), 50)])
    rates = clash_rates(puzzles, solutions, filled)
    n = next(iter(rates.values()))[2]
    lines = [f"# Constraints broken: {args.model}, {args.puzzles} held-out puzzles "
             f"({args.givens[0]}-{args.givens[1]} givens, seed {args.puzzle_seed}), reference sampler", "",
             f"{n} wrongly filled blanks. Clash: the wrong digit equals a given in the same unit.", "",
             "| unit | model clash rate | random wrong digit | ratio |", "|---|---|---|---|"]
    lines += [f"| {u} | {m:.3f} | {c:.3f} | {m / c:.2f} |" for u, (m, c, _) in rates.items()]
    lines += ["", f"Command: `python -m benchmarks.sudoku_constraints --model {args.model} --puzzles {args.puzzles}`"]
    name = args.out or f"sudoku_constraints-{Path(args.model).name}"
    out = Path(__file__).parent / "results" / f"{name}.md"
    write_text_atomic(out, "\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
