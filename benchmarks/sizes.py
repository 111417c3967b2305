"""Named checkpoint sizes and what each one is run with.

`full-slice` has the real 26B-A4B widths (hidden 2816, 16 heads, 128 experts x 704, top-8, dense
MLP 2112, vocab 262144) with only a few layers: it prices one layer and the head. `full` is all
30 layers (an accelerator with ~60 GB for bf16 weights).
"""

from __future__ import annotations

S, F = "sliding_attention", "full_attention"

_REAL = dict(
    hidden_size=2816, intermediate_size=2112, num_attention_heads=16, num_key_value_heads=8,
    head_dim=256, global_head_dim=512, num_global_key_value_heads=2, sliding_window=1024,
    num_experts=128, top_k_experts=8, moe_intermediate_size=704, vocab_size=262144,
)

SIZES = {
    "tiny": dict(
        text=dict(
            hidden_size=128, intermediate_size=256, num_hidden_layers=6, num_attention_heads=4,
            num_key_value_heads=2, head_dim=32, global_head_dim=64, num_global_key_value_heads=1,
            sliding_window=128, num_experts=8, top_k_experts=2, moe_intermediate_size=64, vocab_size=1024,
        ),
        canvas_length=256,
    ),
    "small": dict(
        text=dict(
            hidden_size=1024, intermediate_size=1024, num_hidden_layers=6, num_attention_heads=8,
            num_key_value_heads=4, head_dim=128, global_head_dim=256, num_global_key_value_heads=1,
            sliding_window=512, num_experts=16, top_k_experts=4, moe_intermediate_size=256, vocab_size=32768,
        ),
        canvas_length=256,
    ),
    # one sliding + one full layer would double the transformers process (it builds encoder and
    # decoder layers before tying): one full-attention layer fits a shared 24 GB machine in fp32
    "full-slice": dict(text=dict(_REAL, num_hidden_layers=1, layer_types=[F]), canvas_length=256),
    "full": dict(
        text=dict(_REAL, num_hidden_layers=30, layer_types=[S, S, S, S, S, F] * 5),
        canvas_length=256,
    ),
}

# How each size is run: prefix lengths for the step measurement, canvases per generate run,
# warm-up and timed steps. 8k prefixes only where a step stays cheap.
PLANS = {
    "tiny": dict(prefixes=[128, 1024, 8192], canvases=1, warmup=2, repeats=3, gen_repeats=1, ar_tokens=256),
    "small": dict(
        prefixes=[128, 1024, 8192], canvases=1, warmup=1, repeats=2, gen_repeats=1, ar_tokens=64,
        adaptive=False,
        adaptive_skip_reason="not run on this CPU: random weights never stop early, so it is 48 full steps "
        "per canvas (3x generate-16) for every system",
    ),
    "full-slice": dict(
        prefixes=[128, 1024], canvases=1, warmup=1, repeats=2, gen_repeats=1, ar_tokens=16,
        skip_reason="8k prefix not run on this CPU: a full-width fp32 step is ~0.86 TFLOP (~20 s on one "
        "core here) and an 8k prefill at these widths adds minutes per system on a shared machine",
        generate=False,
        generate_skip_reason="not run on this CPU: a 16-step canvas is ~5+ min per system here; its "
        "committed tokens/s = 256 / (16 x step@128 time)",
    ),
    "full": dict(prefixes=[128, 1024, 8192], canvases=2, warmup=2, repeats=5, gen_repeats=1, ar_tokens=128),
}

# On an NVIDIA GPU (benchmarks/gpu.sh): every scenario at the real widths, bf16.
GPU_PLANS = {
    "small": dict(prefixes=[128, 1024, 8192], canvases=2, warmup=2, repeats=5, gen_repeats=1, ar_tokens=128),
    "full-slice": dict(prefixes=[128, 1024, 8192], canvases=2, warmup=2, repeats=5, gen_repeats=1, ar_tokens=128),
    "full": dict(prefixes=[128, 1024, 8192], canvases=1, warmup=2, repeats=3, gen_repeats=1, ar_tokens=64),
}
SMOKE_PLAN = dict(prefixes=[128], canvases=1, warmup=1, repeats=1, ar_tokens=8, gemm_n=512)


def text_config(size: str) -> dict:
    if size not in SIZES:
        raise KeyError(f"unknown size {size!r}; choose from {', '.join(SIZES)}")
    text = dict(SIZES[size]["text"])
    n = text["num_hidden_layers"]
    text.setdefault("layer_types", [S if (i + 1) % 6 else F for i in range(n)][:-1] + [F])
    text.setdefault("max_position_embeddings", 131072)
    text.setdefault("initializer_range", 0.02)
    return text
