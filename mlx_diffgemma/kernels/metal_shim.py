"""Run `mx.fast.metal_kernel` kernels on a machine with no Apple GPU: MLX's generated Metal source,
compiled by g++ and executed one thread after another.

`metal_kernel` here takes the arguments of `mx.fast.metal_kernel` and returns a callable with its
call signature. A call writes the translation unit MLX 0.32 would hand to the Metal compiler (the
`write_signature` layout: template header, `[[kernel]] void custom_kernel_<name>...` with inputs of
fewer than 8 elements in the `constant` address space and the rest in `device`, the `_shape` /
`_strides` / `_ndim` parameters and the thread attributes the source names, then the explicit
instantiation), puts a C++ stand-in for the Metal prelude in front, adds a launcher that walks
the grid as `dispatch_threads` would, builds it with g++ and calls it on numpy copies of the
inputs. Patching `mx.fast.metal_kernel` with this function runs a wrapper such as
`kernels.epilogue.epilogue_kernel` end to end on the CPU: its macros, template constants, input
and output lists, dtypes, output shapes and launch grid.

What it cannot check: the Metal compiler itself (the language is C++14 with restrictions g++ does
not enforce), the Metal library's arithmetic (the stand-ins below use the C library), threads
running at the same time (only barrier-free kernels are meaningful here; the SIMD-group and
quad-group attributes are refused) and speed.
"""

from __future__ import annotations

import ctypes

import mlx.core as mx
import numpy as np

from .shim import compile_library, compiler_available  # noqa: F401 (the tests ask this module)

MAX_CONSTANT_ARRAY_SIZE = 8  # MLX passes inputs with fewer elements in the `constant` address space
MAX_THREADGROUP = 1024  # Apple GPUs' maxTotalThreadsPerThreadgroup for a simple kernel

# Metal types by MLX dtype (MLX's get_type_string), with the numpy storage the launcher passes.
_TYPES = {
    mx.float32: ("float", np.float32), mx.float16: ("float16_t", np.uint16), mx.bfloat16: ("bfloat16_t", np.uint16),
    mx.int32: ("int32_t", np.int32), mx.uint32: ("uint32_t", np.uint32), mx.int64: ("int64_t", np.int64),
    mx.uint8: ("uint8_t", np.uint8), mx.bool_: ("bool", np.bool_),
}

# Thread attributes in the order MLX declares them, each with the launcher expression for one
# thread (`p` its position in the grid, `g` the threadgroup size, `n` the grid size).
_ATTRIBUTES = {
    "dispatch_quadgroups_per_threadgroup": None,
    "dispatch_simdgroups_per_threadgroup": None,
    "dispatch_threads_per_threadgroup": ("uint3", "g"),
    "grid_origin": ("uint3", "uint3{0, 0, 0}"),
    "grid_size": ("uint3", "n"),
    "quadgroup_index_in_threadgroup": None,
    "quadgroups_per_threadgroup": None,
    "simdgroup_index_in_threadgroup": None,
    "simdgroups_per_threadgroup": None,
    "thread_execution_width": None,
    "thread_index_in_quadgroup": None,
    "thread_index_in_simdgroup": None,
    "thread_index_in_threadgroup": ("uint", "(p.z % g.z) * g.x * g.y + (p.y % g.y) * g.x + p.x % g.x"),
    "thread_position_in_grid": ("uint3", "p"),
    "thread_position_in_threadgroup": ("uint3", "uint3{p.x % g.x, p.y % g.y, p.z % g.z}"),
    "threadgroup_position_in_grid": ("uint3", "uint3{p.x / g.x, p.y / g.y, p.z / g.z}"),
    "threadgroups_per_grid": ("uint3", "uint3{(n.x + g.x - 1) / g.x, (n.y + g.y - 1) / g.y, (n.z + g.z - 1) / g.z}"),
    "threads_per_grid": ("uint3", "n"),
    "threads_per_simdgroup": None,
    "threads_per_threadgroup": ("uint3", "g"),
}

# What MLX's Metal prelude (<metal_stdlib> and its utils header) provides that kernels here use.
# Address spaces vanish; half and bfloat16 are 16-bit storage that converts to float, as in Metal.
PRELUDE = r"""
#include <cmath>
#include <cstdint>
#include <cstring>
#define device
#define constant
#define thread
typedef unsigned int uint;
struct uint3 { uint x, y, z; };
struct bfloat16_t {
  uint16_t bits;
  operator float() const { uint32_t u = uint32_t(bits) << 16; float f; std::memcpy(&f, &u, 4); return f; }
};
struct float16_t {
  uint16_t bits;
  operator float() const {
    const uint32_t s = (bits >> 15) & 1, e = (bits >> 10) & 31, m = bits & 1023;
    float v = e == 0 ? std::ldexp(float(m), -24) : e == 31 ? (m ? NAN : INFINITY) : std::ldexp(float(m | 1024), int(e) - 25);
    return s ? -v : v;
  }
};
namespace metal {
inline float exp(float x) { return std::exp(x); }
inline float log(float x) { return std::log(x); }
inline float tanh(float x) { return std::tanh(x); }
template <typename T> inline T min(T a, T b) { return a < b ? a : b; }
template <typename T> inline T max(T a, T b) { return a > b ? a : b; }
namespace precise {
inline float exp(float x) { return std::exp(x); }
inline float log(float x) { return std::log(x); }
inline float tanh(float x) { return std::tanh(x); }
}
}
"""


class MetalShimError(RuntimeError):
    """The generated source did not compile, or the kernel asked for what the shim cannot run."""


def _type(dtype) -> tuple[str, type]:
    if dtype not in _TYPES:
        raise MetalShimError(f"dtype {dtype} is not supported by the Metal shim")
    return _TYPES[dtype]


def _template_value(v) -> str:
    if isinstance(v, bool):
        return str(int(v))  # MLX streams bools without boolalpha
    if isinstance(v, int):
        return str(v)
    return _type(v)[0]


def kernel_name(name: str, template: list, inputs: list[mx.array], output_dtypes: list) -> str:
    """MLX's name for one instantiation: the template values, then each input's and output's type."""
    out = "custom_kernel_" + name
    if template:
        out += "_" + "_" + "_".join(_template_value(v) for _, v in template)
    for a in inputs:
        out += "_" + _type(a.dtype)[0] + ("s" if a.ndim == 0 else "c" if a.size < MAX_CONSTANT_ARRAY_SIZE else "")
    return out + "".join("_" + _type(d)[0] for d in output_dtypes)


# the parameters MLX adds after an array input when the source names them: (suffix, Metal type, launcher cast)
_SHAPE_PARAMS = (("_shape", "const constant int*", "(const int*)"), ("_strides", "const constant int64_t*",
                 "(const int64_t*)"), ("_ndim", "const constant int&", "*(const int*)"))


def _shape_params(name: str, a: mx.array, source: str) -> list[tuple[str, str, str]]:
    return [p for p in _SHAPE_PARAMS if a.ndim > 0 and name + p[0] in source]


def _instance(kname: str, template: list) -> str:
    """The kernel's instantiated name, e.g. custom_kernel_x__8<8>."""
    return kname + ("<" + ", ".join(_template_value(v) for _, v in template) + ">" if template else "")


def metal_source(name: str, input_names: list[str], output_names: list[str], source: str, header: str,
                 inputs: list[mx.array], output_dtypes: list, template: list) -> tuple[str, str, list[str]]:
    """(kernel name, the source MLX would compile, the thread attributes it declares)."""
    kname = kernel_name(name, template, inputs, output_dtypes)
    attrs = [a for a in _ATTRIBUTES if a in source]  # MLX's test: the name appears anywhere in the source
    refused = [a for a in attrs if _ATTRIBUTES[a] is None]
    if refused:
        raise MetalShimError(f"{name}: {', '.join(refused)} need threads that run together; the shim runs them "
                             "one after another (run this kernel on an Apple GPU)")
    params = []
    for n, a in zip(input_names, inputs):
        space = "constant" if a.size < MAX_CONSTANT_ARRAY_SIZE else "device"
        params.append(f"const {space} {_type(a.dtype)[0]}{'&' if a.ndim == 0 else '*'} {n}")
        params += [f"{ctype} {n}{suffix}" for suffix, ctype, _ in _shape_params(n, a, source)]
    params += [f"device {_type(d)[0]}* {n}" for n, d in zip(output_names, output_dtypes)]
    params = [f"  {p} [[buffer({i})]]" for i, p in enumerate(params)]
    params += [f"  {_ATTRIBUTES[a][0]} {a} [[{a}]]" for a in attrs]
    text = header
    if template:
        kinds = ["bool" if isinstance(v, bool) else "int" if isinstance(v, int) else "typename" for _, v in template]
        text += "template <" + ", ".join(f"{k} {n}" for k, (n, _) in zip(kinds, template)) + ">\n"
    text += f"[[kernel]] void {kname}(\n" + ",\n".join(params) + ") {\n" + source + "\n}\n"
    if template:
        inst = _instance(kname, template)
        text += f'\ntemplate [[host_name("{kname}")]] [[kernel]] decltype({inst}) {inst};\n'
    return kname, text, attrs


def _launcher(kname: str, template: list, input_names: list[str], inputs: list[mx.array], source: str,
              output_dtypes: list, attrs: list[str]) -> str:
    """An extern "C" function that calls the kernel once per thread of the grid, x fastest; `b`
    holds the buffers in the kernel's parameter order."""
    args = []
    for n, a in zip(input_names, inputs):
        ctype = _type(a.dtype)[0]
        args.append(f"*(const {ctype}*)b[{len(args)}]" if a.ndim == 0 else f"(const {ctype}*)b[{len(args)}]")
        args += [f"{cast}b[{len(args) + i}]" for i, (_, _, cast) in enumerate(_shape_params(n, a, source))]
    args += [f"({_type(d)[0]}*)b[{len(args) + i}]" for i, d in enumerate(output_dtypes)]
    inst = _instance(kname, template)
    args += [_ATTRIBUTES[a][1] for a in attrs]
    return (
        f'extern "C" void dg_launch(void** b, const uint* grid, const uint* group) {{\n'
        f"  const uint3 n{{grid[0], grid[1], grid[2]}}, g{{group[0], group[1], group[2]}};\n"
        f"  for (uint z = 0; z < n.z; ++z) for (uint y = 0; y < n.y; ++y) for (uint x = 0; x < n.x; ++x) {{\n"
        f"    const uint3 p{{x, y, z}}; (void)p;\n"
        f"    {inst}({', '.join(args)});\n"
        f"  }}\n}}\n"
    )


def build(unit: str):
    """Compile a translation unit. -Werror=double-promotion: Metal has no double type, and the CUDA
    twin built from the same body would compute an unsuffixed literal in fp64."""
    try:
        return compile_library(unit, ("-Wall", "-Wno-attributes", "-Wno-unused-variable", "-Werror=double-promotion"))
    except RuntimeError as e:
        raise MetalShimError(f"the generated Metal source did not compile: {e}") from None


def _host(a: mx.array) -> np.ndarray:
    """An input's bytes in row-major order (MLX's ensure_row_contiguous)."""
    if a.dtype in (mx.bfloat16, mx.float16):
        return np.ascontiguousarray(np.array(a.view(mx.uint16)))
    return np.ascontiguousarray(np.array(a), dtype=_type(a.dtype)[1])


def _device(h: np.ndarray, dtype) -> mx.array:
    return mx.array(h).view(dtype) if dtype in (mx.bfloat16, mx.float16) else mx.array(h)


def metal_kernel(name: str, input_names: list[str], output_names: list[str], source: str, header: str = "",
                 ensure_row_contiguous: bool = True, atomic_outputs: bool = False):
    """A stand-in for `mx.fast.metal_kernel` that runs on the CPU (see the module docstring)."""
    if atomic_outputs:
        raise MetalShimError(f"{name}: atomic outputs need threads that run together")
    if not output_names:
        raise MetalShimError(f"{name}: a kernel needs at least one output")

    def call(inputs, output_shapes, output_dtypes, grid, threadgroup, template=None, init_value=None,
             verbose=False, stream=None):
        template = list(template or [])
        if len(inputs) != len(input_names) or len(output_shapes) != len(output_names) \
                or len(output_dtypes) != len(output_names):
            raise MetalShimError(f"{name}: {len(input_names)} inputs and {len(output_names)} outputs expected, got "
                                 f"{len(inputs)} inputs, {len(output_shapes)} shapes, {len(output_dtypes)} dtypes")
        if int(np.prod(threadgroup)) > MAX_THREADGROUP:
            raise MetalShimError(f"{name}: threadgroup {tuple(threadgroup)} exceeds {MAX_THREADGROUP} threads")
        inputs = [mx.array(a) if not isinstance(a, mx.array) else a for a in inputs]
        kname, text, attrs = metal_source(name, input_names, output_names, source, header, inputs, output_dtypes,
                                          template)
        if verbose:
            print(f"Generated source code for `{name}`:\n```\n{text}\n```")
        lib = build(PRELUDE + text + _launcher(kname, template, input_names, inputs, source, output_dtypes, attrs))
        extra = {  # row-contiguous strides, in elements
            "_shape": lambda a: np.array(a.shape, dtype=np.int32),
            "_strides": lambda a: np.array([int(np.prod(a.shape[i + 1:])) for i in range(a.ndim)], dtype=np.int64),
            "_ndim": lambda a: np.array([a.ndim], dtype=np.int32),
        }
        buffers = []
        for n, a in zip(input_names, inputs):
            buffers.append(_host(a))
            buffers += [extra[suffix](a) for suffix, _, _ in _shape_params(n, a, source)]
        outs = []
        for shape, dtype in zip(output_shapes, output_dtypes):
            outs.append(np.zeros(tuple(shape), dtype=_type(dtype)[1]) if init_value is None
                        else _host(mx.full(tuple(shape), init_value, dtype=dtype)))
        buffers += outs
        ptrs = (ctypes.c_void_p * len(buffers))(*[b.ctypes.data for b in buffers])
        group = [min(t, g) for t, g in zip(threadgroup, grid)]  # MLX clamps the threadgroup to the grid
        lib.dg_launch(ptrs, (ctypes.c_uint * 3)(*grid), (ctypes.c_uint * 3)(*group))
        return [_device(h, d) for h, d in zip(outs, output_dtypes)]

    return call

