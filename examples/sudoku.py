"""Solve a Sudoku with the bundled diffusion model: the whole grid is denoised at once.

    python examples/sudoku.py "53..7....6..195....98....6.8...6...34..8.3..17...2...6.6....28....419..5....8..79"

Prints the solved grid and, on the last line, its 81 digits. `--show-canvas` redraws the grid after
every denoising step (the canvas resolving live); `--model` takes another Sudoku checkpoint.
`--tries N` denoises N canvases with different noise in one batch and keeps the first that passes
the rule check. The bundled model alone solves 86.9% of held-out puzzles with 30 or more givens
in one try, and 89.8% within 4 (docs/sudoku.md).
"""

from __future__ import annotations

import argparse
import sys
import time


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description="Solve a Sudoku with a DiffusionGemma-architecture model.")
    parser.add_argument("puzzle", help="81 characters, digits 1-9 and '.' or '0' for blanks (row by row)")
    parser.add_argument("--model", default="sudoku", help="model directory or bundled name (default: sudoku)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the sampler's noise (default 0)")
    parser.add_argument("--steps", type=int, default=None, help="max denoising steps (checkpoint default)")
    parser.add_argument("--tries", type=int, default=1,
                        help="denoise this many canvases in one batch, keep the first valid grid (default 1)")
    parser.add_argument("--show-canvas", action="store_true", help="redraw the grid after every denoising step")
    parser.add_argument("--strict", action="store_true", help="exit with status 1 when the grid is not a solution")
    args = parser.parse_args(argv)

    from mlx_diffgemma import sudoku
    from mlx_diffgemma.loading import LoadError, load

    try:
        puzzle = sudoku.parse_grid(args.puzzle)
    except sudoku.SudokuError as e:
        print(f"error: puzzle: {e}", file=sys.stderr)
        return 2
    if args.steps is not None and args.steps < 1:
        print("error: --steps must be >= 1", file=sys.stderr)
        return 2
    if args.tries < 1:
        print("error: --tries must be >= 1", file=sys.stderr)
        return 2
    try:
        model, _ = load(args.model)
    except LoadError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2

    live = args.show_canvas and sys.stdout.isatty()

    def show(step, digits):
        grid = digits[0]  # try 0
        if live:
            print("\x1b[H\x1b[J", end="")
        filled = int((grid > 0).sum())
        which = f" (try 1 of {args.tries})" if args.tries > 1 else ""
        print(f"step {step + 1}{which}: {filled}/81 cells hold a digit\n{sudoku.pretty(grid)}\n", flush=True)
        if live:
            time.sleep(0.05)

    overrides = {} if args.steps is None else {"max_denoising_steps": args.steps}
    try:
        grids, which = sudoku.solve_tries(model, puzzle, args.tries, seed=args.seed,
                                          on_step=show if args.show_canvas else None, **overrides)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    solution, ok = grids[0], which[0] >= 0
    print(sudoku.pretty(solution))
    if ok:
        where = f" (try {which[0] + 1} of {args.tries})" if args.tries > 1 else ""
        print(f"solved{where}: every row, column and box is valid and every given is kept")
    else:
        tried = f" in {args.tries} tries; try 1" if args.tries > 1 else ""
        print(f"not solved{tried}: {sudoku.diagnose(puzzle, solution)}")
    print(sudoku.grid_string(solution).replace(".", "0"))
    return 1 if args.strict and not ok else 0


if __name__ == "__main__":
    sys.exit(main())
