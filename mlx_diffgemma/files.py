"""Atomic writes: a model directory or a result file is either wholly the new one or untouched."""

from __future__ import annotations

import os
import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path


@contextmanager
def atomic_dir(final, tag: str = "writing"):
    """Yield a fresh temporary directory beside `final`; when the block ends without an error it
    becomes `final`. An existing `final` is moved aside first and deleted only once the new one is
    in place. On any error (Ctrl-C included) the temporary directory is removed and `final` is as
    it was."""
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.{tag}-", dir=final.parent))
    os.chmod(tmp, 0o755)  # mkdtemp makes it private; models are meant to be shared
    old = tmp.with_name(tmp.name + ".replaced")
    try:
        yield tmp
        if final.exists():
            os.replace(final, old)
        os.replace(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        if old.exists() and not final.exists():
            os.replace(old, final)
        raise
    finally:
        shutil.rmtree(old, ignore_errors=True)


def write_text_atomic(path, text: str) -> None:
    """Write `text` to a temporary file beside `path`, then rename it over `path`: a reader (or a
    crash) never sees half a file."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        tmp.write_text(text)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
