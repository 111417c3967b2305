"""Execute the GPU kernels' source bodies on the CPU: the same text compiled by g++.

No machine here has an Apple GPU, so the Metal wrappers cannot be compiled or run. The kernel
bodies are written barrier-free (one independent work item per thread), which makes a thread just a
loop iteration: this shim defines the bodies' macros for C++, wraps each body in a loop over thread
ids, builds a shared library with g++ and calls it through ctypes. What it verifies: the bodies'
arithmetic, indexing, chunk bookkeeping and edge cases. The wrappers around them are checked
elsewhere: `metal_shim.py` runs MLX's generated Metal source the same way, `nvrtc.py` compiles the
CUDA translation unit; only a real device checks the rest (`python -m mlx_diffgemma.doctor` does
that on first use).
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import shutil
import subprocess
import tempfile
from pathlib import Path

import numpy as np

from .epilogue import _MERGE, _PARTIALS, MERGE_INPUTS, MERGE_OUTPUTS, PARTIALS_INPUTS, PARTIALS_OUTPUTS, chunking

_CPP_MACROS = """
#include <cmath>
typedef unsigned int uint;
#define TID tid_
#define KFLOAT(v) static_cast<float>(v)
#define EXPF std::exp
#define LOGF std::log
#define TANHF std::tanh
#define IMIN(a, b) ((a) < (b) ? (a) : (b))
#define NEG_BIG (-3.0e38f)
"""

_TYPES = {
    "x": "const float*", "meta": "const int*", "fmeta": "const float*", "u": "const float*",
    "part_m": "float*", "part_s": "float*", "part_t": "float*", "part_am": "int*", "part_kv": "float*",
    "part_ki": "int*", "out_argmax": "int*", "out_lse": "float*", "out_entropy": "float*",
    "out_sample": "int*", "out_topk_v": "float*", "out_topk_i": "int*",
}


def _function(name: str, names: list[str], body: str, const_inputs: set[str]) -> str:
    params = []
    for n in names:
        t = _TYPES[n]
        if n in const_inputs and not t.startswith("const"):
            t = "const " + t
        params.append(f"{t} {n}")
    return (
        f'extern "C" void {name}({", ".join(params)}, unsigned int n_threads) {{\n'
        f"  for (uint tid_ = 0; tid_ < n_threads; ++tid_) {{\n"
        f"    [&]() {{\n{body}\n    }}();\n  }}\n}}\n"
    )


def cpp_source(k: int) -> str:
    return (
        _CPP_MACROS
        + f"constexpr int K = {k};\n"
        + _function("dg_head_partials", PARTIALS_INPUTS + PARTIALS_OUTPUTS, _PARTIALS, set())
        + _function("dg_head_merge", MERGE_INPUTS + MERGE_OUTPUTS, _MERGE, set(PARTIALS_OUTPUTS))
    )


def compiler_available() -> bool:
    return shutil.which("g++") is not None


_LIBS: dict = {}


def compile_library(unit: str, flags: tuple[str, ...] = ()) -> ctypes.CDLL:
    """Build a C++ translation unit into a shared library with g++ and load it, cached by the text
    and flags (in memory, and as a file in the temp folder). Raises RuntimeError with g++'s output."""
    key = hashlib.sha256((unit + " ".join(flags)).encode()).hexdigest()[:16]
    if key not in _LIBS:
        out = Path(tempfile.gettempdir()) / f"mlx_diffgemma_shim_{key}.so"
        if not out.exists():
            cpp = out.with_suffix(".cpp")
            cpp.write_text(unit)
            tmp = out.with_suffix(f".{os.getpid()}.tmp.so")
            done = subprocess.run(["g++", "-O2", "-shared", "-fPIC", "-std=c++17", *flags, str(cpp), "-o", str(tmp)],
                                  capture_output=True, text=True)
            if done.returncode != 0:
                raise RuntimeError(f"g++ failed on {cpp}:\n{done.stderr}")
            tmp.replace(out)  # atomic: a concurrent build never sees half a library
        _LIBS[key] = ctypes.CDLL(str(out))
    return _LIBS[key]


def build(k: int) -> ctypes.CDLL:
    return compile_library(cpp_source(k))


def _ptr(a: np.ndarray):
    return a.ctypes.data_as(ctypes.c_void_p)


def epilogue_cpu(raw: np.ndarray, cap: float, temperature: float, uniforms: np.ndarray, k: int,
                 chunk: int | None = None):
    """The kernels' bodies on the CPU. Same outputs as `epilogue_reference` (numpy)."""
    raw = np.ascontiguousarray(raw, dtype=np.float32)
    R, V = raw.shape
    CH, NC = chunking(V, R, chunk)
    lib = build(k)
    meta = np.array([V, CH, NC, R], dtype=np.int32)
    fmeta = np.array([cap, 1.0 / float(temperature)], dtype=np.float32)
    n = R * NC
    parts = [np.zeros(n, np.float32), np.zeros(n, np.float32), np.zeros(n, np.float32), np.zeros(n, np.int32),
             np.zeros(n * k, np.float32), np.zeros(n * k, np.int32)]
    lib.dg_head_partials(_ptr(raw), _ptr(meta), _ptr(fmeta), *map(_ptr, parts), ctypes.c_uint(n))
    u = np.ascontiguousarray(uniforms, dtype=np.float32).reshape(R)
    outs = [np.zeros(R, np.int32), np.zeros(R, np.float32), np.zeros(R, np.float32), np.zeros(R, np.int32),
            np.zeros((R, k), np.float32), np.zeros((R, k), np.int32)]
    lib.dg_head_merge(_ptr(raw), _ptr(meta), _ptr(fmeta), _ptr(u), *map(_ptr, parts), *map(_ptr, outs),
                      ctypes.c_uint(R))
    argmax, lse, entropy, sample, top_v, top_i = outs
    return argmax, entropy, lse, sample, top_i, top_v
