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
    assert "tokens in 2 canvas(es), 8 steps" in err
    assert r.stdout.decode().strip()  # random weights: some text, meaningless


def test_cli_json_and_stdin(gemma_checkpoint):
    path, _ = gemma_checkpoint
    r = run("--model", str(path), "--json", "--steps", "3", "--seed", "4", stdin="Hello there".encode())
    assert r.returncode == 0, r.stderr.decode()
    out = json.loads(r.stdout)
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
