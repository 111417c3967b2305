"""`python -m mlx_diffgemma.doctor` on this machine (CPU) and with a faked GPU kernel."""

import json

from click.testing import CliRunner

from mlx_diffgemma import doctor

TINY = dict(hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=1,
            head_dim=16, global_head_dim=32, num_global_key_value_heads=1, sliding_window=16, num_experts=4,
            top_k_experts=2, moe_intermediate_size=32, vocab_size=512)


def test_doctor_json_on_cpu(monkeypatch):
    monkeypatch.setitem(doctor.SIZES, "tiny", TINY)
    result = CliRunner().invoke(doctor.main, ["--json", "--sizes", "tiny", "--budget", "1"])
    assert result.exit_code == 0, result.output
    report = json.loads(result.output)
    assert report["machine"]["backend"] == "cpu" and report["machine"]["mlx"]
    assert report["kernels"][0]["verdict"] == "not in use"
    step = report["denoise_step"][0]
    assert step["size"] == "tiny" and step["ms_per_step"] > 0 and step["steps_timed"] >= 2
    assert "CPU: custom kernels not in use" in report["summary"]


def test_doctor_reports_a_disabled_kernel(monkeypatch, tmp_path):
    from mlx_diffgemma.kernels import epilogue, registry

    monkeypatch.setattr(epilogue, "gpu_target", lambda: "fake")
    monkeypatch.setenv("MLX_DIFFGEMMA_CACHE_DIR", str(tmp_path))
    kernel = registry.KERNELS["lm_head_epilogue"]

    def broken(target, *args):
        raise RuntimeError("Unable to build metal library")

    monkeypatch.setattr(kernel, "fast", broken)
    rows = doctor.kernels(recheck=True)
    assert rows[0]["verdict"] == "fallback" and "Unable to build" in rows[0]["reason"]
    registry.reset()


def test_doctor_rejects_unknown_size():
    result = CliRunner().invoke(doctor.main, ["--sizes", "huge"])
    assert result.exit_code == 2 and "unknown size 'huge'" in result.output
