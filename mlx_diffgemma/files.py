"""Atomic writes: a model directory is either wholly the new one or untouched."""

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
