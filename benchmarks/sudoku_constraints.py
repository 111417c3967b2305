"""Which Sudoku constraints does a model break? For every blank it fills wrongly: does its digit
clash with a given in the same row, column or box, against what a uniformly random wrong digit
would do (ratio 1: the constraint is ignored; 0: it is never broken).

    python -m benchmarks.sudoku_constraints [--model sudoku [other ...]] [--puzzles 100]

Two readings per model: the grids the reference sampler fills, and the argmax of the first
denoising pass over an all-noise canvas (no self-conditioning, the sampler's first step), which
shows what the network has learned without the sampler's search (seconds a model, where the
sampler takes a minute or more: `--first-pass-only` skips the sampler's reading). Writes
benchmarks/results/sudoku_constraints-<model>.md (or `--out`), a row per model.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np

from benchmarks.sudoku_eval import HELD_OUT_SEED
from mlx_diffgemma import load, sudoku
from mlx_diffgemma.files import write_text_atomic
from mlx_diffgemma.loading import resolve

UNITS = list(sudoku.UNIT_OF)


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


def first_pass(model, puzzles: np.ndarray, seed: int = 0, batch: int = 50) -> np.ndarray:
    """[N, 81] digits: the argmax of one denoising pass over a canvas of uniform noise."""
    import mlx.core as mx

    rng = np.random.default_rng(seed)
    out = []
    for i in range(0, len(puzzles), batch):
        prompt = sudoku.prompt_batch(puzzles[i : i + batch])
        canvas = rng.integers(0, model.config.vocab_size, size=(len(prompt), sudoku.CELLS)).astype(np.int32)
        cache = model.make_cache()
        model.encode(mx.array(prompt), cache)
        out.append(sudoku.canvas_digits(np.array(model.denoise(mx.array(canvas), cache).argmax(-1))))
    return np.concatenate(out)


def ratios(rates: dict) -> str:
    return " | ".join(f"{m / c:.2f}" for m, c, _ in rates.values())


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", nargs="+", default=["sudoku"])
    ap.add_argument("--puzzles", type=int, default=100)
    ap.add_argument("--givens", type=int, nargs=2, default=(30, 50), metavar=("LO", "HI"))
    ap.add_argument("--puzzle-seed", type=int, default=HELD_OUT_SEED)
    ap.add_argument("--first-pass-only", action="store_true", help="skip the sampler's reading")
    ap.add_argument("--out", default=None)
    args = ap.parse_args(argv)
    puzzles, solutions = sudoku.puzzle_set(args.puzzle_seed, args.puzzles, tuple(args.givens))
    blank = puzzles == 0
    lines = [f"# Constraints broken: {args.puzzles} puzzles ({args.givens[0]}-{args.givens[1]} givens, "
             f"seed {args.puzzle_seed})", "",
             "Clash: a wrongly filled blank's digit equals a given in the same unit; ratio: the model's clash "
             "rate over a uniformly random wrong digit's (0: never broken, 1: ignored). Sampler: the grids "
             "the reference sampler fills. First pass: the argmax of one pass over an all-noise canvas.", "",
             "| model | sampler: wrong blanks | " + " | ".join(UNITS) + " | first pass: blanks right | "
             + " | ".join(UNITS) + " |", "|---" * (3 + 2 * len(UNITS)) + "|"]
    for name in args.model:
        model, _ = load(resolve(name))
        if args.first_pass_only:
            sampled = "— | " + " | ".join("—" for _ in UNITS)
        else:
            filled = np.concatenate([sudoku.solve_batch(model, puzzles[i : i + 50], seed=0)
                                     for i in range(0, len(puzzles), 50)])
            rates = clash_rates(puzzles, solutions, filled)
            sampled = f"{next(iter(rates.values()))[2]} | {ratios(rates)}"
        guessed = first_pass(model, puzzles)
        right = float((guessed == solutions)[blank].mean())
        lines.append(f"| {name} | {sampled} | {right:.3f} | "
                     f"{ratios(clash_rates(puzzles, solutions, guessed))} |")
        print(lines[-1], flush=True)
    lines += ["", f"Command: `python -m benchmarks.sudoku_constraints --model {' '.join(args.model)} "
              f"--puzzles {args.puzzles} --givens {args.givens[0]} {args.givens[1]} --puzzle-seed {args.puzzle_seed}"
              + " --first-pass-only" * args.first_pass_only + (f" --out {args.out}" if args.out else "") + "`"]
    name = args.out or f"sudoku_constraints-{Path(args.model[0]).name}"
    write_text_atomic(Path(__file__).parent / "results" / f"{name}.md", "\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
