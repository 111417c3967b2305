"""Sorting digits: a small task whose answers have every length, for the fast path's quality gate.

A list holds 1 to WIDTH digits 0-9. The prompt is `<bos>` + WIDTH cells: the list's digits, then '.'
in the unused cells (a fixed-width form, so prompts batch without padding). The canvas (CANVAS rows)
holds the sorted digits, then EOS in every row after them, as DiffusionGemma fills the rest of a
canvas after its answer. Most of the canvas is therefore tail: the situation of a short answer in
the real model's 256-row canvas, which the EOS tail cut and the prefix-stable exit are for (Sudoku's
answer fills its canvas, so they never apply there).

The model uses the Sudoku model's character tokenizer (digits, '.', Gemma's special ids).
"""

from __future__ import annotations

import numpy as np

from .sudoku import BOS, DIGIT0, DOT, EOS

WIDTH = 48  # the longest list
CANVAS = 128  # canvas rows: the answer (up to WIDTH digits), then EOS


def random_lists(rng: np.random.Generator, n: int, lengths: tuple[int, int] = (1, WIDTH)) -> list[np.ndarray]:
    """`n` lists of uniform random digits, each of a length drawn uniformly from `lengths` (inclusive)."""
    lo, hi = lengths
    if not 1 <= lo <= hi <= WIDTH:
        raise ValueError(f"list lengths must lie in 1..{WIDTH}, got {lo}..{hi}")
    sizes = rng.integers(lo, hi + 1, n)
    digits = rng.integers(0, 10, (n, WIDTH))
    return [digits[i, : sizes[i]] for i in range(n)]


def list_set(seed: int, n: int, lengths: tuple[int, int] = (1, WIDTH)) -> list[np.ndarray]:
    """A fixed held-out set (training draws from `default_rng([seed, step])`, never this stream)."""
    return random_lists(np.random.default_rng([seed, 104729]), n, lengths)


def prompt_batch(lists) -> np.ndarray:
    """Lists -> [B, 1 + WIDTH] prompt ids: <bos>, the digits, '.' in the unused cells."""
    out = np.full((len(lists), 1 + WIDTH), DOT, dtype=np.int32)
    out[:, 0] = BOS
    for i, lst in enumerate(lists):
        out[i, 1 : 1 + len(lst)] = DIGIT0 + np.asarray(lst)
    return out


def canvas_ids(lists) -> np.ndarray:
    """Lists -> [B, CANVAS] target canvases: the sorted digits, then EOS to the end."""
    out = np.full((len(lists), CANVAS), EOS, dtype=np.int32)
    for i, lst in enumerate(lists):
        out[i, : len(lst)] = DIGIT0 + np.sort(np.asarray(lst))
    return out


def answer(tokens) -> np.ndarray:
    """A committed canvas -> the tokens before its first EOS, as digits (-1 for a non-digit token)."""
    t = np.asarray(tokens).reshape(-1)
    hits = np.flatnonzero(t == EOS)
    t = t[: hits[0]] if len(hits) else t
    d = t.astype(np.int64) - DIGIT0
    return np.where((d >= 0) & (d <= 9), d, -1)


def tokens_right(lst, tokens) -> float:
    """The share of the answer's rows (its digits and the EOS after them) that the canvas got right."""
    target = canvas_ids([lst])[0, : len(lst) + 1]
    return float((np.asarray(tokens).reshape(-1)[: len(target)] == target).mean())


def is_sorted_answer(lst, tokens) -> bool:
    """The canvas holds exactly the list's digits in order, then EOS."""
    return np.array_equal(answer(tokens), np.sort(np.asarray(lst))) and EOS in np.asarray(tokens)


def sort_batch(model, lists, seed: int = 0, **overrides) -> np.ndarray:
    """Lists -> [B, CANVAS] committed canvases from the reference sampler, all rows denoised
    together (rows stop independently); `answer` and `is_sorted_answer` read them."""
    from .generate import denoise_prompts

    if model.config.canvas_length != CANVAS:
        raise ValueError(f"a sort model has canvas_length {CANVAS}, this one has {model.config.canvas_length}")
    return denoise_prompts(model, prompt_batch(lists), seed, **overrides)
