"""Peak memory and throughput of the converter on a synthetic full-width checkpoint.

Writes a random bf16 DiffusionGemma checkpoint with the real widths (hidden 2816, 128 experts x
704, vocab 262144, dense 2112) but only a few layers, tensor by tensor (this script never holds
more than one chunk in memory either), sharded like the hub checkpoint and with a small vision
tower and the encoder's duplicate layer scalars. Then converts it in a fresh subprocess per recipe
and records that process's peak RSS (getrusage(RUSAGE_SELF) inside the child) and the throughput. Deletes the
checkpoint and the outputs afterwards.

    python benchmarks/convert_memory.py [--layers 3] [--recipes none,mixed] [--workdir /tmp]

Results: benchmarks/results/convert_memory.{json,md} (--name changes the stem).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # it runs as a script, from anywhere
from benchmarks.checkpoints import shard_groups  # noqa: E402
from mlx_diffgemma.files import write_text_atomic  # noqa: E402

RESULTS = ROOT / "benchmarks" / "results"
SHARD_BYTES = 2 * 10**9  # source shard size, like the hub's ~2-5 GB shards

TEXT = dict(
    vocab_size=262144, hidden_size=2816, intermediate_size=2112, num_attention_heads=16,
    num_key_value_heads=8, head_dim=256, global_head_dim=512, num_global_key_value_heads=2,
    sliding_window=1024, num_experts=128, top_k_experts=8, moe_intermediate_size=704,
    rms_norm_eps=1e-6, final_logit_softcapping=30.0, max_position_embeddings=262144,
)


def tensor_shapes(layers: int) -> dict[str, tuple]:
    """HF names and shapes of a `layers`-layer checkpoint (last layer full attention, as the model forces)."""
    H, I, E, M, V = 2816, 2112, 128, 704, 262144
    d = "model.decoder."
    shapes = {d + "embed_tokens.weight": (V, H), d + "norm.weight": (H,)}
    for name in ("gate_proj", "up_proj"):
        shapes[d + f"self_conditioning.{name}.weight"] = (I, H)
    shapes[d + "self_conditioning.down_proj.weight"] = (H, I)
    shapes[d + "self_conditioning.pre_norm.weight"] = (H,)
    for i in range(layers):
        full = i == layers - 1 or (i + 1) % 6 == 0
        hd, kv = (512, 2) if full else (256, 8)
        p = d + f"layers.{i}."
        shapes[p + "self_attn.q_proj.weight"] = (16 * hd, H)
        shapes[p + "self_attn.k_proj.weight"] = (kv * hd, H)
        if not full:
            shapes[p + "self_attn.v_proj.weight"] = (kv * hd, H)
        shapes[p + "self_attn.o_proj.weight"] = (H, 16 * hd)
        shapes[p + "self_attn.q_norm.weight"] = (hd,)
        shapes[p + "self_attn.k_norm.weight"] = (hd,)
        for n in ("gate_proj", "up_proj"):
            shapes[p + f"mlp.{n}.weight"] = (I, H)
        shapes[p + "mlp.down_proj.weight"] = (H, I)
        shapes[p + "router.proj.weight"] = (E, H)
        shapes[p + "router.scale"] = (H,)
        shapes[p + "router.per_expert_scale"] = (E,)
        shapes[p + "experts.gate_up_proj"] = (E, 2 * M, H)
        shapes[p + "experts.down_proj"] = (E, H, M)
        for n in ("input_layernorm", "post_attention_layernorm", "pre_feedforward_layernorm",
                  "post_feedforward_layernorm_1", "pre_feedforward_layernorm_2",
                  "post_feedforward_layernorm_2", "post_feedforward_layernorm"):
            shapes[p + f"{n}.weight"] = (H,)
        shapes[p + "layer_scalar"] = (1,)
        shapes[f"model.encoder.language_model.layers.{i}.layer_scalar"] = (1,)
    shapes["model.encoder.vision_tower.patch_embedder.input_proj.weight"] = (1152, 768)
    shapes["model.encoder.embed_vision.embedding_projection.weight"] = (H, 1152)
    return shapes


def _bf16(x: np.ndarray) -> np.ndarray:
    return (x.astype(np.float32).view(np.uint32) >> 16).astype(np.uint16)  # truncation is fine for noise


def _fill(name: str, shape: tuple, rng):  # yields uint16 chunks
    rows = int(np.prod(shape[:-1])) if len(shape) > 1 else 1
    cols = shape[-1]
    if name.endswith("layer_scalar"):
        yield _bf16(np.array([0.75], np.float32))  # decoder and encoder copies agree
        return
    if len(shape) == 1:
        yield _bf16(rng.uniform(0.5, 1.5, cols).astype(np.float32))
        return
    pool = _pool(rng)
    step = max(1, pool.size // 2 // cols)
    for r0 in range(0, rows, step):
        n = min(step, rows - r0) * cols
        start = int(rng.integers(0, pool.size // 2))  # a random window of the pool: cheap, never constant
        yield pool[start : start + n]


_POOL = []


def _pool(rng) -> np.ndarray:
    # drawing 3e9 normals takes minutes on 2 shared cores; the converter's speed does not depend on
    # the values, so chunks are windows of one 64 MB pool of bf16 normals
    if not _POOL:
        _POOL.append(_bf16(rng.standard_normal(32 * 2**20, dtype=np.float32) * 0.02))
    return _POOL[0]


def write_checkpoint(out: Path, layers: int, seed: int = 0) -> int:
    """Sharded bf16 safetensors + index + config, written chunk by chunk. Returns total bytes."""
    rng = np.random.default_rng(seed)
    shapes = tensor_shapes(layers)
    groups = shard_groups({name: int(np.prod(shape)) * 2 for name, shape in shapes.items()}, SHARD_BYTES)
    weight_map, total = {}, 0
    for i, names in enumerate(groups):
        fname = f"model-{i + 1:05d}-of-{len(groups):05d}.safetensors"
        header, offset = {"__metadata__": {"format": "pt"}}, 0
        for name in names:
            n = int(np.prod(shapes[name])) * 2
            header[name] = {"dtype": "BF16", "shape": list(shapes[name]), "data_offsets": [offset, offset + n]}
            offset += n
            weight_map[name] = fname
        text = json.dumps(header).encode()
        text += b" " * (-(8 + len(text)) % 8)
        with open(out / fname, "wb") as f:
            f.write(len(text).to_bytes(8, "little"))
            f.write(text)
            for name in names:
                for chunk in _fill(name, shapes[name], rng):
                    f.write(chunk.tobytes())
        total += offset
    (out / "model.safetensors.index.json").write_text(
        json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2)
    )
    config = {
        "model_type": "diffusion_gemma", "architectures": ["DiffusionGemmaForBlockDiffusion"],
        "canvas_length": 256, "eos_token_id": [1, 106], "dtype": "bfloat16",
        "text_config": {**TEXT, "num_hidden_layers": layers, "model_type": "diffusion_gemma_text"},
        "vision_config": {"hidden_size": 1152},
    }
    (out / "config.json").write_text(json.dumps(config, indent=2))
    return total


CHILD = """
import json, resource, sys, time
from mlx_diffgemma.convert import convert
t = time.perf_counter()
convert(sys.argv[1], sys.argv[2], recipe=None if sys.argv[3] == "none" else sys.argv[3], force=True,
        log=lambda m: print(m, file=sys.stderr, flush=True))
print(json.dumps({"seconds": time.perf_counter() - t,
                  "peak_rss_kb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss}))
"""


def run_recipe(src: Path, out: Path, recipe: str) -> dict:
    t = time.perf_counter()
    r = subprocess.run([sys.executable, "-c", CHILD, str(src), str(out), recipe], capture_output=True, text=True)
    wall = time.perf_counter() - t
    if r.returncode:
        raise SystemExit(f"conversion with recipe {recipe} failed:\n{r.stderr}")
    child = json.loads(r.stdout.strip().splitlines()[-1])
    inner, peak_kb = child["seconds"], child["peak_rss_kb"]  # the child's own high-water mark (Linux: KiB)
    out_bytes = sum(p.stat().st_size for p in out.glob("*.safetensors"))
    return {"recipe": recipe, "peak_rss_gb": peak_kb * 1024 / 1e9, "seconds": inner, "wall_seconds": wall,
            "out_gb": out_bytes / 1e9, "log": r.stderr.strip().splitlines()[-1]}


def disk_write_mb_s(work: Path, size: int = 2**30) -> float:
    """Sequential write speed of the output filesystem (1 GiB, fsync'd): the bound for an unquantized copy."""
    block = np.ones(64 * 2**20, np.uint8)
    t = time.perf_counter()
    with open(work / "probe", "wb") as f:
        for _ in range(size // block.size):
            f.write(block)
        f.flush()
        os.fsync(f.fileno())
    seconds = time.perf_counter() - t
    (work / "probe").unlink()
    return size / 1e6 / seconds


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--layers", type=int, default=3)
    ap.add_argument("--recipes", default="none,mixed")
    ap.add_argument("--workdir", default=tempfile.gettempdir())
    ap.add_argument("--name", default="convert_memory", help="results file stem under benchmarks/results/")
    args = ap.parse_args()

    work = Path(tempfile.mkdtemp(prefix="dg-convert-bench-", dir=args.workdir))
    try:
        src = work / "hf"
        src.mkdir()
        t = time.perf_counter()
        total = write_checkpoint(src, args.layers)
        build_s = time.perf_counter() - t
        largest = max(int(np.prod(s)) * 2 for s in tensor_shapes(args.layers).values())
        print(f"checkpoint: {total / 1e9:.2f} GB, largest tensor {largest / 1e9:.2f} GB ({build_s:.0f} s to write)")
        disk = disk_write_mb_s(work)
        print(f"disk: {disk:.0f} MB/s sequential write")
        runs = []
        for recipe in args.recipes.split(","):
            res = run_recipe(src, work / f"out-{recipe}", recipe)
            res["gb_per_s"] = total / 1e9 / res["seconds"]
            res["bound_gb"] = (largest + 1.5e9) / 1e9
            res["within_bound"] = res["peak_rss_gb"] <= res["bound_gb"]
            runs.append(res)
            print(json.dumps(res))
            shutil.rmtree(work / f"out-{recipe}", ignore_errors=True)
    finally:
        shutil.rmtree(work, ignore_errors=True)

    result = {
        "benchmark": "convert_memory",
        "command": "python benchmarks/convert_memory.py " + " ".join(sys.argv[1:]),
        "machine": {"platform": platform.platform(), "processor": platform.processor() or platform.machine(),
                    "cpus": os.cpu_count(), "python": platform.python_version(),
                    "note": "Linux x86_64 CPU-only MLX; the 2 cores were shared with other jobs; the source was "
                            "just written, so reads came mostly from the page cache"},
        "mlx": __import__("mlx.core").core.__version__,
        "disk_write_mb_s": disk,
        "checkpoint": {"layers": args.layers, "bytes": total, "largest_tensor_bytes": largest,
                       "ratio_to_largest": total / largest},
        "runs": runs,
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
    }
    RESULTS.mkdir(parents=True, exist_ok=True)
    write_text_atomic(RESULTS / f"{args.name}.json", json.dumps(result, indent=2))
    lines = [
        "# Converter memory benchmark", "",
        f"`{result['command']}` on {result['machine']['platform']} ({result['machine']['cpus']} CPUs, shared "
        f"with other jobs), MLX {result['mlx']}, {result['date']}.", "",
        f"Synthetic bf16 checkpoint with the real widths and {args.layers} layers: {total / 1e9:.2f} GB, "
        f"largest tensor (the embedding) {largest / 1e9:.2f} GB ({total / largest:.1f}x smaller than the checkpoint).", "",
        f"The output disk writes {disk:.0f} MB/s sequentially (1 GiB, fsync'd, measured just before).", "",
        "| recipe | output GB | peak RSS GB | bound (largest + 1.5 GB) | within | seconds | GB/s read | GB/s written |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in runs:
        lines.append(f"| {r['recipe']} | {r['out_gb']:.2f} | {r['peak_rss_gb']:.2f} | {r['bound_gb']:.2f} | "
                     f"{'yes' if r['within_bound'] else 'NO'} | {r['seconds']:.1f} | {r['gb_per_s']:.3f} | {r['out_gb'] / r['seconds']:.3f} |")
    lines += ["", "Peak RSS is the conversion process's own `ru_maxrss` (getrusage(RUSAGE_SELF) at its end; Python, MLX and the converter included). "
              "Reads came mostly from the page cache (the checkpoint had just been written)."]
    write_text_atomic(RESULTS / f"{args.name}.md", "\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
