"""The converter: round trips on tiny sharded checkpoints, recipe error bounds, sizes from shapes,
and every bad input (one line, non-zero exit, nothing left behind)."""

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest
from safetensors.numpy import load_file, save_file

from mlx_diffgemma import convert as cv
from mlx_diffgemma import quant
from mlx_diffgemma.loading import load

S, F = "sliding_attention", "full_attention"
# every input width a multiple of 64, so each recipe's group sizes divide it
QUANTIZABLE = dict(
    hidden_size=128, num_hidden_layers=2, layer_types=[S, F], num_attention_heads=4, num_key_value_heads=2,
    head_dim=32, global_head_dim=64, num_global_key_value_heads=1, intermediate_size=128,
    moe_intermediate_size=64, num_experts=4, top_k_experts=2, sliding_window=8,
)
RNG = np.random.default_rng(0)
PROMPT = mx.array(RNG.integers(4, 300, (3, 10)))
CANVAS = mx.array(RNG.integers(0, 300, (3, 16)))


@pytest.fixture(scope="module")
def source(tmp_path_factory):
    """A tiny fp32 checkpoint written by transformers in 200 KB shards, with its vision tower; the
    embedding gain makes the output distributions peaked, so that top-1 agreement means something."""
    from mlx_diffgemma.testing import build_checkpoint

    path, _ = build_checkpoint(tmp_path_factory.mktemp("hf"), text_overrides=QUANTIZABLE, canvas_length=16,
                               max_shard_size="200KB", seed=5, logit_gain=10.0)
    return path


@pytest.fixture(scope="module")
def reference_logits(source):
    model, _ = load(source)
    return denoise(model)


def denoise(model):
    cache = model.make_cache()
    model.encode(PROMPT, cache)
    return model.denoise(CANVAS, cache)


def error_vs(ref, logits):
    """(mean KL(ref || q) per position, top-1 agreement)."""
    p = mx.softmax(ref, axis=-1)
    logq = logits - mx.logsumexp(logits, axis=-1, keepdims=True)
    logp = ref - mx.logsumexp(ref, axis=-1, keepdims=True)
    kl = (p * (logp - logq)).sum(-1).mean().item()
    top1 = (logits.argmax(-1) == ref.argmax(-1)).astype(mx.float32).mean().item()
    return kl, top1


def leftovers(parent: Path, name: str):
    return [p.name for p in parent.iterdir() if p.name == name or p.name.startswith(f".{name}.")]


# -- round trips ---------------------------------------------------------------------------------


def test_unquantized_round_trip_is_identical(source, reference_logits, tmp_path):
    out = cv.convert(source, tmp_path / "mlx", max_shard_size=300_000)
    model, tok = load(out)
    assert mx.array_equal(denoise(model), reference_logits).item()

    files = sorted(p.name for p in out.iterdir())
    shards = [f for f in files if f.endswith(".safetensors")]
    assert len(shards) > 1 and all(f.startswith("model-") for f in shards)
    for f in ("config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json",
              "chat_template.jinja", "README.md", "model.safetensors.index.json"):
        assert f in files, f
    index = json.loads((out / "model.safetensors.index.json").read_text())
    names = set()
    for shard in shards:
        _, meta = cv.read_header(out / shard)
        assert meta == {"format": "mlx"}
        names |= set(load_file(out / shard))
    assert names == set(index["weight_map"])
    assert "layers.0.experts.gate_up_proj.weight" in names and "embed_tokens.weight" in names
    assert not any(n.startswith("model.") or "vision" in n or "rotary" in n for n in names)
    cfg = json.loads((out / "config.json").read_text())
    assert "vision_config" not in cfg and "quantization" not in cfg
    assert tok.chat_template is not None
    assert "local checkpoint" in (out / "README.md").read_text()


def test_encoder_layout_and_extras(source, reference_logits, tmp_path):
    """Text weights under model.encoder.language_model (no decoder copy), plus a stray lm_head and
    rotary buffer: renamed once at this boundary, extras dropped, same logits."""
    src = copy_source(source, tmp_path)
    index = json.loads((src / "model.safetensors.index.json").read_text())
    weight_map = {}
    for shard in sorted(set(index["weight_map"].values())):
        tensors = load_file(src / shard)
        renamed = {}
        for name, t in tensors.items():
            if name.startswith("model.encoder.language_model."):
                continue  # the duplicate layer scalars: the decoder copies take their place
            renamed[name.replace("model.decoder.", "model.encoder.language_model.")] = t
        if shard == index["weight_map"]["model.decoder.norm.weight"]:
            renamed["lm_head.weight"] = np.zeros((4, 4), np.float32)
            renamed["model.encoder.language_model.rotary_emb.inv_freq"] = np.ones(8, np.float32)
        save_file(renamed, src / shard, metadata={"format": "pt"})
        weight_map.update({k: shard for k in renamed})
    index["weight_map"] = weight_map
    (src / "model.safetensors.index.json").write_text(json.dumps(index))

    out = cv.convert(src, tmp_path / "mlx")
    names = set(mx.load(str(out / "model.safetensors")))
    assert not any("lm_head" in n or "rotary" in n or n.startswith("model.") for n in names)
    model, _ = load(out)
    assert mx.array_equal(denoise(model), reference_logits).item()


def test_bf16_output(source, reference_logits, tmp_path):
    out = cv.convert(source, tmp_path / "bf16", dtype="bfloat16")
    weights = mx.load(str(out / "model.safetensors"))
    assert {v.dtype for v in weights.values()} == {mx.bfloat16}
    model, _ = load(out, dtype=mx.float32)  # the bf16-rounded weights, run in fp32
    kl, top1 = error_vs(reference_logits, denoise(model))
    assert kl < 1e-3 and top1 > 0.95


# (max KL(fp32 || recipe) per position, min top-1 agreement) over 48 canvas positions whose fp32
# distributions are peaked (mean entropy 1.7 nats); measured: q8 0.007 / 0.98, mxfp8 0.010 / 0.98,
# mixed 0.052 / 0.92, nvfp4 0.050 / 0.96, mxfp4 0.10 / 0.94, q4 0.68 / 0.83
BOUNDS = {"q8": (0.03, 0.93), "mxfp8": (0.03, 0.93), "mixed": (0.15, 0.85), "nvfp4": (0.15, 0.85),
          "mxfp4": (0.3, 0.85), "q4": (1.5, 0.7)}


@pytest.fixture(scope="module")
def recipe_errors(source, reference_logits, tmp_path_factory):
    errors = {}
    for name in BOUNDS:
        out = cv.convert(source, tmp_path_factory.mktemp(name) / "out", recipe=name)
        model, _ = load(out)
        errors[name] = (out, model, error_vs(reference_logits, denoise(model)))
    return errors


@pytest.mark.parametrize("name", sorted(BOUNDS))
def test_recipe_error_is_bounded_and_recorded(name, recipe_errors):
    out, model, (kl, top1) = recipe_errors[name]
    max_kl, min_top1 = BOUNDS[name]
    assert 0 < kl < max_kl, kl
    assert top1 >= min_top1, top1

    q = json.loads((out / "config.json").read_text())["quantization"]
    recipe = quant.RECIPES[name]
    assert q["recipe"] == name
    for path, m in model.named_modules():
        if path not in q:
            continue
        fmt = recipe.format_for(path)
        if fmt is None:
            assert q[path] is False and "scales" not in m
        else:  # the loaded module is quantized exactly as recorded
            assert q[path] == fmt.as_dict()
            assert (m.bits, m.group_size, m.mode) == (fmt.bits, fmt.group_size, fmt.mode), path
    recorded = {k for k in q if k not in ("group_size", "bits", "mode", "recipe")}
    assert recorded == set(quant.quantizable_modules(model_tree(model)))

    # the planned size is what lands on disk (the size table relies on the same arithmetic)
    on_disk = sum(v.nbytes for v in mx.load(str(out / "model.safetensors")).values())
    expect = quant.recipe_size(recipe, model.config, dtype=mx.float32)["bytes"]
    assert on_disk == expect


def model_tree(model):
    from mlx_diffgemma.model import DiffusionGemma

    return DiffusionGemma(model.config)


def test_mixed_is_closer_to_fp32_than_uniform_4bit(recipe_errors):
    mixed, q4, q8 = (recipe_errors[n][2][0] for n in ("mixed", "q4", "q8"))
    assert q8 < mixed < q4 / 3, (q8, mixed, q4)


# -- recipes and sizes from shapes ---------------------------------------------------------------


def test_real_config_sizes():
    config = quant.real_config()
    bf16 = quant.recipe_size(None, config)
    assert bf16["parameters"] == pytest.approx(25.2e9, rel=0.01) and bf16["bits_per_weight"] == 16
    sizes = {name: quant.recipe_size(r, config) for name, r in quant.RECIPES.items()}
    assert 14e9 < sizes["mixed"]["bytes"] < 19e9
    assert sizes["q4"]["bits_per_weight"] == pytest.approx(4.5, abs=0.01)  # 4 bits + bf16 scale and bias per 64
    assert sizes["q4"]["bytes"] < sizes["mxfp4"]["bytes"] < sizes["mixed"]["bytes"] < sizes["mxfp8"]["bytes"] < sizes["q8"]["bytes"]
    # the experts are ~90% of the weights; in mixed they hold 4-bit, the rest 8-bit
    groups = sizes["mixed"]["by_group"]
    assert groups["experts"] == pytest.approx(22.84e9 * 4.5 / 8, rel=0.01)
    table = quant.size_table(config)
    assert table.count("\n") == len(quant.RECIPES) + 2


@pytest.mark.parametrize("fmt", [quant.Format(4, 64), quant.Format(3, 32), quant.Format(8, 128),
                                 quant.Format(4, 32, "mxfp4"), quant.Format(4, 16, "nvfp4"), quant.Format(8, 32, "mxfp8")])
def test_stored_bytes_matches_mx_quantize(fmt):
    w = mx.zeros((3, 5, 256), mx.bfloat16)
    parts = mx.quantize(w, fmt.group_size, fmt.bits, mode=fmt.mode)
    assert quant.stored_bytes(w.shape, fmt, mx.bfloat16) == sum(p.nbytes for p in parts)


def test_recipe_options():
    assert quant.get_recipe().name == "mixed"
    r = quant.get_recipe("uniform", bits=3, group_size=32)
    assert set(r.formats.values()) == {quant.Format(3, 32)}
    r = quant.get_recipe("mixed", mode="nvfp4")
    assert r.formats["experts"] == quant.Format(4, 16, "nvfp4") and r.formats["attention"] == quant.Q8
    with pytest.raises(ValueError, match="--q-bits 3 is not valid for mode mxfp4"):
        quant.get_recipe("mixed", bits=3, mode="mxfp4")
    with pytest.raises(ValueError, match="--q-group-size 48"):
        quant.get_recipe("uniform", group_size=48)
    with pytest.raises(ValueError, match="--recipe q8 fixes its formats"):
        quant.get_recipe("q8", bits=4)
    with pytest.raises(ValueError, match="704 is not a multiple of group size 128"):
        quant.recipe_size(quant.get_recipe("mixed", group_size=128), quant.real_config())


# -- bad input and faults ------------------------------------------------------------------------


def cli(*args):
    return cv.main([str(a) for a in args])


def copy_source(source, tmp_path) -> Path:
    dst = tmp_path / "src"
    shutil.copytree(source, dst)
    return dst


def shard_of(src: Path, name: str) -> Path:
    index = json.loads((src / "model.safetensors.index.json").read_text())
    return src / index["weight_map"][name]


def rewrite(shard: Path, edit):
    tensors = load_file(shard)
    edit(tensors)
    save_file(tensors, shard, metadata={"format": "pt"})


def expect_failure(capsys, tmp_path, args, message, out_name="out", code=2):
    rc = cli(*args)
    err = capsys.readouterr().err.strip()
    assert rc == code, err
    last = err.splitlines()[-1]  # progress lines may come before the one error line
    assert last.startswith("error: ") and message in last, err
    assert "Traceback" not in err and err.count("error:") == 1, err
    assert leftovers(tmp_path, out_name) == [], leftovers(tmp_path, out_name)


def _missing_tensor(src):
    name = "model.decoder.layers.1.mlp.up_proj.weight"
    rewrite(shard_of(src, name), lambda t: t.pop(name))
    index = json.loads((src / "model.safetensors.index.json").read_text())
    del index["weight_map"][name]
    (src / "model.safetensors.index.json").write_text(json.dumps(index))


def _misshaped(src):
    name = "model.decoder.layers.0.self_attn.q_proj.weight"
    rewrite(shard_of(src, name), lambda t: t.update({name: t[name][:64]}))


def _truncated(src):
    shard = shard_of(src, "model.decoder.layers.1.experts.down_proj")
    data = shard.read_bytes()
    shard.write_bytes(data[: len(data) - 1000])


def _corrupt_header(src):
    shard = shard_of(src, "model.decoder.embed_tokens.weight")
    data = bytearray(shard.read_bytes())
    data[8:40] = b"\x00garbage, not a JSON header....."
    shard.write_bytes(bytes(data))


def _nan_values(src):  # a well-formed shard whose data is garbage: found while writing
    name = "model.decoder.layers.1.experts.gate_up_proj"

    def edit(t):
        t[name] = t[name].copy()
        t[name][2, 5, 7] = np.nan

    rewrite(shard_of(src, name), edit)


def _missing_shard(src):
    shard_of(src, "model.decoder.layers.0.router.proj.weight").unlink()


def _unknown_model_type(src):
    cfg = json.loads((src / "config.json").read_text())
    cfg["model_type"] = "gemma4"
    (src / "config.json").write_text(json.dumps(cfg))


def _scalars_disagree(src):
    name = "model.encoder.language_model.layers.1.layer_scalar"
    rewrite(shard_of(src, name), lambda t: t.update({name: t[name] + 1}))


BAD_SOURCES = {
    "unknown model_type": (_unknown_model_type, "model_type is 'gemma4'"),
    "missing tensor": (_missing_tensor, "tensor layers.1.mlp.up_proj.weight (model.decoder.layers.1.mlp.up_proj.weight) is missing"),
    "mis-shaped tensor": (_misshaped, "has shape [64, 128], config.json implies [128, 128]"),
    "truncated shard": (_truncated, "truncated or corrupt shard"),
    "corrupt header": (_corrupt_header, "not a readable safetensors file"),
    "corrupt values": (_nan_values, "holds NaN or infinite values"),
    "index names a missing shard": (_missing_shard, "which is missing from"),
    "layer scalars disagree": (_scalars_disagree, "encoder and decoder copies disagree"),
}


@pytest.mark.parametrize("case", sorted(BAD_SOURCES))
def test_bad_source(case, source, tmp_path, capsys):
    break_it, message = BAD_SOURCES[case]
    src = copy_source(source, tmp_path)
    break_it(src)
    expect_failure(capsys, tmp_path, ["--hf-path", src, "--mlx-path", tmp_path / "out", "-q"], message)


def test_missing_and_unreadable_directories(source, tmp_path, capsys, monkeypatch):
    expect_failure(capsys, tmp_path, ["--hf-path", tmp_path / "nope", "--mlx-path", tmp_path / "out"],
                   "no such directory")
    (tmp_path / "file").write_text("x")
    expect_failure(capsys, tmp_path, ["--hf-path", tmp_path / "file", "--mlx-path", tmp_path / "out"],
                   "not a directory")
    src = copy_source(source, tmp_path)
    real_access = os.access
    monkeypatch.setattr(cv.os, "access", lambda p, mode: False if Path(p) == src else real_access(p, mode))
    expect_failure(capsys, tmp_path, ["--hf-path", src, "--mlx-path", tmp_path / "out"], "permission denied")


def test_existing_output_needs_force(source, tmp_path, capsys):
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    assert cli("--hf-path", source, "--mlx-path", out) == 2
    err = capsys.readouterr().err
    assert "already exists; pass --force" in err and (out / "keep.txt").exists()

    bad = copy_source(source, tmp_path)
    _nan_values(bad)  # a --force run that fails while writing keeps the old output
    assert cli("--hf-path", bad, "--mlx-path", out, "--force") == 2
    assert (out / "keep.txt").read_text() == "mine"

    assert cli("--hf-path", source, "--mlx-path", out, "--force") == 0
    assert not (out / "keep.txt").exists() and (out / "config.json").exists()
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".out.")) == []


def test_too_little_disk_is_found_before_writing(source, tmp_path, capsys, monkeypatch):
    real = shutil.disk_usage
    monkeypatch.setattr(cv.shutil, "disk_usage", lambda p: real(p)._replace(free=10_000))
    expect_failure(capsys, tmp_path, ["--hf-path", source, "--mlx-path", tmp_path / "out"],
                   "only 0.00 GB is free")


def test_bad_options(source, tmp_path, capsys):
    cases = [
        (["--recipe", "q8", "--q-bits", "4"], "--recipe q8 fixes its formats"),
        (["--q-mode", "mxfp4", "--q-bits", "8"], "--q-bits 8 is not valid for mode mxfp4"),
        (["--recipe", "uniform", "--q-group-size", "128"], "is not a multiple of group size 128"),
        (["--recipe", "uniform", "--q-bits", "7"], "--q-bits 7 is not valid for mode affine"),
    ]
    for extra, message in cases:
        expect_failure(capsys, tmp_path, ["--hf-path", source, "--mlx-path", tmp_path / "out", *extra], message)
    expect_failure(capsys, tmp_path, ["--hf-path", source, "--mlx-path", source / "inner"], "overlaps the source")
    assert leftovers(source, "inner") == []


def test_converted_checkpoint_is_not_reconverted(recipe_errors, tmp_path, capsys):
    out = recipe_errors["q8"][0]
    expect_failure(capsys, tmp_path, ["--hf-path", out, "--mlx-path", tmp_path / "out"], "already quantized")


def run_cli(*args, env=None, **kw):
    return subprocess.Popen([sys.executable, "-m", "mlx_diffgemma.convert", *map(str, args)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env, **kw)


def test_hub_id_offline_is_one_line(tmp_path):
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp_path / "hf-home")}
    p = run_cli("--hf-path", "google/diffusiongemma-26B-A4B-it", "--mlx-path", tmp_path / "out", env=env)
    _, err = p.communicate(timeout=120)
    err = err.decode().strip()
    assert p.returncode == 2 and "Traceback" not in err and err.count("\n") == 0, err
    assert "could not download" in err and "offline?" in err
    assert leftovers(tmp_path, "out") == []


SLOW_CHILD = """
import sys, time
from mlx_diffgemma import convert as cv
real = cv._write_job
def slow(*a):  # every tensor waits, so the interrupt lands mid-way however slowly the test polls
    time.sleep(30)
    return real(*a)
cv._write_job = slow
sys.exit(cv.main(sys.argv[1:]))
"""


def test_ctrl_c_mid_way_leaves_nothing(source, tmp_path):
    p = subprocess.Popen([sys.executable, "-c", SLOW_CHILD, "--hf-path", str(source), "--mlx-path",
                          str(tmp_path / "out"), "-q"], stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    deadline = time.time() + 120
    shard = None
    while time.time() < deadline and shard is None:  # wait until the first shard is being written
        shard = next((s for d in tmp_path.glob(".out.converting-*") for s in d.glob("*.safetensors")), None)
        time.sleep(0.02)
    assert shard is not None, p.communicate()[1].decode()
    p.send_signal(signal.SIGINT)
    _, err = p.communicate(timeout=60)
    err = err.decode().strip().splitlines()[-1]
    assert p.returncode == 130, err
    assert err == f"error: interrupted; nothing was written to {tmp_path / 'out'}"
    assert leftovers(tmp_path, "out") == []
