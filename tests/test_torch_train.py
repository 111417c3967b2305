"""The torch trainer takes the MLX trainer's steps: same losses, same weights, interchangeable checkpoints."""

import mlx.core as mx
import numpy as np
import pytest

torch = pytest.importorskip("torch")

from test_train import tiny  # noqa: E402

from mlx_diffgemma.config import ModelConfig  # noqa: E402
from mlx_diffgemma.torch_backend.layers import Experts, Router  # noqa: E402
from mlx_diffgemma.torch_backend.train import train as torch_train  # noqa: E402
from mlx_diffgemma.train import TrainError, latest_checkpoint  # noqa: E402
from mlx_diffgemma.train import train as mlx_train  # noqa: E402


def run(trainer, cfg, **kw):
    losses = []
    last = trainer(cfg, progress=False, on_step=lambda step, loss, dt: losses.append(loss), **kw)
    return losses, mx.load(str(last / "model.safetensors"))


@pytest.mark.parametrize("objective, micro_batches", [("diffusion", 1), ("autoregressive", 1), ("diffusion", 2)])
def test_torch_trainer_takes_the_mlx_trainers_steps(tmp_path, objective, micro_batches):
    kw = dict(objective=objective, micro_batches=micro_batches, weight_decay=0.01, self_cond_prob=0.5)
    mlx_losses, mlx_w = run(mlx_train, tiny(tmp_path / "mlx", **kw))
    torch_losses, torch_w = run(torch_train, tiny(tmp_path / "torch", **kw), device="cpu")
    # the same init, batches, corruption, self-conditioning draws, schedule, AdamW and clipping
    np.testing.assert_allclose(torch_losses, mlx_losses, rtol=2e-5)
    assert set(torch_w) == set(mlx_w)
    for k in mlx_w:
        # Adam moves a weight whose gradient is ~0 by ~lr either way: rounding can pick either side
        np.testing.assert_allclose(np.array(torch_w[k]), np.array(mlx_w[k]), atol=2e-3, err_msg=k)
    close = np.mean([float(mx.mean(mx.abs(torch_w[k] - mlx_w[k]))) for k in mlx_w])
    assert close < 1e-4


def test_checkpoints_resume_across_trainers(tmp_path):
    """Torch trains 2 of 4 steps, MLX resumes from its checkpoint (weights, moments, step count):
    the same losses and weights as 4 MLX steps."""
    kw = dict(steps=4, weight_decay=0.01)
    mlx_losses, mlx_w = run(mlx_train, tiny(tmp_path / "mlx", **kw))
    cfg = tiny(tmp_path / "mixed", **kw)
    first, _ = run(torch_train, cfg, device="cpu", stop_at=2)
    assert latest_checkpoint(cfg.out_dir).name == "step-0000002"
    rest, mixed_w = run(mlx_train, cfg)
    np.testing.assert_allclose(first + rest, mlx_losses, rtol=2e-5)
    for k in mlx_w:
        np.testing.assert_allclose(np.array(mixed_w[k]), np.array(mlx_w[k]), atol=2e-3, err_msg=k)


def test_training_experts_match_the_routed_experts():
    """Training runs every expert and weights the unrouted ones 0: the routed path's sum."""
    S = "sliding_attention"
    config = ModelConfig.from_dict({"model_type": "diffusion_gemma", "text_config": dict(
        vocab_size=16, hidden_size=32, intermediate_size=48, num_hidden_layers=1, layer_types=[S],
        num_attention_heads=2, num_key_value_heads=1, head_dim=16, sliding_window=32, num_experts=4,
        top_k_experts=2, moe_intermediate_size=16)})
    torch.manual_seed(0)
    router, experts = Router(config), Experts(config)
    for p in list(router.parameters()) + list(experts.parameters()):
        p.data = torch.randn_like(p)
    x = torch.randn(50, 32)
    routed = experts.eval()(x, *router.eval()(x))
    for p in router.parameters():
        p.requires_grad_(True)  # the one-hot per-expert scale
    trained = experts.train()(x, *router.train()(x))
    torch.testing.assert_close(trained, routed, rtol=1e-5, atol=1e-5)


def test_lora_is_refused_with_the_way_out(tmp_path):
    with pytest.raises(TrainError, match="lora: .*python -m mlx_diffgemma.train"):
        torch_train(tiny(tmp_path, lora={"rank": 4}), device="cpu", progress=False)


def test_compiled_layers_take_the_same_steps(tmp_path):
    plain, _ = run(torch_train, tiny(tmp_path / "plain"), device="cpu")
    compiled, _ = run(torch_train, tiny(tmp_path / "compiled", compile=True), device="cpu")
    np.testing.assert_allclose(compiled, plain, rtol=2e-5)


def test_a_compile_failure_falls_back_to_plain_layers(tmp_path, monkeypatch):
    from mlx_diffgemma.torch_backend import train as torch_train_module

    def broken(model):  # what a backend without a working compiler does on the first call
        for layer in model.layers:
            def fail(*args, **kwargs):
                raise RuntimeError("no C++ compiler found")
            layer.forward = fail

    monkeypatch.setattr(torch_train_module, "compile_layers", broken)
    logs = []
    losses = []
    torch_train(tiny(tmp_path / "compiled", compile=True), device="cpu", progress=False, log=logs.append,
                on_step=lambda step, loss, dt: losses.append(loss))
    plain, _ = run(torch_train, tiny(tmp_path / "plain"), device="cpu")
    assert any("torch.compile failed (RuntimeError: no C++ compiler found); training without it" in m for m in logs)
    np.testing.assert_allclose(losses, plain, rtol=2e-5)


def test_train_profile_times_plain_and_compiled_steps(tmp_path, monkeypatch):
    import json
    import sys

    from benchmarks import train_profile

    cfg = tiny(tmp_path / "run")
    config = tmp_path / "tiny.json"
    raw = {k: v for k, v in cfg.__dict__.items() if k != "out_dir"}
    config.write_text(json.dumps({**raw, "out_dir": "run"}))
    monkeypatch.setattr(sys, "argv", ["train_profile", "--config", str(config), "--device", "cpu", "--warmup", "1",
                                      "--timed", "1", "--steps", "1", "--rows", "5", "--out", str(tmp_path / "out"),
                                      "--no-bf16"])  # compiling under CPU autocast alone takes a minute
    assert train_profile.main() == 0
    text = (tmp_path / "out" / "train_profile-tiny.txt").read_text()
    assert "plain " in text and "torch.compile " in text and "aten::" in text


def test_the_train_cli_takes_the_torch_backend(tmp_path, capsys):
    import json

    from mlx_diffgemma.train import main

    cfg = tiny(tmp_path / "run", steps=2)
    config = tmp_path / "tiny.json"
    config.write_text(json.dumps({**cfg.__dict__, "out_dir": str(tmp_path / "run")}))
    assert main(["--config", str(config), "--backend", "torch", "--device", "cpu", "--no-progress"]) == 0
    assert latest_checkpoint(tmp_path / "run").name == "step-0000002"
    assert main(["--config", str(config), "--backend", "torch", "--device", "gpu"]) == 2
    assert "device 'gpu' is not a torch device; use cuda or cpu" in capsys.readouterr().err
    if not torch.cuda.is_available():
        assert main(["--config", str(config), "--backend", "torch", "--steps", "3"]) == 2
        assert "torch sees no CUDA GPU here; use cpu" in capsys.readouterr().err


def test_every_layer_of_a_deep_model_stays_compiled(tmp_path, caplog):
    """Eight layers share one code object, each with a graph per pass: past dynamo's default limit
    of 8 graphs the rest would fall back to eager with only a warning in the log."""
    import copy

    from test_train import TINY_MODEL

    model = copy.deepcopy(TINY_MODEL)
    model["text_config"].update(num_hidden_layers=8, layer_types=["sliding_attention", "full_attention"] * 4)
    torch._dynamo.reset()
    torch_train(tiny(tmp_path, model=model, compile=True, steps=2, self_cond_prob=1.0), device="cpu", progress=False)
    assert not [r for r in caplog.records if "recompile_limit" in r.getMessage() or "cache_size_limit" in r.getMessage()]
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] > 8


@pytest.mark.parametrize("objective", ["diffusion", "autoregressive"])
def test_bf16_autocast_takes_nearly_the_same_steps(tmp_path, objective):
    fp32, w32 = run(torch_train, tiny(tmp_path / "fp32", objective=objective), device="cpu")
    bf16, w16 = run(torch_train, tiny(tmp_path / "bf16", objective=objective), device="cpu", bf16=True)
    np.testing.assert_allclose(bf16, fp32, rtol=2e-2)  # bf16 keeps 8 bits of mantissa
    assert fp32 != bf16  # the passes did run in bf16
    assert all(w16[k].dtype == mx.float32 for k in w16)  # the weights and checkpoints stay fp32
