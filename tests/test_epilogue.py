"""The fused LM-head epilogue: its plain-mx fallback against numpy, its kernel bodies executed on
the CPU through the C++ shim against the fallback, and the self-check that guards the GPU path."""

import warnings

import mlx.core as mx
import numpy as np
import pytest

from mlx_diffgemma.kernels import epilogue, lm_head_epilogue, metal_shim, registry, shim


def numpy_epilogue(raw, cap, T, u, k):
    y = (cap * np.tanh(raw.astype(np.float64) / cap)) / T
    m = y.max(-1, keepdims=True)
    p = np.exp(y - m)
    s = p.sum(-1, keepdims=True)
    p /= s
    lse = (m + np.log(s))[:, 0]
    cdf = np.cumsum(p, -1)
    sample = np.minimum((cdf <= u[:, None] * cdf[:, -1:]).sum(-1), raw.shape[1] - 1)
    order = np.argsort(-y, axis=-1, kind="stable")[:, :k]
    return y.argmax(-1), lse - (p * y).sum(-1), lse, sample, order, np.take_along_axis(y, order, -1)


def assert_matches_fallback(got, ref):
    """A kernel's (argmax, entropy, lse, sample, top-k ids, top-k values) against the fallback's:
    the integer outputs exact, the float ones within fp32 reassociation."""
    got, ref = [np.array(a) for a in got], [np.array(a) for a in ref]
    assert (got[0] == ref[0]).all() and (got[3] == ref[3]).all() and (got[4] == ref[4]).all()
    np.testing.assert_allclose(got[1], ref[1], rtol=1e-3, atol=1e-3)
    np.testing.assert_allclose(got[2], ref[2], rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(got[5], ref[5], rtol=1e-5, atol=1e-5)


@pytest.fixture
def inputs():
    rng = np.random.default_rng(0)
    raw = (rng.normal(size=(7, 2500)) * 25).astype(np.float32)
    return raw, rng.random(7).astype(np.float32)


def test_fallback_matches_numpy(inputs):
    raw, u = inputs
    got = [np.array(a) for a in epilogue.epilogue_reference(mx.array(raw), 30.0, 0.6, mx.array(u), 16)]
    ref = numpy_epilogue(raw, 30.0, 0.6, u, 16)
    assert (got[0] == ref[0]).all()
    np.testing.assert_allclose(got[1], ref[1], rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(got[2], ref[2], rtol=1e-5)
    assert (got[3] == ref[3]).mean() >= 6 / 7  # fp32 vs fp64 cumsum may differ at a boundary
    assert (got[4] == ref[4]).all()
    np.testing.assert_allclose(got[5], ref[5], rtol=1e-5)


@pytest.mark.skipif(not shim.compiler_available(), reason="needs g++")
@pytest.mark.parametrize("chunk", [64, 256, 2500, None])
def test_kernel_bodies_on_cpu_match_the_fallback(inputs, chunk):
    raw, u = inputs
    got = shim.epilogue_cpu(raw, 30.0, 0.6, u, 16, chunk=chunk)
    assert_matches_fallback(got, epilogue.epilogue_reference(mx.array(raw), 30.0, 0.6, mx.array(u), 16))


@pytest.mark.skipif(not shim.compiler_available(), reason="needs g++")
def test_kernel_bodies_edge_cases():
    # one row whose mass sits on the last token, one flat row, a vocabulary not a multiple of the chunk
    raw = np.full((3, 1001), -200.0, dtype=np.float32)
    raw[0, -1] = 200.0
    raw[1] = 0.0
    raw[2] = np.linspace(-5, 5, 1001)
    u = np.array([0.999999, 0.5, 0.0], dtype=np.float32)
    got = shim.epilogue_cpu(raw, 30.0, 1.0, u, 4, chunk=128)
    assert got[0][0] == 1000 and got[3][0] == 1000
    assert abs(got[1][1] - np.log(1001)) < 1e-3  # uniform: entropy = log V
    assert got[3][1] == 500  # the median of a flat row
    assert got[3][2] == 0 and got[0][2] == 1000


def test_epilogue_on_this_device_matches_the_fallback(inputs):
    raw, u = inputs
    a = lm_head_epilogue(mx.array(raw), 30.0, 0.6, mx.array(u), 8)
    b = epilogue.epilogue_reference(mx.array(raw), 30.0, 0.6, mx.array(u), 8)
    if epilogue.gpu_target() is None:  # the CPU path is the fallback itself
        for x, y in zip(a, b):
            assert (np.array(x) == np.array(y)).all()
    else:  # a GPU runs its kernel: the registry's own tolerances (MLX_DIFFGEMMA_TEST_DEVICE=gpu)
        assert registry.KERNELS["lm_head_epilogue"].check(a, b) is None


class FakeGPU:
    """Pretend a GPU target exists and install a fast kernel with a chosen failure."""

    def __init__(self, monkeypatch, tmp_path, behaviour):
        self.calls = 0
        monkeypatch.setattr(epilogue, "gpu_target", lambda: "fake")
        monkeypatch.setenv("MLX_DIFFGEMMA_CACHE_DIR", str(tmp_path))
        monkeypatch.delenv("MLX_DIFFGEMMA_KERNELS", raising=False)
        kernel = registry.KERNELS["lm_head_epilogue"]

        def fast(target, *args):
            self.calls += 1
            if behaviour == "raises":
                raise RuntimeError("kernel launch failed")
            if behaviour == "compile":
                raise ValueError("[metal::Device] Unable to build metal library from source\nerror: ...")
            out = list(kernel.fallback(*args))
            if behaviour == "wrong":
                out[0] = out[0] + 1
            return tuple(out)

        monkeypatch.setattr(kernel, "fast", fast)
        registry.reset()


@pytest.mark.parametrize("behaviour", ["raises", "wrong", "compile"])
def test_bad_kernels_fall_back_warn_once_and_give_fallback_output(monkeypatch, tmp_path, inputs, behaviour):
    fake = FakeGPU(monkeypatch, tmp_path, behaviour)
    raw, u = mx.array(inputs[0]), mx.array(inputs[1])
    ref = epilogue.epilogue_reference(raw, 30.0, 0.6, u, 8)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        outs = [lm_head_epilogue(raw, 30.0, 0.6, u, 8) for _ in range(3)]
    ours = [w for w in caught if "lm_head_epilogue" in str(w.message)]
    assert len(ours) == 1, [str(w.message) for w in caught]
    for out in outs:
        for x, y in zip(out, ref):
            assert (np.array(x) == np.array(y)).all()
    assert fake.calls == 1  # checked once, never trusted afterwards
    verdicts = registry._load_verdicts()[registry.device_key()]["lm_head_epilogue"]
    assert verdicts["ok"] is False
    # the verdict is cached: a new process (simulated by reset) does not run the kernel again
    registry.reset()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        lm_head_epilogue(raw, 30.0, 0.6, u, 8)
    assert fake.calls == 1
    registry.reset()


def test_good_kernel_is_used_and_env_forces_fallback_or_recheck(monkeypatch, tmp_path, inputs):
    fake = FakeGPU(monkeypatch, tmp_path, "good")
    raw, u = mx.array(inputs[0]), mx.array(inputs[1])
    lm_head_epilogue(raw, 30.0, 0.6, u, 8)
    assert fake.calls == 2  # the check, then the call itself
    monkeypatch.setenv("MLX_DIFFGEMMA_KERNELS", "fallback")
    lm_head_epilogue(raw, 30.0, 0.6, u, 8)
    assert fake.calls == 2
    monkeypatch.setenv("MLX_DIFFGEMMA_KERNELS", "recheck")
    registry.reset()
    lm_head_epilogue(raw, 30.0, 0.6, u, 8)
    assert fake.calls == 4
    registry.reset()


def test_gpu_sources_share_the_body():
    metal = epilogue.source(epilogue._PARTIALS, epilogue._METAL_MACROS)
    cuda = epilogue.source(epilogue._PARTIALS, epilogue._CUDA_MACROS)
    cpp = shim.cpp_source(8)
    for text in (metal, cuda, cpp):
        assert epilogue._PARTIALS in text
    assert "thread_position_in_grid" in metal and "this_grid().thread_rank()" in cuda


def test_cuda_twins_compile_with_nvrtc():
    # the translation units MLX's cuda_kernel would build, compiled by NVRTC for sm_90 (no GPU needed);
    # without the `uint` macro they fail exactly as on an H100 (2026-11-27)
    from mlx_diffgemma.kernels import nvrtc

    found = nvrtc.find_nvrtc()
    if found is None:
        pytest.skip("NVRTC wheels not installed (the test extra installs them on Linux x86-64)")
    if not nvrtc.headers_complete(found[1]):  # e.g. torch's CUDA wheels on a GPU image: no CCCL
        pytest.skip(f"CUDA headers without CCCL's <nv/target> in {found[1]}")
    for dtype in ("float32", "bfloat16"):
        for name, unit in nvrtc.epilogue_units(dtype).items():
            ok, log = nvrtc.compile_check(unit, name + ".cu")
            assert ok, f"{name} ({dtype}): {log}"
    metal_only = {k: v for k, v in epilogue._CUDA_MACROS.items() if k != "uint"}
    name, unit = next(iter(nvrtc.epilogue_units("float32", macros=metal_only).items()))
    ok, log = nvrtc.compile_check(unit, name + ".cu")
    assert not ok and 'identifier "uint" is undefined' in log


@pytest.mark.skipif(not metal_shim.compiler_available(), reason="needs g++")
@pytest.mark.parametrize("dtype, rows, chunk", [(mx.float32, 3, 128), (mx.float32, 20, None), (mx.bfloat16, 7, 256)])
def test_metal_wrapper_runs_through_the_metal_shim(monkeypatch, dtype, rows, chunk):
    # the production wrapper (macros, template K, input/output lists, dtypes, shapes, grid) with
    # mx.fast.metal_kernel replaced by the shim: MLX's generated Metal source, compiled by g++ and
    # run thread by thread; 3 rows put `u` in the constant address space, as MLX does below 8 elements
    rng = np.random.default_rng(rows)
    raw = mx.array((rng.normal(size=(rows, 1000)) * 25).astype(np.float32)).astype(dtype)
    u = mx.array(rng.random(rows).astype(np.float32))
    monkeypatch.setattr(mx.fast, "metal_kernel", metal_shim.metal_kernel)
    monkeypatch.setattr(epilogue, "_KERNELS", {})
    got = epilogue.epilogue_kernel(raw, 30.0, 0.6, u, 16, target="metal", chunk=chunk)
    assert_matches_fallback(got, epilogue.epilogue_reference(raw, 30.0, 0.6, u, 16))


@pytest.mark.skipif(not metal_shim.compiler_available(), reason="needs g++")
def test_metal_shim_rejects_what_metal_would():
    x = mx.arange(16, dtype=mx.float32)

    def run(body, grid=(16, 1, 1)):
        k = metal_shim.metal_kernel("probe", ["x"], ["y"], body)
        return np.array(k(inputs=[x], template=[("K", 2)], grid=grid, threadgroup=(8, 1, 1),
                          output_shapes=[(16,)], output_dtypes=[mx.float32])[0])

    good = "const uint i = thread_position_in_grid.x; y[i] = x[i] * K;"
    assert (run(good) == np.arange(16) * 2).all()
    assert (run(good, grid=(8, 1, 1))[8:] == 0).all()  # the grid is what runs, nothing more
    shaped = "const uint i = thread_position_in_grid.x; y[i] = x[i] * x_ndim + x_shape[0] + x_strides[0];"
    assert (run(shaped) == np.arange(16) + 16 + 1).all()  # MLX's extra parameters, in its order
    with pytest.raises(metal_shim.MetalShimError, match="thread_positon_in_grid"):  # an attribute MLX never declares
        run("const uint i = thread_positon_in_grid.x; y[i] = x[i];")
    with pytest.raises(metal_shim.MetalShimError, match="cooperative_groups"):  # the CUDA twin's macros
        run(epilogue.macro_header(epilogue._CUDA_MACROS) + "const uint i = TID; y[i] = x[i];")
    with pytest.raises(metal_shim.MetalShimError, match="double"):  # no double in Metal; fp64 in the CUDA twin
        run("const uint i = thread_position_in_grid.x; y[i] = x[i] * 0.5;")
    with pytest.raises(metal_shim.MetalShimError, match="simd"):  # needs threads that run together
        run("const uint i = thread_index_in_simdgroup; y[i] = x[i];")
