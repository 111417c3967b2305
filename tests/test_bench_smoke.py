"""The benchmark harness in its CI-fast smoke mode (tiny, one repeat, this engine + transformers),
so it cannot rot: the result file's schema, and numbers that hang together."""

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest

from benchmarks.flops import step_flops
from benchmarks.run import ROW_FIELDS, SCHEMA
from benchmarks.sizes import text_config

ROOT = Path(__file__).resolve().parents[1]

REPO = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def smoke(tmp_path_factory):
    out, work = tmp_path_factory.mktemp("results"), tmp_path_factory.mktemp("work")
    proc = subprocess.run(
        [sys.executable, "-m", "benchmarks.run", "--smoke", "--out", str(out), "--work-dir", str(work), "--threads", "1"],
        cwd=REPO, capture_output=True, text=True, timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    files = sorted(out.glob("*.json"))
    assert len(files) == 1, files
    return json.loads(files[0].read_text()), files[0]


def test_schema_and_machine_record(smoke):
    result, path = smoke
    assert result["schema"] == SCHEMA
    m = result["machine"]
    assert m["cpu"] and m["cpu_count"] >= 1 and "mlx" in m["versions"] and "torch" in m["versions"]
    assert result["settings"]["smoke"] is True
    for row in result["rows"]:
        assert set(ROW_FIELDS) <= row.keys(), row
    md = path.with_suffix(".md").read_text()
    assert "| ours-reference | generate-16 |" in md and "| transformers | step@128 |" in md


def test_every_system_and_scenario_ran(smoke):
    result, _ = smoke
    got = {(r["system"], r["scenario"]): r for r in result["rows"]}
    expected = [(s, sc) for s in ("ours-reference", "transformers") for sc in ("step@128", "generate-16")]
    expected += [("gemm-mlx", "gemm"), ("gemm-torch", "gemm")]
    assert sorted(got) == sorted(expected)
    for key in expected:
        assert got[key]["status"] == "ok", (key, got[key].get("reason"), got[key].get("stderr_tail"))


def test_numbers_hang_together(smoke):
    result, _ = smoke
    text = text_config("tiny")
    for r in result["rows"]:
        assert r["size"] == "tiny" and r["peak_memory_bytes"] > 10 * 2**20
        if r["scenario"] == "gemm":
            assert r["gemm_flops_per_s"] > 1e8
            continue
        assert r["ms_per_step_min"] <= r["ms_per_step"] <= r["ms_per_step_max"] if r["ms_per_step_min"] else r["ms_per_step"] > 0
        assert r["prefill_tokens_per_s"] > 0
        assert r["step_flops"] > 0 and math.isfinite(r["gemm_fraction"]) and r["gemm_fraction"] > 0
        if r["scenario"] == "generate-16":
            # whole canvases, exactly 16 full-width steps each, EOS off
            assert r["steps_per_canvas"] == [16]
            assert 16 <= r["row_passes_per_token"] < 16 * 256 / 240
            assert r["committed_tokens"] >= 240
            tokens_per_s = r["committed_tokens"] / (16 * r["ms_per_step"] / 1e3)
            assert r["committed_tokens_per_s"] == pytest.approx(tokens_per_s, rel=0.02)
        else:
            assert r["step_flops"] == pytest.approx(step_flops(text, 256, 128))


def test_flop_model_matches_the_published_accounting():
    # landscape.md 5d: ~2 x 3.06B x 256 trunk + 0.38 TFLOP head + 0.38 self-conditioning ~ 2.3 TFLOP
    full = text_config("full")
    assert step_flops(full, 256, 0) == pytest.approx(2.3e12, rel=0.05)
    # one decode token: ~2 x 3.8B active parameters
    assert step_flops(full, 256, 0, autoregressive=True) == pytest.approx(2 * 3.75e9, rel=0.05)


def test_bad_size_is_a_one_line_error():
    proc = subprocess.run([sys.executable, "-m", "benchmarks.run", "--sizes", "huge"], cwd=REPO,
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2
    assert "unknown size 'huge'" in proc.stderr and "Traceback" not in proc.stderr


def test_sudoku_clash_rates_count_the_right_units():
    import numpy as np

    from benchmarks.sudoku_constraints import clash_rates
    from mlx_diffgemma import sudoku

    puzzles, solutions = sudoku.puzzle_set(5, 1, (40, 40))
    p, s = puzzles[0], solutions[0]
    i = int(np.flatnonzero(p == 0)[0])
    row = set(p[(np.arange(81) // 9 == i // 9) & (p > 0)].tolist())
    col = set(p[(np.arange(81) % 9 == i % 9) & (p > 0)].tolist())
    only_row = sorted(row - col - {s[i]})
    assert only_row, "puzzle seed 5 should have a row-only given next to its first blank"
    filled = s.copy()
    filled[i] = only_row[0]  # one wrong blank, clashing with its row and not its column
    rates = clash_rates(puzzles, solutions, filled[None])
    assert rates["row"][:1] == (1.0,) and rates["column"][:1] == (0.0,) and rates["row"][2] == 1
    assert clash_rates(puzzles, solutions, solutions)["box"][2] == 0  # nothing wrong, nothing counted


def test_sudoku_eval_reports_each_fast_mode(tmp_path, monkeypatch):
    from benchmarks import sudoku_eval

    monkeypatch.setattr(sudoku_eval, "RESULTS", tmp_path)
    assert sudoku_eval.main(["--puzzles", "3", "--givens", "45", "50", "--modes", "compact,turbo",
                             "--batch", "3", "--out", "eval"]) == 0
    doc = json.loads((tmp_path / "eval.json").read_text())
    assert list(doc["systems"]) == ["diffusion", "diffusion compact", "diffusion turbo"]
    for system in doc["systems"].values():
        assert system["overall"]["puzzles"] == 3 and 0.0 <= system["blank_cells_right"] <= 1.0
    assert "diffusion turbo solved" in (tmp_path / "eval.md").read_text()


def test_sudoku_eval_tries_column_contains_the_reference(tmp_path, monkeypatch):
    from benchmarks import sudoku_eval

    monkeypatch.setattr(sudoku_eval, "RESULTS", tmp_path)
    assert sudoku_eval.main(["--puzzles", "4", "--givens", "30", "34", "--tries", "2", "--batch", "4",
                             "--steps", "12", "--out", "eval"]) == 0  # 12 steps: the columns, cheaply
    systems = json.loads((tmp_path / "eval.json").read_text())["systems"]
    ref, tried = systems["diffusion"], systems["diffusion, 2 tries"]
    assert tried["solved_on_try_1"] == tried["reference_solved"] == ref["overall"]["solved"]
    assert tried["overall"]["solved"] >= ref["overall"]["solved"]
    assert "diffusion, 2 tries solved" in (tmp_path / "eval.md").read_text()
    assert sudoku_eval.main(["--puzzles", "1", "--tries", "0"]) == 2


def test_sudoku_eval_pairs_two_checkpoints(tmp_path, monkeypatch):
    import numpy as np

    from benchmarks import sudoku_eval
    from mlx_diffgemma import sudoku

    monkeypatch.setattr(sudoku_eval, "RESULTS", tmp_path)
    bundled = str(ROOT / "mlx_diffgemma" / "models" / "sudoku")
    assert sudoku_eval.main(["--puzzles", "3", "--givens", "30", "40", "--compare-to", bundled, "--batch", "3",
                             "--out", "eval"]) == 0
    systems = json.loads((tmp_path / "eval.json").read_text())["systems"]
    # the same weights under the same noise: identical grids, so every paired difference is zero
    d = systems["compared"]["paired_minus_this"]
    assert d["solved_ge_30"]["mean"] == d["blank_cells_right"]["mean"] == 0.0
    assert systems["compared"]["blank_cells_right"] == systems["diffusion"]["blank_cells_right"]
    # and a different model gives a nonzero cell difference, with the sign of the direct rates
    grids = np.stack([np.full(81, 1)] * 3)
    puzzles, solutions = sudoku.puzzle_set(3, 3, (30, 30))
    diff = sudoku_eval.paired(puzzles, solutions, solutions, grids)
    assert diff["blank_cells_right"]["mean"] > 0.5 and diff["only_first_solved"] == 3


def test_sudoku_eval_pairs_a_sampler_setting_against_the_defaults(tmp_path, monkeypatch, capsys):
    from benchmarks import sudoku_eval

    monkeypatch.setattr(sudoku_eval, "RESULTS", tmp_path)
    bundled = str(ROOT / "mlx_diffgemma" / "models" / "sudoku")
    args = ["--puzzles", "2", "--givens", "30", "40", "--batch", "2", "--steps", "2", "--compare-to", bundled]
    assert sudoku_eval.main([*args, "--compare-defaults", "--out", "eval"]) == 0
    systems = json.loads((tmp_path / "eval.json").read_text())["systems"]
    assert systems["diffusion"]["max_denoising_steps"] == 2
    assert systems["compared"]["max_denoising_steps"] == 48  # the checkpoint's own setting
    assert sudoku_eval.main([*args, "--out", "same"]) == 0  # without the flag both take the overrides
    assert json.loads((tmp_path / "same.json").read_text())["systems"]["compared"]["max_denoising_steps"] == 2
    assert sudoku_eval.main(["--puzzles", "1", "--compare-defaults"]) == 2
    assert "--compare-defaults needs --compare-to" in capsys.readouterr().err


def test_sudoku_eval_names_an_unknown_mode(capsys):
    from benchmarks import sudoku_eval

    assert sudoku_eval.main(["--puzzles", "1", "--modes", "warp"]) == 2
    err = capsys.readouterr().err
    assert "unknown mode 'warp'" in err and "turbo" in err and err.count("\n") == 1
    # knobs as everywhere else a mode is named
    assert sudoku_eval.main(["--puzzles", "1", "--modes", "compact+refresh_every=x"]) == 2
    err = capsys.readouterr().err
    assert "refresh_every='x'" in err and err.count("\n") == 1


def test_step_cost_fits_a_line_through_its_measurements(tmp_path, monkeypatch):
    from benchmarks import step_cost

    monkeypatch.setattr(step_cost, "RESULTS", tmp_path)
    assert step_cost.main(["--rows", "4,full", "--reps", "1", "--rounds", "1", "--out", "cost"]) == 0
    doc = json.loads((tmp_path / "cost.json").read_text())
    assert [r["rows"] for r in doc["rows"]] == [4, 81]
    for r in doc["rows"]:
        assert r["trunk_ms"] > 0 and r["partial_trunk_ms"] > 0 and r["head_ms"] > 0
    fixed, per_row = doc["fit_fixed_ms_per_row_ms"]["trunk_ms"]
    # two points: the line passes through both
    assert math.isclose(fixed + per_row * 4, doc["rows"][0]["trunk_ms"], abs_tol=2e-3)
    assert "ms per row" in (tmp_path / "cost.md").read_text()


def test_step_cost_names_bad_rows(capsys):
    from benchmarks import step_cost

    assert step_cost.main(["--rows", "4,x"]) == 2
    assert "--rows '4,x'" in capsys.readouterr().err
    assert step_cost.main(["--rows", "500,full"]) == 2


def test_sudoku_sweep_pairs_each_setting_with_the_default(tmp_path, monkeypatch):
    from benchmarks import sudoku_sweep

    monkeypatch.setattr(sudoku_sweep, "RESULTS", tmp_path)
    assert sudoku_sweep.main(["t_max=1.0,t_min=0.6", "--puzzles", "3", "--givens", "45", "50", "--batch", "3",
                              "--out", "sweep"]) == 0
    doc = json.loads((tmp_path / "sweep.json").read_text())
    assert [r["setting"] for r in doc["rows"]] == ["model default", {"t_max": 1.0, "t_min": 0.6}]
    assert doc["rows"][0]["solved_minus_default"] == 0.0
    assert "t_max=1.0, t_min=0.6" in (tmp_path / "sweep.md").read_text()


@pytest.mark.parametrize("argv, culprit", [
    (["temperature=1"], "'temperature=1' is not KNOB=VALUE"),
    (["t_max=hot"], "t_max needs a float, got 'hot'"),
    (["t_max=0.3,t_min=0.5"], "need 0 <= t_min < t_max"),
    (["--puzzle-seed", "20261127"], "is the held-out set"),
])
def test_sudoku_sweep_bad_input_is_one_line(capsys, argv, culprit):
    from benchmarks import sudoku_sweep

    assert sudoku_sweep.main(argv) == 2
    err = capsys.readouterr().err
    assert culprit in err and err.count("\n") == 1


def test_fast_path_gate_pairs_every_mode_with_the_reference(tmp_path, monkeypatch):
    from benchmarks import fast_path

    monkeypatch.setattr(fast_path, "RESULTS", tmp_path)
    fast_path.main(["--puzzles", "2", "--givens", "45", "50", "--modes", "compact"])
    files = sorted(tmp_path.glob("fast_path-*.json"))
    assert len(files) == 1
    rows = {r["mode"]: r for r in json.loads(files[0].read_text())["rows"]}
    assert list(rows) == ["reference", "compact"]  # the reference is always added, first
    ref, compact = rows["reference"], rows["compact"]
    assert ref["row_pass_reduction"] == 1.0 and ref["accuracy_minus_reference"] == 0.0
    assert ref["row_passes_per_token"] == ref["mean_steps"]  # a full canvas of 81 rows commits 81 digits
    assert compact["row_passes_per_token"] < compact["mean_steps"]  # frozen rows left the trunk
    assert compact["ms_per_token"] > 0 and compact["puzzles"] == 2
    lo, hi = compact["wall_time_reduction_95ci"]
    assert lo <= compact["wall_time_reduction"] <= hi and ref["wall_time_reduction_95ci"] == [1.0, 1.0]
    assert ref["denoise_wall_time_reduction"] is None and compact["prompt_ms_per_item"] is None  # fused
    # but a Sudoku prompt (82 tokens) is longer than the 81-row canvas: it keeps a pass of its own
    md = files[0].with_suffix(".md").read_text()
    assert ref["prompt_fused_items"] == 0 and "in a pass of its own" in md
    assert "| compact |" in md
    n_exact = ref["exact_count"]  # the steps split by the reference's answer add up to the mean
    assert n_exact == round(ref["exact"] * 2) and f"the {n_exact} items it answered exactly" in md
    for r in (ref, compact):
        split = [(n_exact, r["mean_steps_where_reference_exact"]), (2 - n_exact, r["mean_steps_where_reference_missed"])]
        assert all((k == 0) == (v is None) for k, v in split)
        assert sum(k * v for k, v in split if k) / 2 == pytest.approx(r["mean_steps"], abs=0.01)
        assert (r["max_steps_where_reference_exact"] is None) == (n_exact == 0)

    files[0].unlink()
    fast_path.main(["--puzzles", "2", "--givens", "45", "50", "--modes", "compact", "--separate-prompt"])
    rows = {r["mode"]: r for r in json.loads(next(tmp_path.glob("fast_path-*.json")).read_text())["rows"]}
    assert rows["reference"]["denoise_wall_time_reduction"] == 1.0 and rows["compact"]["prompt_ms_per_item"] > 0
    for key in ("exact", "mean_steps", "row_passes_per_token"):  # the same work, only scheduled apart
        assert rows["compact"][key] == compact[key]


def test_fast_path_time_budget_stops_early_and_says_so(tmp_path, monkeypatch):
    from benchmarks import fast_path

    monkeypatch.setattr(fast_path, "RESULTS", tmp_path)
    # a budget already spent: the two items a standard error needs, then it stops
    assert fast_path.main(["--puzzles", "4", "--givens", "48", "50", "--modes", "settled", "--time-budget", "0"]) == 0
    out = next(tmp_path.glob("fast_path-*.json"))
    doc = json.loads(out.read_text())
    assert doc["items_asked"] == 4 and all(r["puzzles"] == 2 for r in doc["rows"])
    assert "stopped by --time-budget after 2 of 4 items" in out.with_suffix(".md").read_text()


def test_fast_path_default_modes_skip_what_the_model_cannot_run(tmp_path, monkeypatch):
    from benchmarks import fast_path
    from mlx_diffgemma.fast import MODES

    monkeypatch.setattr(fast_path, "RESULTS", tmp_path)
    assert fast_path.main(["--puzzles", "2", "--givens", "48", "50"]) == 0
    rows = json.loads(next(tmp_path.glob("fast_path-*.json")).read_text())["rows"]
    assert [r["mode"] for r in rows] == [m for m in MODES if m != "short"]  # Sudoku: whole canvases only


def test_fast_path_sort_task_counts_the_answer_not_the_canvas(tmp_path, monkeypatch):
    """A sort model (two training steps: the shapes are what matter) through the gate: committed
    tokens are each list's length + 1, so the reference's row-passes per token are
    steps x 128 / (mean length + 1), and a list's group is its length bucket."""
    from benchmarks import fast_path
    from mlx_diffgemma import sorting
    from mlx_diffgemma.train import TrainConfig, train

    cfg = TrainConfig.from_file(ROOT / "training" / "sort.yaml")
    cfg.out_dir, cfg.steps, cfg.save_every, cfg.warmup_steps = str(tmp_path / "run"), 2, 2, 1
    cfg.data = {**cfg.data, "canvas_lengths": [16, 128]}  # short canvases too, for the short mode below
    ckpt = train(cfg, progress=False, log=lambda *a: None)
    assert json.loads((ckpt / "config.json").read_text())["trained_canvas_lengths"] == [16, 128]
    monkeypatch.setattr(fast_path, "RESULTS", tmp_path)
    fast_path.main(["--task", "sort", "--model", str(ckpt), "--puzzles", "2", "--lengths", "3", "14",
                    "--modes", "freeze,freeze+block_rows=16"])
    doc = json.loads(next(tmp_path.glob("fast_path-*.json")).read_text())
    rows = {r["mode"]: r for r in doc["rows"]}
    lists = sorting.list_set(doc["puzzle_seed"], 2, (3, 14))
    committed = sum(len(x) + 1 for x in lists)
    ref = rows["reference"]
    assert ref["row_passes_per_token"] == round(ref["mean_steps"] * 2 * sorting.CANVAS / committed, 3)
    assert set(ref["by_group"]) <= {"1-12", "13-24"}
    assert sum(g["items"] for g in ref["by_group"].values()) == 2
    md = next(tmp_path.glob("fast_path-*.md")).read_text()
    assert "| freeze |" in md
    # a sort prompt (49 tokens) is shorter than the 128-row canvas: it rides along with the first step
    assert ref["prompt_fused_items"] == 2 and "encoded with the first canvas step." in md
    # 16-row canvases, committed one after another until an EOS: at most 16 rows per step
    short = rows["freeze+block_rows=16"]
    assert short["row_passes_per_token"] <= round(short["mean_steps"] * 2 * 16 / committed, 3)



@pytest.mark.parametrize("argv, culprit", [
    (["--modes", "warp"], "unknown mode 'warp'"),
    (["--modes", "compact+refresh_every=x"], "refresh_every='x'"),
    (["--task", "sort", "--lengths", "0", "5"], "1..48"),
    (["--puzzles", "1"], "at least 2 items"),
    (["--model", "/nonexistent/model"], "/nonexistent/model"),
    (["--puzzles", "2", "--modes", "short"], "48-row canvases, but this model was trained on canvases of 81 rows"),
])
def test_fast_path_bad_input_is_one_line(capsys, argv, culprit):
    from benchmarks import fast_path

    assert fast_path.main(argv) == 2
    err = capsys.readouterr().err
    assert culprit in err and err.count("\n") == 1, err

def test_sudoku_eval_takes_sampler_overrides(tmp_path, monkeypatch, capsys):
    from benchmarks import sudoku_eval
    from mlx_diffgemma.loading import resolve

    bundled = json.loads((resolve("sudoku") / "generation_config.json").read_text())
    assert (bundled["t_max"], bundled["t_min"]) != (1.2, 0.5)  # so the override below shows
    monkeypatch.setattr(sudoku_eval, "RESULTS", tmp_path)
    assert sudoku_eval.main(["--puzzles", "2", "--givens", "45", "50", "--batch", "2", "--t-max", "1.2",
                             "--t-min", "0.5", "--out", "hot"]) == 0
    ref = json.loads((tmp_path / "hot.json").read_text())["systems"]["diffusion"]
    assert (ref["t_max"], ref["t_min"]) == (1.2, 0.5)
    assert "t 1.2 to 0.5" in (tmp_path / "hot.md").read_text()
    capsys.readouterr()
    assert sudoku_eval.main(["--puzzles", "1", "--t-max", "0.3"]) == 2  # t_max below the model's t_min
    errors = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error")]
    assert errors == [f"error: need 0 <= t_min < t_max, got t_min={bundled['t_min']}, t_max=0.3"]


def test_pass_overhead_measures_a_small_pass(tmp_path, monkeypatch, capsys):
    from benchmarks import pass_overhead

    monkeypatch.setattr(pass_overhead, "RESULTS", tmp_path)
    assert pass_overhead.main(["--model", "sort", "--rounds", "1"]) == 0
    doc = json.loads(next(tmp_path.glob("pass_overhead-*.json")).read_text())
    assert doc["eval_us_per_node"] > 0 and doc["gather_mm_us_per_pair_256"] > 0
    assert doc["nodes_partial_pass_8_rows"] > 100 and doc["nodes_whole_pass"] > 100  # four layers of small ops
    assert [n["rows"] for n in doc["rms_norm_per_call"]] == [4, 48, 128]
    passes = doc["compiled_passes"]
    assert [(c["pass"], c["rows"]) for c in passes] == [("partial", 8), ("whole", 48), ("whole", 128)]
    assert all(c["plain_ms"] > 0 and c["compiled_ms"] > 0 and c["max_abs_diff"] < 1e-4 for c in passes)
    assert "graph nodes" in next(tmp_path.glob("pass_overhead-*.md")).read_text()
    assert pass_overhead.main(["--model", str(tmp_path / "missing")]) == 2
    assert "missing" in capsys.readouterr().err


def test_cuda_launch_probe_runs_every_part(capsys):
    # on a CPU every part of the autoregressive step evaluates; on a GPU the report names the one that raises
    from benchmarks import cuda_launch_probe

    assert cuda_launch_probe.main(["--config", str(ROOT / "training" / "sudoku_gpu_autoregressive.yaml"),
                                   "--batch", "2", "--device", "cpu"]) == 0
    out = capsys.readouterr().out
    assert "layer 7 backward: ok" in out and "whole step (value_and_grad): ok" in out


def test_sudoku_first_pass_reads_the_bundled_models_guesses():
    import numpy as np

    from benchmarks.sudoku_constraints import clash_rates, first_pass
    from mlx_diffgemma import load, sudoku

    model, _ = load("sudoku")
    puzzles, solutions = sudoku.puzzle_set(5, 4, (45, 45))
    guessed = first_pass(model, puzzles)
    assert guessed.shape == (4, 81)
    blank = puzzles == 0
    assert (guessed[~blank] == puzzles[~blank]).mean() > 0.99  # it copies the givens
    assert (guessed == solutions)[blank].mean() > 0.6  # one pass already fills most blanks (chance: 1/9)
    assert clash_rates(puzzles, solutions, guessed)["row"][0] < 0.1  # and breaks no row against the givens


def test_gpu_session_gate_rehearses_on_the_cpu(tmp_path):
    """The lease's gate command, rehearsed (DRY=1: no unpacking, MLX on the CPU) on two items a
    run: a broken script would cost a GPU lease. Its results are packed and leave no file behind."""
    import os
    import tarfile

    before = set((ROOT / "benchmarks" / "results").iterdir())
    env = {**os.environ, "DRY": "1", "GATE_PUZZLES": "2", "GATE_LISTS": "2", "GATE_BUDGET_S": "60",
           "OUT": str(tmp_path)}
    p = subprocess.run(["bash", str(ROOT / "benchmarks" / "gpu_session.sh"), "gate"], env=env,
                       capture_output=True, text=True, timeout=600)
    assert p.returncode == 0, p.stderr
    with tarfile.open(tmp_path / "results.tar.gz") as t:
        names = t.getnames()
        timeline = t.extractfile("./timeline.txt").read().decode()
        sudoku = t.extractfile("./gate_sudoku_20261127.log").read().decode()
    assert timeline.count("(rc 0)") == 3, timeline
    assert sum(n.endswith(".md") and "fast_path-" in n for n in names) == 3, names
    assert "| bounded+compact=0 |" in sudoku and "| turbo |" in sudoku
    assert set((ROOT / "benchmarks" / "results").iterdir()) == before
