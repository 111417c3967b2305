"""The committed Sudoku training configs: every one parses, each stage of the staged model starts from
the previous stage's last checkpoint, and every diffusion config's autoregressive twin trains the
same way."""

import re
from dataclasses import asdict
from pathlib import Path

import pytest

from mlx_diffgemma.train import TrainConfig

TRAINING = Path(__file__).resolve().parents[1] / "training"


def stage_number(path: Path) -> int:
    return int(re.search(r"stage(\d+)", path.name).group(1))


def stages(objective: str) -> list[Path]:
    return sorted(TRAINING.glob(f"sudoku_stage*_{objective}.yaml"), key=stage_number)


def resolved(path: str) -> Path:
    p = Path(path)
    return (p if p.is_absolute() else TRAINING / p).resolve()


@pytest.mark.parametrize("path", sorted(TRAINING.glob("*.yaml")), ids=lambda p: p.name)
def test_every_config_parses(path):
    TrainConfig.from_file(path)


def assert_each_starts_where_the_one_before_ends(chain: list[Path]):
    for before, after in zip(chain, chain[1:]):
        prev, cfg = TrainConfig.from_file(before), TrainConfig.from_file(after)
        assert cfg.objective == prev.objective
        end = resolved(prev.out_dir) / "checkpoints" / f"step-{prev.steps:07d}"
        assert resolved(cfg.init_from) == end, f"{after.name} does not start where {before.name} ends"
        assert cfg.seed != prev.seed, f"{after.name} repeats {before.name}'s seed (the same batches again)"


@pytest.mark.parametrize("objective", ["diffusion", "autoregressive"])
def test_each_stage_starts_from_the_previous_stages_end(objective):
    chain = stages(objective)
    assert [stage_number(p) for p in chain] == list(range(1, len(chain) + 1)), "stage numbers have a gap"
    assert TrainConfig.from_file(chain[0]).init_from is None, "stage 1 trains from scratch"
    assert all(TrainConfig.from_file(p).objective == objective for p in chain)
    assert_each_starts_where_the_one_before_ends(chain)


# the bundled recipe's schedules, each with its twin
RECIPE = [("sudoku.yaml", "sudoku_autoregressive.yaml"), ("sudoku_schedule2.yaml", "sudoku_schedule2_autoregressive.yaml"),
          ("sudoku_schedule3.yaml", "sudoku_schedule3_autoregressive.yaml"),
          ("sudoku_schedule4.yaml", "sudoku_schedule4_autoregressive.yaml"),
          ("sudoku_schedule5.yaml", "sudoku_schedule5_autoregressive.yaml")]


def test_the_bundled_recipe_is_a_chain_of_schedules_from_scratch():
    for column in zip(*RECIPE):
        chain = [TRAINING / name for name in column]
        assert TrainConfig.from_file(chain[0]).init_from is None
        assert_each_starts_where_the_one_before_ends(chain)


def twins() -> list[tuple[Path, Path]]:
    """(diffusion config, its autoregressive twin): the bundled recipe's and every *_diffusion.yaml's."""
    pairs = [(TRAINING / d, TRAINING / a) for d, a in RECIPE]
    for d in sorted(TRAINING.glob("sudoku*_diffusion.yaml")):
        a = d.with_name(d.name.replace("_diffusion.yaml", "_autoregressive.yaml"))
        if a.exists():
            pairs.append((d, a))
    return pairs


def test_the_twins_train_the_same_way():
    pairs = twins()
    assert len(pairs) >= len(stages("diffusion")) + len(RECIPE)
    assert len(stages("diffusion")) == len(stages("autoregressive"))
    for d, a in pairs:
        dcfg, acfg = asdict(TrainConfig.from_file(d)), asdict(TrainConfig.from_file(a))
        assert (dcfg["objective"], acfg["objective"]) == ("diffusion", "autoregressive"), f"{d.name}, {a.name}"
        for key in ("out_dir", "init_from", "objective", "micro_batches"):  # micro-batches only split a batch
            dcfg.pop(key), acfg.pop(key)
        assert dcfg == acfg, f"{d.name} and {a.name} differ beyond the objective"


def test_the_first_schedule_trains_as_the_run_that_made_its_weights():
    # the first schedule's weights are the batch-32 study's run (benchmarks/results/models/sudoku-batch32-step5000);
    # the recipe differs only in the sampler settings chosen afterwards, with self-conditioning
    # pinned to the temperatures that run drew (its generation section had the defaults)
    from mlx_diffgemma.config import GenerationConfig

    study, bundled = asdict(TrainConfig.from_file(TRAINING / "sudoku_batch32.yaml")), asdict(
        TrainConfig.from_file(TRAINING / "sudoku.yaml"))
    default = GenerationConfig()
    assert bundled.pop("self_cond_temperatures") == [default.t_min, default.t_max]
    assert study.pop("self_cond_temperatures") is None and "t_min" not in study["generation"]
    for key in ("out_dir", "generation"):
        study.pop(key), bundled.pop(key)
    assert study == bundled


@pytest.mark.parametrize("schedule, run", [("sudoku_schedule2", "sudoku_finetune_a"), ("sudoku_schedule3", "sudoku_finetune_a2"),
                                           ("sudoku_schedule4", "sudoku_grow_deep"), ("sudoku_schedule5", "sudoku_grow_deep2")])
@pytest.mark.parametrize("objective", ["diffusion", "autoregressive"])
def test_the_later_schedules_train_as_the_runs_that_made_the_bundled_weights(schedule, run, objective):
    # the runs started from exported copies of the weights the recipe's configs start from
    recipe = TRAINING / (f"{schedule}.yaml" if objective == "diffusion" else f"{schedule}_autoregressive.yaml")
    made, cfg = asdict(TrainConfig.from_file(TRAINING / f"{run}_{objective}.yaml")), asdict(TrainConfig.from_file(recipe))
    for key in ("out_dir", "init_from"):
        made.pop(key), cfg.pop(key)
    assert made == cfg


def test_a_later_schedule_trains_what_it_starts_from_first(tmp_path, monkeypatch):
    import importlib.util

    from mlx_diffgemma.train import TrainError

    spec = importlib.util.spec_from_file_location("train_sudoku", TRAINING / "train_sudoku.py")
    train_sudoku = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(train_sudoku)
    (tmp_path / "a.yaml").write_text("base: " + str(TRAINING / "sudoku.yaml") + "\nout_dir: runs/a\nsteps: 30\n")
    (tmp_path / "b.yaml").write_text("base: a.yaml\nout_dir: runs/b\nmodel: null\ninit_from: runs/a/checkpoints/step-0000030\n")
    (tmp_path / "c.yaml").write_text("base: b.yaml\nout_dir: runs/c\ninit_from: runs/b/checkpoints/step-0000030\n")
    assert [p.name for p in train_sudoku.prerequisites(tmp_path / "c.yaml")] == ["a.yaml", "b.yaml"]
    assert train_sudoku.prerequisites(tmp_path / "a.yaml") == []
    (tmp_path / "runs/b/checkpoints/step-0000030").mkdir(parents=True)  # b already trained: only c is left
    assert train_sudoku.prerequisites(tmp_path / "c.yaml") == []
    monkeypatch.chdir(tmp_path.parent)  # a config named relative to the working directory
    assert train_sudoku.prerequisites(Path(tmp_path.name) / "c.yaml") == []
    (tmp_path / "d.yaml").write_text("base: b.yaml\nout_dir: runs/d\ninit_from: runs/x/checkpoints/step-0000030\n")
    assert train_sudoku.prerequisites(tmp_path / "d.yaml") == []  # no config makes it: left to the loader
    (tmp_path / "e.yaml").write_text("base: b.yaml\nout_dir: runs/e\ninit_from: runs/e/checkpoints/step-0000030\n")
    with pytest.raises(TrainError, match="leads back to e.yaml"):
        train_sudoku.prerequisites(tmp_path / "e.yaml")


def test_a_budget_for_a_later_schedule_whose_start_is_untrained_is_refused(tmp_path):
    import subprocess
    import sys

    (tmp_path / "a.yaml").write_text("base: " + str(TRAINING / "sudoku.yaml") + "\nout_dir: runs/a\nsteps: 30\n")
    (tmp_path / "b.yaml").write_text("base: a.yaml\nout_dir: runs/b\nmodel: null\ninit_from: runs/a/checkpoints/step-0000030\n")
    run = subprocess.run([sys.executable, str(TRAINING / "train_sudoku.py"), "--config", str(tmp_path / "b.yaml"),
                          "--budget-s", "60"], capture_output=True, text=True, timeout=120)
    assert run.returncode == 2, run.stderr
    assert "--budget-s times b.yaml only" in run.stderr and "a.yaml" in run.stderr
    assert not (tmp_path / "runs").exists()  # refused before anything trained
