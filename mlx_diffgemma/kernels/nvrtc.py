"""Compile the CUDA twins with NVRTC, as `mx.fast.cuda_kernel` would, on a machine with no GPU.

MLX's CUDA backend turns a `cuda_kernel(name, input_names, output_names, source)` call into one
translation unit: a fixed header (MLX's device utilities and <cooperative_groups.h>), then
`namespace mlx::core::cu { __global__ void custom_kernel_<name>_<template values>(inputs...,
outputs...) { constexpr int K = ...; <source> } }`, and hands it to NVRTC. `mlx_cuda_source`
writes the same unit (the layout of MLX 0.32's `build_kernel`). MLX's device-utilities header,
which ships inside libmlx rather than as a file, is replaced by a stub that includes the CUDA
half/bfloat16 headers: the kernel bodies use nothing else from it. `compile_check` compiles the
unit for sm_90 with NVRTC loaded from the `nvidia-cuda-nvrtc` wheel (headers from
`nvidia-cuda-runtime`), on the CPU.

What this verifies: the CUDA dialect of the bodies (type names, macros, template constants,
signatures). It reproduces the compile error an H100 reported (`uint` undefined). What it cannot:
launch geometry and results, which only a GPU checks (the registry does, on first use).
"""

from __future__ import annotations

import ctypes
import functools
import glob
import os
from pathlib import Path

from .epilogue import (_CUDA_MACROS, _MERGE, _PARTIALS, MERGE_INPUTS, MERGE_OUTPUTS, PARTIALS_INPUTS,
                       PARTIALS_OUTPUTS, source)

_CUDA_TYPES = {"float32": "float", "bfloat16": "__nv_bfloat16", "float16": "__half", "int32": "int32_t"}
_MLX_UTILS_STUB = "#include <cuda_bf16.h>\n#include <cuda_fp16.h>\ntypedef int int32_t;\ntypedef unsigned int uint32_t;\n"
_MLX_HEADER = ('#include "mlx/backend/cuda/device/utils.cuh"\n\n#include <cooperative_groups.h>\n\n'
               "#define inf cuda::std::numeric_limits<float>::infinity()\n\n")


def mlx_cuda_source(name: str, body: str, inputs: list[tuple[str, str]], outputs: list[tuple[str, str]],
                    template: dict[str, int]) -> tuple[str, str]:
    """(kernel name, translation unit) as MLX builds them; inputs/outputs are (name, dtype)."""
    kernel = f"custom_kernel_{name}" + "".join(f"_{v}" for v in template.values())
    args = [f"    const {_CUDA_TYPES[t]}* {n}" for n, t in inputs] + [f"    {_CUDA_TYPES[t]}* {n}" for n, t in outputs]
    consts = "".join(f"  constexpr int {k} = {v};\n" for k, v in template.items())
    unit = (_MLX_HEADER + "namespace mlx::core::cu {\n\nnamespace cg = cooperative_groups;\n\n"
            f"__global__ void {kernel}(\n" + ",\n".join(args) + ") {\n" + consts + "\n" + body
            + "\n}\n\n} // namespace mlx::core::cu\n")
    return kernel, unit


def epilogue_units(raw_dtype: str = "float32", k: int = 8, macros: dict | None = None) -> dict[str, str]:
    """The LM-head epilogue's two kernels as MLX would compile them for `raw_dtype` logits."""
    macros = _CUDA_MACROS if macros is None else macros
    f, i = "float32", "int32"
    part_types = [f, f, f, i, f, i]
    partials = mlx_cuda_source(
        "dg_head_partials", source(_PARTIALS, macros),
        list(zip(PARTIALS_INPUTS, [raw_dtype, i, f])), list(zip(PARTIALS_OUTPUTS, part_types)), {"K": k})
    merge = mlx_cuda_source(
        "dg_head_merge", source(_MERGE, macros),
        list(zip(MERGE_INPUTS, [raw_dtype, i, f, f] + part_types)), list(zip(MERGE_OUTPUTS, [i, f, f, i, f, i])),
        {"K": k})
    return dict([partials, merge])


def _nvidia_root() -> Path | None:
    try:
        import nvidia  # the namespace package of NVIDIA's CUDA wheels
    except ImportError:
        return None
    for base in nvidia.__path__:
        for sub in ("cu13", "cuda_nvrtc", "cu12"):
            if glob.glob(os.path.join(base, sub, "lib", "libnvrtc.so*")):
                return Path(base) / sub
    return None


@functools.cache  # the libraries load once per process, not once per compile
def find_nvrtc() -> tuple[ctypes.CDLL, list[str]] | None:
    """(libnvrtc, include dirs) from the NVIDIA pip wheels, or None when they are not installed."""
    root = _nvidia_root()
    if root is None:
        return None
    libs = sorted(p for p in glob.glob(str(root / "lib" / "libnvrtc*.so*")) if ".alt." not in p)
    for builtins in (p for p in libs if "builtins" in p):  # NVRTC dlopens it by soname: load it first
        ctypes.CDLL(builtins, mode=ctypes.RTLD_GLOBAL)
    lib = next(p for p in libs if "builtins" not in p)
    # cu13 wheels share one folder; cu12 ones keep the runtime headers in cuda_runtime/; a CUDA
    # toolkit, where one is installed, supplies CCCL headers (<nv/target>) that some wheel sets lack
    toolkit = Path(os.environ.get("CUDA_HOME") or os.environ.get("CUDA_PATH") or "/usr/local/cuda") / "include"
    candidates = (root / "include", root / "include" / "cccl", root.parent / "cuda_runtime" / "include",
                  toolkit, toolkit / "cccl")
    includes = [d for d in candidates if d.is_dir()]
    return ctypes.CDLL(lib), [str(d) for d in includes]


def headers_complete(includes: list[str]) -> bool:
    """Whether the include dirs hold what <cooperative_groups.h> pulls in (CCCL's <nv/target>)."""
    return any((Path(d) / "nv" / "target").is_file() for d in includes)


def compile_check(unit: str, name: str = "kernel.cu", arch: str = "compute_90") -> tuple[bool, str]:
    """Compile one translation unit with NVRTC -> (ok, compiler log)."""
    found = find_nvrtc()
    if found is None:
        raise RuntimeError("NVRTC not found: pip install nvidia-cuda-nvrtc nvidia-cuda-runtime (Linux x86-64)")
    nvrtc, includes = found
    prog = ctypes.c_void_p()
    headers = [_MLX_UTILS_STUB.encode()]
    header_names = [b"mlx/backend/cuda/device/utils.cuh"]
    rc = nvrtc.nvrtcCreateProgram(ctypes.byref(prog), unit.encode(), name.encode(), 1,
                                  (ctypes.c_char_p * 1)(*headers), (ctypes.c_char_p * 1)(*header_names))
    if rc != 0:
        raise RuntimeError(f"nvrtcCreateProgram failed ({rc})")
    try:
        opts = [f"--gpu-architecture={arch}", "--std=c++17"] + [f"-I{d}" for d in includes]
        rc = nvrtc.nvrtcCompileProgram(prog, len(opts), (ctypes.c_char_p * len(opts))(*[o.encode() for o in opts]))
        size = ctypes.c_size_t()
        nvrtc.nvrtcGetProgramLogSize(prog, ctypes.byref(size))
        log = ctypes.create_string_buffer(size.value)
        nvrtc.nvrtcGetProgramLog(prog, log)
        return rc == 0, log.value.decode(errors="replace").strip()
    finally:
        nvrtc.nvrtcDestroyProgram(ctypes.byref(prog))


def main() -> int:
    failed = 0
    for dtype in ("float32", "bfloat16"):
        for kernel, unit in epilogue_units(dtype).items():
            ok, log = compile_check(unit, f"{kernel}.cu")
            failed += not ok
            print(f"{kernel} ({dtype} logits): {'compiles' if ok else 'FAILS'}" + (f"\n{log}" if log else ""))
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
