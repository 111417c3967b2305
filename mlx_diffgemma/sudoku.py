"""Sudoku for a diffusion model: puzzles, the prompt and canvas formats, the checker and the solver.

A puzzle is 81 ints (row-major, 0 = blank), a solution 81 ints 1..9. The model sees the puzzle as a
prompt `<bos>` + 81 cell tokens (digits, '.' for a blank), encoded causally like a chat prompt, and
denoises an 81-token canvas that holds the solution's digits: canvas cell i sits exactly 81
positions after prompt cell i.

The generator is seeded: `solved_grid(rng)` fills a grid by randomised backtracking, and
`make_puzzle(rng, givens)` removes cells one at a time while the solution stays unique;
`dig_ranks` digs to a minimal puzzle and `keep_givens` takes unique puzzles of any size from it
(the training data, `unique: true` in a config's `data:`).
"""

from __future__ import annotations

import multiprocessing
import os
import sys

import numpy as np

# The bundled tokenizer: Gemma's special ids at the bottom, then the grid alphabet.
PAD, EOS, BOS, UNK = 0, 1, 2, 3
SPECIAL_TOKENS = ["<pad>", "<eos>", "<bos>", "<unk>"]
DIGIT0 = 4  # token of digit d is DIGIT0 + d ("0".."9")
DOT = 14
NEWLINE = 15
VOCAB = SPECIAL_TOKENS + [str(d) for d in range(10)] + [".", "\n"]
CELLS = 81

_ROW = np.arange(CELLS) // 9
_COL = np.arange(CELLS) % 9
_BOX = (_ROW // 3) * 3 + _COL // 3
UNIT_OF = {"row": _ROW, "column": _COL, "box": _BOX}  # cell -> index of its row, column, box
# the 20 peers of each cell (same row, column or box, itself excluded)
PEERS = [
    [j for j in range(CELLS) if j != i and (_ROW[i] == _ROW[j] or _COL[i] == _COL[j] or _BOX[i] == _BOX[j])]
    for i in range(CELLS)
]
UNITS = [np.flatnonzero(_ROW == k) for k in range(9)] + [np.flatnonzero(_COL == k) for k in range(9)] + [
    np.flatnonzero(_BOX == k) for k in range(9)
]


class SudokuError(ValueError):
    """A grid string cannot be read; the message says what is wrong."""


# -- formats -----------------------------------------------------------------------------------


def parse_grid(text: str) -> np.ndarray:
    """81 characters, digits 1-9 and '.' or '0' for blanks (whitespace ignored) -> int [81]."""
    chars = [c for c in text if not c.isspace()]
    if len(chars) != CELLS:
        raise SudokuError(f"a grid needs 81 cells, got {len(chars)} (use digits 1-9 and '.' or '0' for blanks)")
    bad = sorted({c for c in chars if c not in "0123456789."})
    if bad:
        raise SudokuError(f"unexpected character(s) {''.join(bad)!r}: use digits 1-9 and '.' or '0' for blanks")
    grid = np.array([0 if c == "." else int(c) for c in chars], dtype=np.int64)
    clash = first_conflict(grid)
    if clash is not None:
        raise SudokuError(f"the givens clash: {clash}")
    return grid


def grid_string(grid) -> str:
    """81 characters, '.' for blanks."""
    return "".join("." if int(v) == 0 else str(int(v)) for v in np.asarray(grid).reshape(-1))


def pretty(grid) -> str:
    """A 9-line grid with box separators ('.' for blanks)."""
    s = grid_string(grid)
    lines = []
    for r in range(9):
        if r and r % 3 == 0:
            lines.append("------+-------+------")
        row = s[9 * r : 9 * r + 9]
        lines.append(" | ".join(" ".join(row[c : c + 3]) for c in (0, 3, 6)))
    return "\n".join(lines)


def prompt_ids(puzzle) -> list[int]:
    """<bos> + one token per cell: digit tokens for givens, '.' for blanks."""
    p = np.asarray(puzzle).reshape(-1)
    return [BOS] + [DOT if v == 0 else DIGIT0 + int(v) for v in p]


def prompt_batch(puzzles: np.ndarray) -> np.ndarray:
    """[B, 81] puzzles -> [B, 82] prompt ids."""
    puzzles = np.asarray(puzzles)
    cells = np.where(puzzles == 0, DOT, DIGIT0 + puzzles)
    return np.concatenate([np.full((len(puzzles), 1), BOS), cells], axis=1).astype(np.int32)


def canvas_ids(solution) -> np.ndarray:
    """Solution digits [.., 81] -> canvas token ids."""
    return (DIGIT0 + np.asarray(solution)).astype(np.int32)


def canvas_digits(tokens) -> np.ndarray:
    """Canvas token ids -> digits; anything that is not a digit 1-9 becomes 0 (unsolved)."""
    d = np.asarray(tokens).astype(np.int64) - DIGIT0
    return np.where((d >= 1) & (d <= 9), d, 0)


# -- checking ----------------------------------------------------------------------------------


def first_conflict(grid) -> str | None:
    """The first repeated digit in a row, column or box of a (partial) grid, or None."""
    g = np.asarray(grid).reshape(-1)
    names = ["row"] * 9 + ["column"] * 9 + ["box"] * 9
    for k, unit in enumerate(UNITS):
        vals = g[unit][g[unit] > 0]
        if len(vals) != len(set(vals.tolist())):
            dup = next(v for v in vals if (vals == v).sum() > 1)
            return f"digit {dup} twice in {names[k]} {k % 9 + 1}"
    return None


def is_solution(puzzle, grid) -> bool:
    """Every row, column and box holds 1..9 once, and every given is kept."""
    p, g = np.asarray(puzzle).reshape(-1), np.asarray(grid).reshape(-1)
    if g.shape != (CELLS,) or not ((g >= 1) & (g <= 9)).all():
        return False
    if not ((p == 0) | (p == g)).all():
        return False
    full = np.arange(1, 10)
    return all((np.sort(g[u]) == full).all() for u in UNITS)


def diagnose(puzzle, grid) -> str:
    """Why `grid` does not solve `puzzle` ('' when it does)."""
    p, g = np.asarray(puzzle).reshape(-1), np.asarray(grid).reshape(-1)
    if (g == 0).any():
        return f"{int((g == 0).sum())} cell(s) hold no digit"
    changed = np.flatnonzero((p != 0) & (p != g))
    if len(changed):
        return f"{len(changed)} given(s) changed, first at row {changed[0] // 9 + 1}, column {changed[0] % 9 + 1}"
    return first_conflict(g) or ""


# -- generating --------------------------------------------------------------------------------

_ALL = 0x3FE  # bits 1..9


def _candidates(grid: list[int]) -> list[int]:
    rows, cols, boxes = [0] * 9, [0] * 9, [0] * 9
    for i, v in enumerate(grid):
        if v:
            b = 1 << v
            rows[_ROW[i]] |= b
            cols[_COL[i]] |= b
            boxes[_BOX[i]] |= b
    return rows, cols, boxes


def _search(grid: list[int], limit: int, rng: np.random.Generator | None, out: list) -> int:
    """Backtracking over the most constrained blank; counts solutions up to `limit` and keeps
    the first one in `out`. With `rng`, digits are tried in random order (used to fill grids)."""
    rows, cols, boxes = _candidates(grid)
    blanks = [i for i, v in enumerate(grid) if v == 0]
    count = 0

    def rec(k: int) -> None:
        nonlocal count
        if count >= limit:
            return
        if k == len(blanks):
            count += 1
            if not out:
                out.append(list(grid))
            return
        # most constrained blank among the remaining ones
        best, best_mask, best_n = k, 0, 10
        for j in range(k, len(blanks)):
            i = blanks[j]
            m = _ALL & ~(rows[_ROW[i]] | cols[_COL[i]] | boxes[_BOX[i]])
            n = bin(m).count("1")
            if n < best_n:
                best, best_mask, best_n = j, m, n
                if n <= 1:
                    break
        if best_n == 0:
            return
        blanks[k], blanks[best] = blanks[best], blanks[k]
        i = blanks[k]
        r, c, b = _ROW[i], _COL[i], _BOX[i]
        digits = [d for d in range(1, 10) if best_mask >> d & 1]
        if rng is not None:
            rng.shuffle(digits)
        for d in digits:
            bit = 1 << d
            grid[i] = d
            rows[r] |= bit
            cols[c] |= bit
            boxes[b] |= bit
            rec(k + 1)
            rows[r] &= ~bit
            cols[c] &= ~bit
            boxes[b] &= ~bit
            grid[i] = 0
            if count >= limit:
                break
        blanks[k], blanks[best] = blanks[best], blanks[k]

    rec(0)
    return count


def count_solutions(puzzle, limit: int = 2) -> int:
    """Number of solutions, counted up to `limit`."""
    return _search([int(v) for v in np.asarray(puzzle).reshape(-1)], limit, None, [])


def solve_exact(puzzle) -> np.ndarray | None:
    """A solution by backtracking (the checker's ground truth), or None."""
    out: list = []
    _search([int(v) for v in np.asarray(puzzle).reshape(-1)], 1, None, out)
    return np.array(out[0], dtype=np.int64) if out else None


def solved_grid(rng: np.random.Generator) -> np.ndarray:
    """A uniformly shuffled complete grid from randomised backtracking."""
    out: list = []
    _search([0] * CELLS, 1, rng, out)
    return np.array(out[0], dtype=np.int64)


def make_puzzle(rng: np.random.Generator, givens: int) -> tuple[np.ndarray, np.ndarray]:
    """(puzzle, solution): a fresh grid with blanks dug in random order, each kept only if the
    solution stays unique, until `givens` cells are left (or no cell can be removed: then the
    puzzle is minimal and has a few more givens)."""
    if not 17 <= givens <= CELLS:
        raise ValueError(f"givens must be in 17..81, got {givens}")
    solution = solved_grid(rng)
    rank = _dig(solution, rng.permutation(CELLS), stop_at=givens)
    return keep_givens(solution, rank, givens), solution


def dig_ranks(rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """(solution, rank): a fresh grid dug as `make_puzzle` digs it, but down to a minimal puzzle;
    rank[i] is when cell i was removed (0 first) or CELLS if it never could be. Since a puzzle
    with more givens than a unique one is unique too, `keep_givens(solution, rank, g)` is the
    puzzle `make_puzzle` makes with g givens from the same draws, for every g from the minimal
    puzzle's givens up: one dig gives unique puzzles of every size."""
    solution = solved_grid(rng)
    return solution, _dig(solution, rng.permutation(CELLS), stop_at=0)


def dig_pool(seeds: list, workers: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """`dig_ranks` for each seed (one generator per seed, so the result does not depend on how the
    work is split) -> (solutions, ranks) [N, 81]. Digging costs about 70 ms a grid on one CPU core;
    with several cores it runs in that many processes."""
    workers = min(len(seeds), workers or os.cpu_count() or 1)
    out = None
    if workers > 1:
        from concurrent.futures import ProcessPoolExecutor
        from concurrent.futures.process import BrokenProcessPool

        try:
            # spawn: the parent may hold MLX's threads, which a fork would copy half-alive
            with ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn")) as ex:
                out = list(ex.map(_dig_seeded, seeds, chunksize=max(1, len(seeds) // (4 * workers))))
        except BrokenProcessPool:  # e.g. a main script without `if __name__ == "__main__":`
            print("dig_pool: worker processes could not start; digging in this process", file=sys.stderr)
    if out is None:
        out = [_dig_seeded(s) for s in seeds]
    solutions, ranks = zip(*out)
    return np.stack(solutions), np.stack(ranks)


def _dig_seeded(seed) -> tuple[np.ndarray, np.ndarray]:
    return dig_ranks(np.random.default_rng(seed))


def keep_givens(solutions, ranks, givens) -> np.ndarray:
    """Puzzles from `dig_ranks` output ([81] or [B, 81], givens an int or [B]): the cells removed
    first are blank, so that `givens` are left (more where the dig stopped at a minimal puzzle)."""
    blank = CELLS - np.asarray(givens)
    if np.ndim(blank):
        blank = blank[:, None]
    return np.where(np.asarray(ranks) >= blank, solutions, 0)


def _dig(solution: np.ndarray, order: np.ndarray, stop_at: int) -> np.ndarray:
    """Remove cells in `order` while the solution stays unique, until `stop_at` givens are left;
    returns each cell's removal rank (CELLS for cells kept)."""
    puzzle = solution.copy()
    rank = np.full(CELLS, CELLS, dtype=np.int64)
    removed = 0
    for i in order:
        if CELLS - removed <= stop_at:
            break
        puzzle[i] = 0
        if count_solutions(puzzle, 2) == 1:
            rank[i] = removed
            removed += 1
        else:
            puzzle[i] = solution[i]
    return rank


def puzzle_set(seed: int, n: int, givens: tuple[int, int]) -> tuple[np.ndarray, np.ndarray]:
    """n unique-solution puzzles with givens drawn uniformly from [lo, hi] -> (puzzles, solutions) [n, 81]."""
    rng = np.random.default_rng(seed)
    lo, hi = givens
    puzzles, solutions = [], []
    for _ in range(n):
        p, s = make_puzzle(rng, int(rng.integers(lo, hi + 1)))
        puzzles.append(p)
        solutions.append(s)
    return np.stack(puzzles), np.stack(solutions)


# -- training data -------------------------------------------------------------------------------


def augment(grids: np.ndarray, rng: np.random.Generator, ranks: np.ndarray | None = None):
    """Validity-preserving shuffles of complete grids [B, 81]: relabel digits, permute bands,
    stacks, rows within bands and columns within stacks, transpose half of them. With `ranks`
    (`dig_ranks` output, [B, 81]) the same cell shuffle moves them too, and (grids, ranks) is
    returned: the puzzles they give stay unique. The draws do not depend on `ranks`."""
    B = len(grids)
    g = grids.reshape(B, 9, 9)
    out = np.empty_like(g)
    r = None if ranks is None else np.asarray(ranks).reshape(B, 9, 9)
    moved = None if ranks is None else np.empty_like(r)
    for b in range(B):
        rows = np.concatenate([3 * band + rng.permutation(3) for band in rng.permutation(3)])
        cols = np.concatenate([3 * stack + rng.permutation(3) for stack in rng.permutation(3)])
        x = g[b][rows][:, cols]
        y = None if r is None else r[b][rows][:, cols]
        if rng.random() < 0.5:
            x = x.T
            y = None if y is None else y.T
        relabel = np.concatenate([[0], rng.permutation(9) + 1])
        out[b] = relabel[x]
        if y is not None:
            moved[b] = y
    if ranks is None:
        return out.reshape(B, CELLS)
    return out.reshape(B, CELLS), moved.reshape(B, CELLS)


def dig(solutions: np.ndarray, givens: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Random puzzles from complete grids: keep `givens[b]` random cells of row b (uniqueness is
    not enforced; training only needs the grid the givens came from)."""
    B = len(solutions)
    order = np.argsort(rng.random((B, CELLS)), axis=1)
    rank = np.empty_like(order)
    np.put_along_axis(rank, order, np.arange(CELLS)[None].repeat(B, 0), axis=1)
    return np.where(rank < np.asarray(givens)[:, None], solutions, 0)


# -- solving with a model ---------------------------------------------------------------------------


def solve(model, puzzle, seed: int = 0, on_step=None, **overrides) -> np.ndarray:
    """Solve one puzzle with the reference sampler: encode the prompt, denoise one 81-cell canvas.
    Returns the canvas digits [81] (0 where the model left a non-digit). `on_step(step, digits)`
    sees the argmax canvas after every denoising step."""
    return solve_batch(model, np.asarray(puzzle).reshape(1, CELLS), seed, on_step, **overrides)[0]


def solve_batch(model, puzzles: np.ndarray, seed: int = 0, on_step=None, **overrides) -> np.ndarray:
    """[B, 81] puzzles -> [B, 81] digits, all rows denoised together (rows stop independently)."""
    from .generate import denoise_prompts

    if model.config.canvas_length != CELLS:
        raise ValueError(f"a Sudoku model has canvas_length 81, this one has {model.config.canvas_length}")
    cb = None if on_step is None else (lambda step, result: on_step(step, canvas_digits(result.argmax)))
    return canvas_digits(denoise_prompts(model, prompt_batch(puzzles), seed, cb, **overrides))


def solve_tries(model, puzzles: np.ndarray, tries: int, seed: int = 0, on_step=None, **overrides):
    """Each puzzle `tries` times with different noise, all in one batch, keeping the first try
    whose grid passes the rule check (cheap, unlike the solve). Returns (digits [B, 81], the try
    that solved each puzzle [B], -1 where none did; those puzzles get try 0's grid).

    The batch is try-major (rows t*B .. t*B + B-1 are try t), so try 0 draws the same noise as
    `solve_batch(model, puzzles, seed)`, and `tries=1` is exactly that call."""
    if tries < 1:
        raise ValueError(f"tries must be >= 1, got {tries}")
    puzzles = np.asarray(puzzles).reshape(-1, CELLS)
    B = len(puzzles)
    grids = solve_batch(model, np.tile(puzzles, (tries, 1)), seed, on_step, **overrides).reshape(tries, B, CELLS)
    ok = np.array([[is_solution(p, g) for p, g in zip(puzzles, grids[t])] for t in range(tries)])
    which = np.where(ok.any(axis=0), ok.argmax(axis=0), -1)
    return grids[np.maximum(which, 0), np.arange(B)], which
