"""The sort task: its scores, and the bundled sort model (the fast path's short-answer model)."""

import numpy as np
import pytest

from mlx_diffgemma import load, sorting, sudoku


def test_sorting_scores():
    lst = np.array([3, 1, 2])
    good = sorting.canvas_ids([lst])[0]
    assert sorting.is_sorted_answer(lst, good) and sorting.tokens_right(lst, good) == 1.0
    bad = good.copy()
    bad[1] = sudoku.DIGIT0 + 3  # 1 3 3 EOS: one digit of four rows wrong
    assert not sorting.is_sorted_answer(lst, bad) and sorting.tokens_right(lst, bad) == 0.75
    no_eos = good.copy()
    no_eos[3:] = sudoku.DOT
    assert not sorting.is_sorted_answer(lst, no_eos)
    early = good.copy()
    early[2] = sudoku.EOS  # stops after two digits
    assert not sorting.is_sorted_answer(lst, early)
    np.testing.assert_array_equal(sorting.answer(early), [1, 2])
    with pytest.raises(ValueError, match="1..48"):
        sorting.list_set(0, 2, (0, 5))


def test_bundled_sort_model_sorts_short_lists():
    """Measured, not hard-coded: on fresh short lists the bundled model must sort most exactly and
    place the EOS right (docs/fast_path.md has its rates by length)."""
    model, _ = load("sort")
    lists = sorting.list_set(7, 8, (1, 12))
    canvases = sorting.sort_batch(model, lists, seed=0)
    exact = sum(sorting.is_sorted_answer(lst, c) for lst, c in zip(lists, canvases))
    right = np.mean([sorting.tokens_right(lst, c) for lst, c in zip(lists, canvases)])
    assert right > 0.9, right
    assert exact >= 5, exact
    with pytest.raises(ValueError, match="canvas_length 128"):
        sorting.sort_batch(load("sudoku")[0], lists)


def test_bundled_sort_model_sorts_in_short_canvases():
    """The `short` mode through the public block loop: 48-row canvases, a second one for an answer
    that does not fit (48 digits + EOS). Measured on fresh lists, not hard-coded."""
    from mlx_diffgemma import stream_generate

    model, tok = load("sort")
    lists = sorting.list_set(11, 6, (20, 40)) + sorting.list_set(12, 1, (48, 48))
    exact = 0
    for i, lst in enumerate(lists):
        done = list(stream_generate(model, tok, sorting.prompt_batch([lst])[0].tolist(), max_tokens=128,
                                    mode="short", seed=i))[-1]
        exact += sorting.is_sorted_answer(lst, np.array(done.token_ids))
        assert done.stats.canvases == (2 if len(lst) == 48 else 1), (len(lst), done.stats.canvases)
        assert done.stats.row_passes <= 48 * done.stats.denoise_steps
    assert exact >= 5, exact
