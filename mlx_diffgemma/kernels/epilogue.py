"""The fused LM-head epilogue: soft-cap, temperature, per-row max / log-sum-exp / entropy / argmax,
top-k, and an inverse-CDF sample from the shared noise, without any fp32 [rows, vocab] temporary.

Input is the raw head output `h @ E^T` [R, V] in the model dtype. The work is split in two
barrier-free kernels so that one source body runs unchanged on every target:

1. `partials`: one thread per (row, chunk of the vocabulary): running max, sum of exp, sum of
   exp * y (for the entropy), argmax and the chunk's top-k.
2. `merge`: one thread per row: combines the chunks, then walks the chunk masses to find the
   sample's chunk and rescans only that chunk.

The bodies are written once (`_PARTIALS`, `_MERGE`) against a few macros and wrapped three ways:
Metal (`mx.fast.metal_kernel`), CUDA (`mx.fast.cuda_kernel`), and plain C++ (kernels/shim.py,
which compiles the very same text with g++ so the logic is executed on this CPU). The plain-mx
`epilogue_reference` below is the CPU path and the reference every variant is checked against.
"""

from __future__ import annotations

import math

import mlx.core as mx

NEG_BIG = "(-3.0e38f)"

_PARTIALS = """
    const uint tid = TID;
    const int V = meta[0], CH = meta[1], NC = meta[2], R = meta[3];
    if (tid >= (uint)(R * NC)) return;
    const int row = (int)tid / NC, c = (int)tid % NC;
    const float cap = fmeta[0], inv_t = fmeta[1];
    const int lo = c * CH, hi = IMIN(lo + CH, V);
    float m = NEG_BIG, s = 0.0f, t = 0.0f;
    int am = lo;
    float kv[K];
    int ki[K];
    for (int j = 0; j < K; ++j) { kv[j] = NEG_BIG; ki[j] = -1; }
    float kmin = NEG_BIG;
    int kpos = 0;
    for (int i = lo; i < hi; ++i) {
        const float y = cap * TANHF(KFLOAT(x[(long)row * V + i]) / cap) * inv_t;
        if (y > m) {
            const float r = EXPF(m - y);  // rescale the running sums to the new max
            s *= r; t *= r; m = y; am = i;
        }
        const float e = EXPF(y - m);
        s += e; t += e * y;
        if (y > kmin) {
            kv[kpos] = y; ki[kpos] = i;
            kmin = kv[0]; kpos = 0;
            for (int j = 1; j < K; ++j) { if (kv[j] < kmin) { kmin = kv[j]; kpos = j; } }
        }
    }
    part_m[tid] = m; part_s[tid] = s; part_t[tid] = t; part_am[tid] = am;
    for (int j = 0; j < K; ++j) { part_kv[tid * K + j] = kv[j]; part_ki[tid * K + j] = ki[j]; }
"""

_MERGE = """
    const uint row = TID;
    const int V = meta[0], CH = meta[1], NC = meta[2], R = meta[3];
    if (row >= (uint)R) return;
    const float cap = fmeta[0], inv_t = fmeta[1];
    const int base = (int)row * NC;
    float M = NEG_BIG;
    int am = 0;
    for (int c = 0; c < NC; ++c) { if (part_m[base + c] > M) { M = part_m[base + c]; am = part_am[base + c]; } }
    float S = 0.0f, T = 0.0f;
    for (int c = 0; c < NC; ++c) {
        const float w = EXPF(part_m[base + c] - M);
        S += part_s[base + c] * w; T += part_t[base + c] * w;
    }
    const float lse = M + LOGF(S);
    out_argmax[row] = am;
    out_lse[row] = lse;
    out_entropy[row] = lse - T / S;

    // inverse CDF: the first token whose cumulative mass exceeds u * total
    const float target = u[row] * S;
    float acc = 0.0f;
    int pick = V - 1;
    for (int c = 0; c < NC; ++c) {
        const float w = part_s[base + c] * EXPF(part_m[base + c] - M);
        if (acc + w <= target && c < NC - 1) { acc += w; continue; }
        const int lo = c * CH, hi = IMIN(lo + CH, V);
        pick = hi - 1;  // round-off past the chunk's end stays in the chunk
        for (int i = lo; i < hi; ++i) {
            acc += EXPF(cap * TANHF(KFLOAT(x[(long)row * V + i]) / cap) * inv_t - M);
            if (acc > target) { pick = i; break; }
        }
        break;
    }
    out_sample[row] = pick;

    // top-k of the chunks' top-k, in descending order (ties: lower id first)
    float last_v = 3.0e38f;
    int last_i = -1;
    for (int j = 0; j < K; ++j) {
        float best_v = NEG_BIG;
        int best_i = -1;
        for (int q = 0; q < NC * K; ++q) {
            const float v = part_kv[base * K + q];
            const int i = part_ki[base * K + q];
            if (i < 0) continue;
            const bool after_last = (v < last_v) || (v == last_v && i > last_i);
            const bool better = (v > best_v) || (v == best_v && i < best_i);
            if (after_last && better) { best_v = v; best_i = i; }
        }
        out_topk_v[row * K + j] = best_v;
        out_topk_i[row * K + j] = best_i;
        last_v = best_v; last_i = best_i;
    }
"""

PARTIALS_INPUTS = ["x", "meta", "fmeta"]
PARTIALS_OUTPUTS = ["part_m", "part_s", "part_t", "part_am", "part_kv", "part_ki"]
MERGE_INPUTS = ["x", "meta", "fmeta", "u", "part_m", "part_s", "part_t", "part_am", "part_kv", "part_ki"]
MERGE_OUTPUTS = ["out_argmax", "out_lse", "out_entropy", "out_sample", "out_topk_v", "out_topk_i"]

_METAL_MACROS = {
    "TID": "thread_position_in_grid.x",
    "KFLOAT(v)": "static_cast<float>(v)",
    "EXPF": "metal::exp",
    "LOGF": "metal::log",
    "TANHF": "metal::precise::tanh",
    "IMIN(a, b)": "metal::min(a, b)",
    "NEG_BIG": NEG_BIG,
}
_CUDA_MACROS = {
    "uint": "unsigned int",  # a Metal type name the bodies use; NVRTC does not know it (seen on an H100)
    "TID": "cooperative_groups::this_grid().thread_rank()",
    "KFLOAT(v)": "static_cast<float>(v)",
    "EXPF": "expf",
    "LOGF": "logf",
    "TANHF": "tanhf",
    "IMIN(a, b)": "min(a, b)",
    "NEG_BIG": NEG_BIG,
}


def macro_header(macros: dict) -> str:
    return "".join(f"#define {k} {v}\n" for k, v in macros.items())


def source(body: str, macros: dict) -> str:
    """A body with its dialect's macros defined in front (MLX puts `source` inside the function)."""
    return macro_header(macros) + body + "".join(f"#undef {k.split('(')[0]}\n" for k in macros)


def chunking(V: int, rows: int, chunk: int | None = None) -> tuple[int, int]:
    """Chunk size and count: enough (row, chunk) threads to fill a GPU, chunks of >= 256 tokens."""
    if chunk is None:
        chunk = max(256, 1 << math.ceil(math.log2(max(1, V * rows // 16384))))
    return chunk, -(-V // chunk)


_KERNELS: dict = {}


def _gpu_kernels(target: str):
    if target not in _KERNELS:
        make = mx.fast.metal_kernel if target == "metal" else mx.fast.cuda_kernel
        macros = _METAL_MACROS if target == "metal" else _CUDA_MACROS
        _KERNELS[target] = (
            make(name="dg_head_partials", input_names=PARTIALS_INPUTS, output_names=PARTIALS_OUTPUTS,
                 source=source(_PARTIALS, macros)),
            make(name="dg_head_merge", input_names=MERGE_INPUTS, output_names=MERGE_OUTPUTS,
                 source=source(_MERGE, macros)),
        )
    return _KERNELS[target]


def epilogue_kernel(raw: mx.array, cap: float, temperature: float, uniforms: mx.array, k: int,
                    target: str, chunk: int | None = None):
    """Run the Metal or CUDA kernels. raw [R, V]; uniforms [R]. Same outputs as the reference."""
    R, V = raw.shape
    CH, NC = chunking(V, R, chunk)
    meta = mx.array([V, CH, NC, R], dtype=mx.int32)
    fmeta = mx.array([cap, 1.0 / float(temperature)], dtype=mx.float32)
    partials, merge = _gpu_kernels(target)
    n = R * NC
    parts = partials(
        inputs=[raw, meta, fmeta], template=[("K", k)], grid=(n, 1, 1), threadgroup=(min(256, n), 1, 1),
        output_shapes=[(n,)] * 4 + [(n * k,)] * 2,
        output_dtypes=[mx.float32, mx.float32, mx.float32, mx.int32, mx.float32, mx.int32],
    )
    out = merge(
        inputs=[raw, meta, fmeta, uniforms.astype(mx.float32)] + list(parts), template=[("K", k)],
        grid=(R, 1, 1), threadgroup=(min(256, R), 1, 1),
        output_shapes=[(R,), (R,), (R,), (R,), (R, k), (R, k)],
        output_dtypes=[mx.int32, mx.float32, mx.float32, mx.int32, mx.float32, mx.int32],
    )
    argmax, lse, entropy, sample, top_v, top_i = out
    return argmax, entropy, lse, sample, top_i, top_v


def epilogue_reference(raw: mx.array, cap: float, temperature: float, uniforms: mx.array, k: int):
    """Plain-mx reference (the CPU path). raw [R, V]; uniforms [R].
    Returns (argmax, entropy, lse, sample, topk_ids, topk_values) with values = tempered logits."""
    y = cap * mx.tanh(raw.astype(mx.float32) / cap) * (1.0 / float(temperature))
    lse = mx.logsumexp(y, axis=-1)
    p = mx.exp(y - lse[:, None])
    entropy = lse - (p * y).sum(axis=-1)
    cdf = mx.cumsum(p, axis=-1)
    target = uniforms.astype(mx.float32) * cdf[:, -1]
    sample = mx.minimum((cdf <= target[:, None]).sum(axis=-1), y.shape[-1] - 1)
    k = min(k, y.shape[-1])
    ids = mx.sort(mx.argpartition(-y, kth=k - 1, axis=-1)[:, :k], axis=-1)  # ascending ids, then by value
    ids = mx.take_along_axis(ids, mx.argsort(-mx.take_along_axis(y, ids, axis=-1), axis=-1), axis=-1)
    return (mx.argmax(y, axis=-1).astype(mx.int32), entropy, lse, sample.astype(mx.int32), ids.astype(mx.int32),
            mx.take_along_axis(y, ids, axis=-1))


def gpu_target() -> str | None:
    """'metal' or 'cuda' when the default device is a GPU of that kind, else None."""
    if mx.default_device().type != mx.DeviceType.gpu:
        return None
    if mx.metal.is_available():
        return "metal"
    if hasattr(mx, "cuda") and mx.cuda.is_available():
        return "cuda"
    return None
