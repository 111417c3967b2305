"""Atomic writes: a failure leaves the old directory as it was and nothing half-written beside it."""

import pytest

from mlx_diffgemma.files import atomic_dir, write_text_atomic


def test_atomic_dir_replaces_only_on_success(tmp_path):
    final = tmp_path / "model"
    with atomic_dir(final) as tmp:
        (tmp / "weights").write_text("one")
    assert (final / "weights").read_text() == "one"

    with pytest.raises(KeyboardInterrupt):
        with atomic_dir(final) as tmp:
            (tmp / "weights").write_text("two")
            raise KeyboardInterrupt
    assert (final / "weights").read_text() == "one"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model"]  # no temporary left behind

    with atomic_dir(final) as tmp:
        (tmp / "other").write_text("three")
    assert sorted(p.name for p in final.iterdir()) == ["other"]  # the new directory, not a merge
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model"]
    assert final.stat().st_mode & 0o755 == 0o755


def test_write_text_atomic_keeps_the_old_file_on_failure(tmp_path):
    path = tmp_path / "result.json"
    write_text_atomic(path, "one")
    with pytest.raises(TypeError):
        write_text_atomic(path, None)  # fails while writing the temporary file
    assert path.read_text() == "one"
    assert [p.name for p in tmp_path.iterdir()] == ["result.json"]  # no temporary left behind
    write_text_atomic(path, "two")
    assert path.read_text() == "two"
