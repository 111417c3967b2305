"""Custom kernels that check themselves before they are trusted.

On first use on a device (keyed by chip, OS and MLX version) each kernel runs once on small random
inputs against its plain-mx fallback. A mismatch beyond tolerance, an exception or a compile error
logs one warning and the fallback is used from then on. Verdicts are cached in a small JSON file in
the user's cache directory, so the check costs nothing afterwards.

Environment: MLX_DIFFGEMMA_KERNELS=fallback forces every fallback; =recheck ignores cached verdicts.
MLX_DIFFGEMMA_CACHE_DIR moves the verdict file.
"""

from __future__ import annotations

import json
import os
import platform
import tempfile
import threading
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import mlx.core as mx
import numpy as np

from . import epilogue


@dataclass
class Kernel:
    name: str
    fast: Callable  # fast(target, *args) -> tuple of arrays
    fallback: Callable  # fallback(*args) -> same tuple
    probe: Callable  # probe() -> args: small random inputs
    check: Callable  # check(fast_outputs, fallback_outputs) -> None or a reason string


def _probe_epilogue():
    rng = np.random.default_rng(0)
    raw = mx.array((rng.normal(size=(5, 1000)) * 15).astype(np.float32)).astype(mx.bfloat16)
    u = mx.array(rng.random(5).astype(np.float32))
    return raw, 30.0, 0.7, u, 8


def _check_epilogue(got, ref) -> str | None:
    argmax, entropy, lse, sample, ids, vals = (np.array(a) for a in got)
    r_argmax, r_entropy, r_lse, r_sample, r_ids, r_vals = (np.array(a) for a in ref)
    if not (argmax == r_argmax).all():
        return "argmax differs"
    if not np.allclose(lse, r_lse, rtol=1e-4, atol=1e-3) or not np.allclose(entropy, r_entropy, atol=2e-3):
        return "log-sum-exp or entropy differs"
    if (sample != r_sample).mean() > 0.2:  # chunked vs flat cumsum may flip a sample at a boundary
        return "samples differ"
    if not np.allclose(vals, r_vals, rtol=1e-4, atol=1e-3):
        return "top-k values differ"
    return None


KERNELS: dict[str, Kernel] = {
    "lm_head_epilogue": Kernel(
        "lm_head_epilogue",
        fast=lambda target, *a: epilogue.epilogue_kernel(*a, target=target),
        fallback=epilogue.epilogue_reference,
        probe=_probe_epilogue,
        check=_check_epilogue,
    ),
}


def device_key() -> str:
    chip = "cpu"
    target = epilogue.gpu_target()
    try:
        if target == "metal":
            chip = mx.metal.device_info().get("device_name", "apple-gpu")
        elif target == "cuda":
            chip = "cuda"
    except Exception:
        pass
    return f"{chip}|{platform.system()} {platform.release()}|mlx {mx.__version__}"


def verdict_file() -> Path:
    root = os.environ.get("MLX_DIFFGEMMA_CACHE_DIR") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "mlx_diffgemma"
    )
    return Path(root) / "kernel_verdicts.json"


_lock = threading.Lock()
_verdicts: dict[str, dict] = {}
_warned: set[str] = set()


def _load_verdicts() -> dict:
    try:
        return json.loads(verdict_file().read_text())
    except (OSError, ValueError):
        return {}


def _save_verdict(key: str, name: str, verdict: dict) -> None:
    path = verdict_file()
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        data = _load_verdicts()
        data.setdefault(key, {})[name] = verdict
        fd, tmp = tempfile.mkstemp(dir=path.parent, suffix=".tmp")
        with os.fdopen(fd, "w") as f:
            json.dump(data, f, indent=1)
        os.replace(tmp, path)
    except OSError:
        pass  # a read-only home only costs a re-check next time


def verify(name: str, target: str | None = None) -> dict:
    """Run kernel `name` on `target` against its fallback; returns {"ok": bool, "reason": str}."""
    k = KERNELS[name]
    target = target or epilogue.gpu_target()
    if target is None:
        return {"ok": False, "reason": "no GPU backend: the plain-mx fallback is the CPU path"}
    args = k.probe()
    try:
        got = k.fast(target, *args)
        mx.eval(*got)
    except Exception as e:  # compile errors surface here too
        return {"ok": False, "reason": f"{type(e).__name__}: {str(e).splitlines()[0][:200] if str(e) else ''}"}
    reason = k.check(got, k.fallback(*args))
    return {"ok": reason is None, "reason": reason or "matches the fallback"}


def use_fast(name: str) -> str | None:
    """The GPU target to run kernel `name` on, or None for the fallback (checked once per device)."""
    mode = os.environ.get("MLX_DIFFGEMMA_KERNELS", "")
    target = epilogue.gpu_target()
    if mode == "fallback" or target is None:
        return None
    key = device_key()
    with _lock:
        if name not in _verdicts:
            cached = None if mode == "recheck" else _load_verdicts().get(key, {}).get(name)
            verdict = cached or verify(name, target)
            if cached is None:
                _save_verdict(key, name, verdict)
            _verdicts[name] = verdict
        verdict = _verdicts[name]
        if not verdict["ok"] and name not in _warned:
            _warned.add(name)
            warnings.warn(f"mlx_diffgemma: kernel {name} disabled on this device ({verdict['reason']}); "
                          "using the plain-mx fallback", RuntimeWarning, stacklevel=3)
    return target if verdict["ok"] else None


def reset() -> None:
    """Forget in-process verdicts and warnings (tests, the doctor)."""
    with _lock:
        _verdicts.clear()
        _warned.clear()


def run(name: str, *args):
    """Kernel `name` on the GPU when it passed its check, else the fallback. A kernel that raises at
    run time is disabled for the rest of the process and the call is answered by the fallback."""
    k = KERNELS[name]
    target = use_fast(name)
    if target is not None:
        try:
            return k.fast(target, *args)
        except Exception as e:
            with _lock:
                _verdicts[name] = {"ok": False, "reason": f"{type(e).__name__} at run time"}
            _save_verdict(device_key(), name, _verdicts[name])
            warnings.warn(f"mlx_diffgemma: kernel {name} failed ({type(e).__name__}); using the fallback",
                          RuntimeWarning, stacklevel=2)
    return k.fallback(*args)
