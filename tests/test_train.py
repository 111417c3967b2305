"""Training: the loss goes down, checkpoints load and resume, LoRA trains only its adapters."""

import dataclasses
import json
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest
from mlx.utils import tree_flatten

from mlx_diffgemma import sudoku
from mlx_diffgemma.loading import load
from mlx_diffgemma.testing import quantized_copy
from mlx_diffgemma.train import (
    TASKS,
    TrainConfig,
    TrainError,
    accumulate,
    autoregressive_loss,
    build,
    corrupt,
    diffusion_loss,
    draw_batch,
    generate_autoregressive,
    latest_checkpoint,
    main,
    train,
)

S, F = "sliding_attention", "full_attention"
TINY_MODEL = {
    "canvas_length": 81,
    "text_config": dict(
        vocab_size=16, hidden_size=32, intermediate_size=48, num_hidden_layers=2, layer_types=[S, F],
        num_attention_heads=2, num_key_value_heads=1, head_dim=16, global_head_dim=16,
        num_global_key_value_heads=1, sliding_window=32, num_experts=2, top_k_experts=1,
        moe_intermediate_size=16,
    ),
}


def tiny(tmp_path, **kw) -> TrainConfig:
    raw = dict(out_dir=str(tmp_path / "run"), model=TINY_MODEL, steps=4, batch_size=4, learning_rate=3e-3,
               warmup_steps=1, save_every=2, compile=False, generation={"max_new_tokens": 81})
    raw.update(kw)
    return TrainConfig.from_dict(raw)


def weights(model):
    return {k: np.array(v) for k, v in tree_flatten(model.parameters())}


def fixed_loss(model, cfg, objective="diffusion"):
    """The loss on one fixed batch (fixed corruption), for before/after comparisons."""
    rng = np.random.default_rng(123)
    prompt, target = TASKS["sudoku"](cfg).batch(0, rng)
    if objective == "autoregressive":
        return float(autoregressive_loss(model, mx.array(prompt), mx.array(target)))
    canvas, _ = corrupt(target, rng, model.config.vocab_size, 1e-3)
    return float(diffusion_loss(model, mx.array(prompt), mx.array(target), mx.array(canvas)))


def test_unique_sudoku_data_has_one_solution_per_puzzle(tmp_path):
    cfg = tiny(tmp_path, batch_size=6, data={"unique": True, "pool": 3, "givens_start": 28, "givens_end": 28,
                                             "givens_max": 34})
    prompt, target = TASKS["sudoku"](cfg).batch(0, np.random.default_rng(0))
    for p, t in zip(prompt, target):
        cells = p[1:]
        puzzle = np.where(cells == sudoku.DOT, 0, cells - sudoku.DIGIT0)
        assert 28 <= (puzzle > 0).sum() <= 34
        assert sudoku.count_solutions(puzzle, 2) == 1
        assert np.array_equal(sudoku.solve_exact(puzzle), sudoku.canvas_digits(t))
    # the default keeps random cells: at 28 givens almost no puzzle is unique
    cfg = tiny(tmp_path, batch_size=6, data={"givens_start": 28, "givens_end": 28, "givens_max": 28})
    prompt, _ = TASKS["sudoku"](cfg).batch(0, np.random.default_rng(0))
    puzzles = [np.where(p[1:] == sudoku.DOT, 0, p[1:] - sudoku.DIGIT0) for p in prompt]
    assert sum(sudoku.count_solutions(q, 2) > 1 for q in puzzles) >= 4


@pytest.mark.parametrize("objective", ["diffusion", "autoregressive"])
def test_training_reduces_the_loss(tmp_path, objective):
    cfg = tiny(tmp_path, steps=12, save_every=12, objective=objective, compile=objective == "diffusion",
               learning_rate=1e-2)
    before = fixed_loss(build(cfg)[0], cfg, objective)
    last = train(cfg, progress=False, log=lambda *_: None)
    model, _ = load(last)
    after = fixed_loss(model, cfg, objective)
    assert after < before - 0.1, (before, after)


def test_checkpoint_is_an_engine_model_directory(tmp_path):
    cfg = tiny(tmp_path, steps=2)
    last = train(cfg, progress=False, log=lambda *_: None)
    config = json.loads((last / "config.json").read_text())
    assert config["model_type"] == "diffusion_gemma" and config["canvas_length"] == 81
    assert json.loads((last / "generation_config.json").read_text())["max_new_tokens"] == 81
    model, tokenizer = load(last)
    assert tokenizer.encode("1.\n", add_special_tokens=False) == [sudoku.DIGIT0 + 1, sudoku.DOT, sudoku.NEWLINE]
    assert tokenizer.decode([sudoku.DIGIT0 + 5, sudoku.DOT]) == "5."
    names = set(mx.load(str(last / "model.safetensors")))
    assert "embed_tokens.weight" in names and "layers.0.experts.gate_up_proj.weight" in names
    # batch > 1 through encode + denoise, and the reference sampler runs on it
    digits = sudoku.solve_batch(model, sudoku.puzzle_set(0, 2, (40, 45))[0], max_denoising_steps=2)
    assert digits.shape == (2, 81)


def test_resume_makes_the_same_updates(tmp_path):
    straight = tiny(tmp_path / "a", steps=4, save_every=4)
    train(straight, progress=False, log=lambda *_: None)
    split = tiny(tmp_path / "b", steps=4, save_every=2)
    train(split, progress=False, log=lambda *_: None, stop_at=2)
    assert latest_checkpoint(split.out_dir).name == "step-0000002"
    logs = []
    train(split, progress=False, log=logs.append)
    assert any("resuming" in line and "step 2" in line for line in logs)
    a, _ = load(latest_checkpoint(straight.out_dir))
    b, _ = load(latest_checkpoint(split.out_dir))
    wa, wb = weights(a), weights(b)
    assert wa.keys() == wb.keys()
    for k in wa:
        np.testing.assert_allclose(wa[k], wb[k], rtol=1e-5, atol=1e-6, err_msg=k)


@pytest.mark.parametrize("objective", ["diffusion", "autoregressive"])
def test_micro_batches_give_the_batch_loss_and_gradients(tmp_path, objective):
    # gradient accumulation over equal slices (self-conditioning on, so its temperatures split too)
    cfg = tiny(tmp_path, objective=objective, batch_size=6)
    model = build(cfg)[0]
    rng = np.random.default_rng(5)
    prompt, target = TASKS["sudoku"](cfg).batch(0, rng)
    args = [mx.array(prompt), mx.array(target)]
    if objective == "diffusion":
        args += [mx.array(corrupt(target, rng, 16, 1e-3)[0]), mx.array(rng.uniform(0.6, 1.0, (6, 1, 1)).astype(np.float32))]
        loss_and_grad = nn.value_and_grad(model, lambda *a: diffusion_loss(model, *a))
    else:
        loss_and_grad = nn.value_and_grad(model, lambda *a: autoregressive_loss(model, *a))
    (l1, g1), (l3, g3) = accumulate(loss_and_grad, args, 1), accumulate(loss_and_grad, args, 3)
    assert abs(float(l1) - float(l3)) < 1e-5 * float(l1)
    g1, g3 = dict(tree_flatten(g1)), dict(tree_flatten(g3))
    assert g1.keys() == g3.keys() and max(float(mx.abs(v).max()) for v in g1.values()) > 1e-3
    for k in g1:
        np.testing.assert_allclose(np.array(g3[k]), np.array(g1[k]), rtol=1e-3, atol=1e-6, err_msg=k)
    with pytest.raises(TrainError, match="multiple of micro_batches"):
        tiny(tmp_path, micro_batches=3)  # batch_size 4
    # and a training run with slices goes through
    train(tiny(tmp_path / "run2", steps=1, save_every=1, objective=objective, micro_batches=2), progress=False,
          log=lambda *_: None)


def test_lora_trains_only_the_adapters(tmp_path):
    base_cfg = tiny(tmp_path / "base", steps=1)
    base_dir = train(base_cfg, progress=False, log=lambda *_: None)
    cfg = TrainConfig.from_dict(dict(
        out_dir=str(tmp_path / "lora"), init_from=str(base_dir), steps=6, batch_size=4, learning_rate=1e-2,
        warmup_steps=1, save_every=3, compile=False, lora={"rank": 4, "scale": 10.0},
    ))
    from mlx_diffgemma.train import apply_lora

    model = build(cfg)[0]
    apply_lora(model, cfg.lora, cfg.seed)
    trainable = {k for k, _ in tree_flatten(model.trainable_parameters())}
    assert trainable and all(k.endswith(("lora_a", "lora_b")) for k in trainable)
    assert any("experts.gate_up_proj" in k for k in trainable)

    last = train(cfg, progress=False, log=lambda *_: None)
    adapters = mx.load(str(last / "state" / "adapters.safetensors"))
    assert set(adapters) == trainable
    base, _ = load(base_dir)
    tuned, _ = load(last)  # fused weights under the engine's names
    wb, wt = weights(base), weights(tuned)
    assert wb.keys() == wt.keys()
    changed = {k for k in wb if not np.array_equal(wb[k], wt[k])}
    # only projections that carry an adapter change; norms, router and embedding stay
    assert changed and all(k.rsplit(".", 2)[-2] in ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj",
                                                    "down_proj", "gate_up_proj") for k in changed)
    assert "embed_tokens.weight" not in changed


def test_generate_autoregressive_shape(tmp_path):
    model = build(tiny(tmp_path))[0]
    out = generate_autoregressive(model, sudoku.prompt_batch(np.zeros((3, 81), dtype=np.int64)), 5)
    assert out.shape == (3, 5) and out.dtype.kind == "i"


def test_self_cond_temperatures_default_to_the_sampler_range(tmp_path):
    from mlx_diffgemma.config import GenerationConfig

    gen = GenerationConfig(t_min=1.0, t_max=1.5)
    cfg = tiny(tmp_path, self_cond_prob=1.0)
    task = TASKS["sudoku"](cfg)
    temps = draw_batch(task, cfg, gen, 0, 16)[3]
    assert temps.min() >= 1.0 and temps.max() <= 1.5  # the range inference feeds
    fixed = tiny(tmp_path, self_cond_prob=1.0, self_cond_temperatures=[0.4, 0.8])
    temps = draw_batch(task, fixed, gen, 0, 16)[3]
    assert temps.min() >= 0.4 and temps.max() <= 0.8  # the config's own range, whatever the sampler says
    # the same draws otherwise: the batch stays a function of (seed, step)
    same = draw_batch(task, tiny(tmp_path, self_cond_prob=1.0), GenerationConfig(t_min=0.4, t_max=0.8), 0, 16)
    for a, b in zip(draw_batch(task, fixed, gen, 0, 16), same):
        assert np.array_equal(a, b)
    with pytest.raises(TrainError, match="self_cond_temperatures"):
        tiny(tmp_path, self_cond_temperatures=[0.8, 0.4])


def test_bad_configs_name_the_culprit(tmp_path, capsys):
    with pytest.raises(TrainError, match="unknown setting"):
        TrainConfig.from_dict({"out_dir": "x", "model": TINY_MODEL, "stepz": 3})
    with pytest.raises(TrainError, match="exactly one of"):
        TrainConfig.from_dict({"out_dir": "x"})
    with pytest.raises(TrainError, match="objective"):
        TrainConfig.from_dict({"out_dir": "x", "model": TINY_MODEL, "objective": "masked"})
    bad = tmp_path / "bad.yaml"
    bad.write_text("out_dir: x\nmodel: {canvas_length: 81}\n")  # no text_config
    assert main(["--config", str(bad)]) == 2
    assert "text_config" in capsys.readouterr().err
    assert main(["--config", str(tmp_path / "missing.yaml")]) == 2


def test_a_config_with_a_base_inherits_and_overrides(tmp_path):
    (tmp_path / "sub").mkdir()
    ckpt = tmp_path / "sub" / "ckpt"
    ckpt.mkdir()
    (tmp_path / "sub" / "root.yaml").write_text(
        "out_dir: root\ninit_from: ckpt\nsteps: 7\nbatch_size: 4\n"
        "data: {givens_start: 50, givens_end: 26}\ngeneration: {t_max: 1.2, t_min: 0.8}\n")
    child = tmp_path / "child.yaml"
    child.write_text("base: sub/root.yaml\nout_dir: mine\nsteps: 9\ndata: {givens_end: 30}\n")
    cfg = TrainConfig.from_file(child)
    assert (cfg.steps, cfg.batch_size) == (9, 4)
    assert cfg.data == {"givens_start": 50, "givens_end": 30}  # mappings merge key by key
    assert cfg.generation == {"t_max": 1.2, "t_min": 0.8}
    assert Path(cfg.out_dir) == tmp_path / "mine"  # the child's paths are the child's
    assert Path(cfg.init_from) == ckpt.resolve()  # the base's are relative to the base

    for text, culprit in [("base: sub/root.yaml\nsteps: 3\n", "needs its own out_dir"),
                          ("base: [sub/root.yaml]\nout_dir: x\n", "base must be the path"),
                          ("base: nowhere.yaml\nout_dir: x\n", "nowhere.yaml: cannot read"),
                          ("base: child.yaml\nout_dir: x\n", "a cycle")]:
        child.write_text(text)
        with pytest.raises(TrainError, match=culprit):
            TrainConfig.from_file(child)


def test_export_applies_the_generation_section(tmp_path):
    from mlx_diffgemma.train import export

    last = train(tiny(tmp_path, steps=2), progress=False, log=lambda *_: None)
    export(last, tmp_path / "plain")
    export(last, tmp_path / "tuned", {"max_new_tokens": 81, "t_max": 1.2, "t_min": 0.8})
    plain, _ = load(tmp_path / "plain")
    tuned, _ = load(tmp_path / "tuned")
    assert (plain.generation_config.t_max, plain.generation_config.t_min) == (0.8, 0.4)
    assert (tuned.generation_config.t_max, tuned.generation_config.t_min) == (1.2, 0.8)
    assert tuned.generation_config.eos_token_id == plain.generation_config.eos_token_id
    saved = json.loads((tmp_path / "tuned" / "generation_config.json").read_text())
    assert saved["sampler_config"]["entropy_bound"] == saved["entropy_bound"] and "bos_token_id" in saved
    assert (tmp_path / "tuned" / "model.safetensors").read_bytes() == (last / "model.safetensors").read_bytes()
    assert not (tmp_path / "tuned" / "optimizer.safetensors").exists()
    with pytest.raises(TrainError, match="generation: need 0 <= t_min < t_max"):
        export(last, tmp_path / "bad", {"t_max": 0.3, "t_min": 0.5})
    assert not (tmp_path / "bad").exists()  # a failed export leaves nothing behind


def test_bad_generation_section_on_a_checkpoint_is_one_line(tmp_path, capsys):
    # a bad generation section is a one-line error, with init_from as with a fresh model
    last = train(tiny(tmp_path, steps=2), progress=False, log=lambda *_: None)
    for source in (f"init_from: {last}", "model: " + json.dumps(TINY_MODEL)):
        bad = tmp_path / "bad.yaml"
        bad.write_text(f"out_dir: {tmp_path / 'ft'}\n{source}\nsteps: 1\nbatch_size: 2\ncompile: false\n"
                       "generation: {t_max: 0.3, t_min: 0.5}\n")
        assert main(["--config", str(bad), "--no-progress"]) == 2
        err = capsys.readouterr().err
        assert err.strip().splitlines() == [err.strip()] and "generation: need 0 <= t_min < t_max" in err
        assert not (tmp_path / "ft").exists()


def test_sort_task_batches_sorted_answers_then_eos(tmp_path):
    from mlx_diffgemma import sorting

    cfg = tiny(tmp_path, task="sort", model={**TINY_MODEL, "canvas_length": sorting.CANVAS},
               data={"length_min": 3, "length_max": 9})
    prompt, target = TASKS["sort"](cfg).batch(0, np.random.default_rng(0))
    assert prompt.shape == (4, 1 + sorting.WIDTH) and target.shape == (4, sorting.CANVAS)
    for p, t in zip(prompt, target):
        digits = p[1:][p[1:] != sudoku.DOT] - sudoku.DIGIT0
        assert 3 <= len(digits) <= 9 and (p[1 + len(digits):] == sudoku.DOT).all()
        assert sorting.is_sorted_answer(digits, t) and (t[len(digits):] == sudoku.EOS).all()


def test_sort_task_short_canvases_continue_the_committed_answer(tmp_path):
    from mlx_diffgemma import sorting

    cfg = tiny(tmp_path, task="sort", model={**TINY_MODEL, "canvas_length": sorting.CANVAS},
               data={"canvas_lengths": [8, 16, 128]})
    task, seen = TASKS["sort"](cfg), set()
    for step in range(40):
        prompt, target = task.batch(step, np.random.default_rng([0, step]))
        c, done = target.shape[1], prompt.shape[1] - (1 + sorting.WIDTH)  # canvas rows, answer rows committed
        assert c in (8, 16, 128) and done % c == 0 and (done == 0 or c < 128)
        seen.add((c, done > 0))
        for p, t in zip(prompt, target):
            digits = p[1 : 1 + sorting.WIDTH][p[1 : 1 + sorting.WIDTH] != sudoku.DOT] - sudoku.DIGIT0
            answer = sorting.canvas_ids([digits])[0]
            assert len(digits) >= done  # the answer has not ended before this canvas
            np.testing.assert_array_equal(p[1 + sorting.WIDTH :], answer[:done])
            np.testing.assert_array_equal(t, answer[done : done + c])
    assert {(8, True), (16, True), (128, False)} <= seen


@pytest.mark.parametrize("data, model, culprit", [
    ({"length_min": 0}, None, "length_min..length_max"),
    ({"length_max": 49}, None, "length_min..length_max"),
    ({"lengths": 3}, None, "unknown sort option"),
    ({"canvas_lengths": [0, 32]}, None, "canvas_lengths must be a list"),
    ({"canvas_lengths": 32}, None, "canvas_lengths must be a list"),
    ({}, {**TINY_MODEL, "canvas_length": 81}, "128-row canvas"),
])
def test_sort_task_bad_options_name_the_culprit(tmp_path, data, model, culprit):
    from mlx_diffgemma import sorting

    cfg = tiny(tmp_path, task="sort", model=model or {**TINY_MODEL, "canvas_length": sorting.CANVAS}, data=data)
    with pytest.raises(TrainError, match=culprit):
        TASKS["sort"](cfg)



def test_grow_depth_starts_from_the_trained_function(tmp_path):
    base_dir = train(tiny(tmp_path / "base", steps=2), progress=False, log=lambda *_: None)
    small, _ = load(base_dir)
    cfg = TrainConfig.from_dict(dict(out_dir=str(tmp_path / "deep"), init_from=str(base_dir), grow_depth=3,
                                     steps=2, batch_size=4, warmup_steps=1, save_every=1, compile=False))
    deep, raw, _, _ = build(cfg)
    assert raw["text_config"]["num_hidden_layers"] == 6 and len(deep.layers) == 6
    assert [s.kind for s in deep.config.layers] == [S, F] * 3
    # the copies pass their input through, so prompt encoding and denoising agree with the trained network
    prompt = mx.array([[2] + [3 + i % 9 for i in range(20)]])
    canvas = mx.array([[3 + (i * 7) % 9 for i in range(81)]])
    out = []
    for m in (small, deep):
        cache = m.make_cache()
        m.encode(prompt, cache)
        out.append(np.array(m.denoise(canvas, cache)))
    np.testing.assert_allclose(out[1], out[0], rtol=1e-5, atol=1e-5)
    # ... and they train: the copies' zero scales move, and a rerun resumes the deeper network
    last = train(cfg, progress=False, log=lambda *_: None)
    tuned, _ = load(last)
    assert len(tuned.layers) == 6
    assert float(mx.abs(tuned.layers[4].post_attention_layernorm.weight).max()) > 0
    assert train(cfg, progress=False, log=lambda *_: None) == last
    # a quantized checkpoint has no full-precision weights to copy: refused in one line
    with pytest.raises(TrainError, match="init_from .* is quantized; grow from the full-precision"):
        build(dataclasses.replace(cfg, init_from=str(quantized_copy(base_dir, tmp_path / "q"))))
    for bad, match in ((dict(grow_depth=1), "grow_depth must be an integer >= 2"),
                       (dict(grow_depth=2, init_from=None, model=TINY_MODEL), "give it with init_from")):
        with pytest.raises(TrainError, match=match):
            TrainConfig.from_dict({**dict(out_dir="x", init_from=str(base_dir)), **bad})
