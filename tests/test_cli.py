"""`python -m mlx_diffgemma.generate` on a tiny local checkpoint, and its one-line errors."""

import json
import subprocess
import sys


def run(*args, stdin=None):
    return subprocess.run(
        [sys.executable, "-m", "mlx_diffgemma.generate", *args],
        input=stdin, capture_output=True, timeout=300,
    )


def test_cli_prints_an_answer_and_stats(gemma_checkpoint):
    path, _ = gemma_checkpoint
    r = run("--model", str(path), "--prompt", "Why is the sky blue?", "--max-tokens", "40", "--steps", "4")
    assert r.returncode == 0, r.stderr.decode()
    err = r.stderr.decode()
    assert "tokens in 2 canvas(es), 8 steps" in err and "tokens/forward" in err and "peak" in err
    assert r.stdout.decode().strip()  # random weights: some text, meaningless


def test_cli_json_and_stdin(gemma_checkpoint):
    path, _ = gemma_checkpoint
    r = run("--model", str(path), "--json", "--steps", "3", "--seed", "4", stdin="Hello there".encode())
    assert r.returncode == 0, r.stderr.decode()
    out = json.loads(r.stdout)
    assert {"answer", "reasoning", "tool_calls", "finish_reason"} <= set(out)
    for key in ("committed_tokens_per_s", "steps_per_canvas", "tokens_per_forward", "prefill_tokens_per_s",
                "peak_memory_bytes"):
        assert key in out["stats"]
    assert out["stats"]["denoise_steps"] == 3 and out["stats"]["canvases"] == 1
    assert out["stats"]["prompt_tokens"] > 5


def test_cli_bad_input_is_one_line_exit_2(tmp_path, gemma_checkpoint):
    path, _ = gemma_checkpoint
    cases = [
        (("--model", str(tmp_path / "nope"), "--prompt", "x"), None, "no such directory"),
        (("--model", str(path), "--prompt", "   "), None, "prompt is empty"),
        (("--model", str(path)), b"\xff\xfe\x00bad", "not valid UTF-8"),
        (("--model", str(path), "--prompt", "x", "--steps", "0"), None, "--steps"),
    ]
    for args, stdin, message in cases:
        r = run(*args, stdin=stdin)
        err = r.stderr.decode().strip()
        assert r.returncode == 2, (args, err)
        assert message in err, (args, err)
        assert "Traceback" not in err


# -- every flag, in process (click's runner: the same command without a new interpreter) -----------

import pytest
from click.testing import CliRunner

from mlx_diffgemma.cli import generate_cli


def invoke(*args, stdin=None, env=None):
    return CliRunner().invoke(generate_cli, list(args), input=stdin, env=env)


def as_json(result):
    assert result.exit_code == 0, result.output
    return json.loads(result.stdout.strip().splitlines()[-1])


def test_system_thinking_and_sampler_flags(gemma_checkpoint):
    path = str(gemma_checkpoint[0])
    base = ("--model", path, "--prompt", "Hi", "--json", "--steps", "2")
    plain = as_json(invoke(*base))
    system = as_json(invoke(*base, "--system", "Be brief"))
    thinking = as_json(invoke(*base, "--thinking"))
    assert system["stats"]["prompt_tokens"] > plain["stats"]["prompt_tokens"]
    assert thinking["stats"]["prompt_tokens"] != plain["stats"]["prompt_tokens"]
    seeded = as_json(invoke(*base, "--seed", "9"))
    assert seeded["answer"] != plain["answer"] or seeded["stats"] != plain["stats"]
    long = as_json(invoke(*base, "--max-tokens", "33", "--entropy-bound", "5", "--t-max", "1.0", "--t-min", "0.5"))
    assert (long["stats"]["canvases"], long["finish_reason"]) in [(2, "length"), (1, "stop"), (2, "stop")]
    fast = as_json(invoke(*base, "--mode", "reference"))
    assert fast["stats"]["denoise_steps"] == 2


def test_show_canvas_draws_each_step(gemma_checkpoint):
    r = invoke("--model", str(gemma_checkpoint[0]), "--prompt", "Hi", "--steps", "3", "--show-canvas")
    assert r.exit_code == 0, r.output
    for step in (1, 2, 3):
        assert f"[canvas 1 · step {step}/3 · accepted" in r.stdout
    assert "\x1b[" in r.stdout  # redrawn in place


@pytest.mark.parametrize("args, message", [
    (("--json", "--show-canvas"), "--json and --show-canvas conflict"),
    (("--t-min", "0.9", "--t-max", "0.5"), "--t-min 0.9 is above --t-max 0.5"),
    (("--device", "cpu"), "applies to backend='torch' only"),
    (("--mode", "warp"), "--mode warp"),
    (("--max-tokens", "0"), "--max-tokens"),
])
def test_conflicting_and_bad_flags(gemma_checkpoint, args, message):
    r = invoke("--model", str(gemma_checkpoint[0]), "--prompt", "Hi", *args)
    assert r.exit_code == 2, r.output
    assert message in r.output and len(r.output.strip().splitlines()) == 1


def test_prompt_longer_than_the_context(gemma_checkpoint):
    r = invoke("--model", str(gemma_checkpoint[0]), stdin="Why is the sky blue? " * 1000)
    assert r.exit_code == 2
    assert r.output.strip().splitlines() == [r.output.strip()] and "too long for the model's context" in r.output


def test_hub_id_offline(tmp_path):
    env = {"HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp_path)}
    r = invoke("--model", "google/diffusiongemma-26B-A4B-it", "--prompt", "Hi", env=env)
    assert r.exit_code == 2
    assert "could not download from the Hugging Face hub" in r.output and len(r.output.strip().splitlines()) == 1


def test_torch_backend_flag(gemma_checkpoint):
    pytest.importorskip("mlx_diffgemma.torch_backend")
    out = as_json(invoke("--model", str(gemma_checkpoint[0]), "--prompt", "Hi", "--json", "--steps", "2",
                         "--backend", "torch", "--device", "cpu"))
    assert out["stats"]["denoise_steps"] == 2
