"""The committed Sudoku training configs: every one parses, each stage starts from the previous
stage's last checkpoint, and the diffusion model and its autoregressive twin train the same way."""

import re
from dataclasses import asdict
from pathlib import Path

import pytest

from mlx_diffgemma.train import TrainConfig

TRAINING = Path(__file__).resolve().parents[1] / "training"
FIRST = {"diffusion": "sudoku.yaml", "autoregressive": "sudoku_autoregressive.yaml"}


def stage_number(path: Path) -> int:
    return int(re.search(r"stage(\d+)", path.name).group(1))


def stages(objective: str) -> list[Path]:
    later = sorted(TRAINING.glob(f"sudoku_stage*_{objective}.yaml"), key=stage_number)
    return [TRAINING / FIRST[objective], *later]


def resolved(path: str) -> Path:
    p = Path(path)
    return (p if p.is_absolute() else TRAINING / p).resolve()


@pytest.mark.parametrize("path", sorted(TRAINING.glob("*.yaml")), ids=lambda p: p.name)
def test_every_config_parses(path):
    TrainConfig.from_file(path)


@pytest.mark.parametrize("objective", ["diffusion", "autoregressive"])
def test_each_stage_starts_from_the_previous_stages_end(objective):
    chain = stages(objective)
    assert [stage_number(p) for p in chain[1:]] == list(range(2, len(chain) + 1)), "stage numbers have a gap"
    for before, after in zip(chain, chain[1:]):
        prev, cfg = TrainConfig.from_file(before), TrainConfig.from_file(after)
        assert cfg.objective == prev.objective == objective
        end = resolved(prev.out_dir) / "checkpoints" / f"step-{prev.steps:07d}"
        assert resolved(cfg.init_from) == end, f"{after.name} does not start where {before.name} ends"
        assert cfg.seed != prev.seed, f"{after.name} repeats {before.name}'s seed (the same batches again)"


def test_the_twins_train_the_same_way():
    pairs = list(zip(stages("diffusion"), stages("autoregressive")))
    assert len(pairs) == len(stages("diffusion")) == len(stages("autoregressive"))
    for d, a in pairs:
        dcfg, acfg = asdict(TrainConfig.from_file(d)), asdict(TrainConfig.from_file(a))
        for key in ("out_dir", "init_from", "objective"):
            dcfg.pop(key), acfg.pop(key)
        assert dcfg == acfg, f"{d.name} and {a.name} differ beyond the objective"
