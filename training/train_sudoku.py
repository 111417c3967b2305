"""Train the bundled Sudoku model (and its autoregressive baseline) from scratch, reproducibly.

    python training/train_sudoku.py                      # diffusion model -> mlx_diffgemma/models/sudoku
    python training/train_sudoku.py --baseline           # the autoregressive baseline -> runs/
    python training/train_sudoku.py --config training/sudoku.yaml --steps 2000     # a shorter first schedule
                                                         # (the learning-rate schedule follows it)
    python training/train_sudoku.py --config training/sudoku.yaml --budget-s 300   # as many steps of it as
                                                         # fit in 300 s on this machine
    python training/train_sudoku.py --config training/sudoku_stage2_diffusion.yaml   # another config (no export
                                                         # unless --export: only the default replaces the package)

The bundled model is five schedules: `training/sudoku.yaml` from scratch (5000 steps), then
`sudoku_schedule2.yaml` and `sudoku_schedule3.yaml` (2000 steps each from the previous weights),
`sudoku_schedule4.yaml` (the network stacked to twice its depth, each new layer starting as the
identity, then 2000 steps) and `sudoku_schedule5.yaml` (2000 more). The default runs the last; a
config whose `init_from` checkpoint does not exist yet first trains the config beside it that ends
there (and that one's, first), so one command trains all five. `--steps`, `--budget-s` and
`--out-dir` apply to the named config only. The bundled weights were trained with the torch
trainer on one CPU core (41 + 15 + 15 + 29 + 30 minutes):
`OMP_NUM_THREADS=1 python training/train_sudoku.py --backend torch --device cpu --compile`. The
MLX trainer takes the same steps (same init, batches, schedule and optimizer) with MLX's
arithmetic; the rounding differences grow over thousands of steps, so it trains another model of
the same recipe, not these weights.

Everything is seeded: the model init (`seed`), the grid pool and every batch (a function of
(seed, step)), the corruption and the self-conditioning draws, so the same command with the same
`steps` on the same library versions and device writes the same weights (GPU kernels and BLAS
builds may differ in the last bits). `--budget-s` times a short probe run first and sets `steps`
from it; the chosen number is printed and saved in the checkpoint's trainer state, so
`--steps N` repeats the run anywhere (`--steps-file F` also writes the number to F, for a
baseline that must train as long). On a Linux CPU the MLX trainer wants OpenBLAS preloaded for
speed (LD_PRELOAD=/usr/lib/x86_64-linux-gnu/openblas-pthread/libblas.so.3); the torch trainer does
not need it, and the bundled weights were trained without it: preloaded, torch's arithmetic
changes and the run takes another path (benchmarks/results/sudoku_reproduce-bundled.md).

`--backend torch --device gpu` takes the same steps with torch on an NVIDIA GPU
(`mlx_diffgemma/torch_backend/train.py`: same init, batches, optimizer and checkpoints; MLX
still builds and saves the model on the CPU); `--device cpu` on the CPU.
"""

import argparse
import dataclasses
import functools
import shutil
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))

import mlx.core as mx  # noqa: E402

from mlx_diffgemma.files import write_text_atomic  # noqa: E402
from mlx_diffgemma.train import TrainConfig, TrainError, export, train  # noqa: E402

BUNDLED = HERE.parent / "mlx_diffgemma" / "models" / "sudoku"
BASELINE = HERE.parent / "runs" / "sudoku-autoregressive-final"
PROBE_STEPS = 40  # the first 10 compile; the other 30 price a step
FIXED_S = 25  # building the grid pool, the model and the compiled step again after the probe


def steps_for_budget(cfg: TrainConfig, budget_s: float, started: float, safety: float = 0.95, train=train) -> int:
    """Time PROBE_STEPS steps of `cfg` in a scratch directory, then return how many steps fit in
    `safety` x what is left of `budget_s` (a multiple of 50, at least 100)."""
    times: list[float] = []
    with tempfile.TemporaryDirectory() as tmp:
        probe = dataclasses.replace(cfg, out_dir=tmp, steps=10**6, save_every=10**6, log_every=10**6)
        try:
            train(probe, progress=False, stop_at=PROBE_STEPS, on_step=lambda s, loss, dt: times.append(dt))
        except Exception as e:  # a backend that cannot compile the step still trains without mx.compile
            if not cfg.compile:
                raise
            print(f"probe failed with mx.compile ({type(e).__name__}: {e}); trying without", flush=True)
            cfg.compile = probe.compile = False
            times.clear()
            shutil.rmtree(Path(tmp) / "checkpoints", ignore_errors=True)
            train(probe, progress=False, stop_at=PROBE_STEPS, on_step=lambda s, loss, dt: times.append(dt))
    per_step = sum(times[10:]) / len(times[10:])
    left = budget_s - (time.perf_counter() - started) - FIXED_S
    steps = max(100, int(safety * left / per_step) // 50 * 50)
    print(f"probe: {per_step * 1e3:.1f} ms/step; {left:.0f} s left -> {steps} steps", flush=True)
    return steps


def checkpoint_end(cfg: TrainConfig) -> Path:
    """Where a config's run leaves its last checkpoint."""
    return (Path(cfg.out_dir) / "checkpoints" / f"step-{cfg.steps:07d}").resolve()


def prerequisites(config: Path) -> list[Path]:
    """The configs to run, in order, before `config` can start: for an `init_from` checkpoint that
    does not exist yet, the config beside it whose run ends there (and that one's, first)."""
    chain, ends = [], None
    while True:
        cfg = TrainConfig.from_file(config)
        # from_file has joined an existing relative init_from to the config's folder
        if not cfg.init_from or Path(cfg.init_from).exists():
            return chain
        if ends is None:  # which config's run ends where: read once, and only when a start is missing
            ends = {}
            for c in sorted(config.parent.glob("*.yaml")):
                ends.setdefault(checkpoint_end(TrainConfig.from_file(c)), c)
        start = Path(cfg.init_from) if Path(cfg.init_from).is_absolute() else config.parent / cfg.init_from
        maker = ends.get(start.resolve())
        if maker is None:  # a model name, a hub id, or a path no config makes: the loader takes it or says why
            return chain
        if maker in chain:
            raise TrainError(f"{config}: its init_from chain leads back to {maker.name}")
        chain.insert(0, maker)
        config = maker


def main() -> int:
    started = time.perf_counter()
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--baseline", action="store_true", help="train the autoregressive baseline instead")
    p.add_argument("--config", default=None, help="another training config (default: the bundled recipe's last "
                   "schedule, training/sudoku_schedule5.yaml, or its twin with --baseline)")
    p.add_argument("--steps", type=int, default=None, help="training steps (default: the config's)")
    p.add_argument("--budget-s", type=float, default=None, help="pick the steps that fit in this many seconds")
    p.add_argument("--steps-file", default=None, help="with --budget-s, also write the chosen steps to this file")
    p.add_argument("--stop-at", type=int, default=None, help="stop early at this step (the schedule stays)")
    p.add_argument("--deadline", type=float, default=None,
                   help="stop (with a checkpoint) at the first step ending after this Unix time")
    p.add_argument("--safety", type=float, default=0.95,
                   help="with --budget-s, the share of the measured time left that the steps may fill")
    p.add_argument("--device", choices=["gpu", "cpu"], default=None, help="MLX device (default: MLX's); "
                   "with --backend torch, gpu is CUDA (the default) and cpu the CPU")
    p.add_argument("--compile", action=argparse.BooleanOptionalAction, default=None,
                   help="compile the step (mx.compile; torch.compile of the layers with --backend torch); "
                   "default: the config's `compile`")
    p.add_argument("--backend", choices=["mlx", "torch"], default="mlx",
                   help="take the steps with MLX (default) or with torch (NVIDIA GPUs)")
    p.add_argument("--bf16", action="store_true", help="with --backend torch: the passes under bf16 autocast")
    p.add_argument("--out-dir", default=None, help="checkpoints here instead of the config's out_dir")
    p.add_argument("--export", default=None, help="copy the final model here (default, with the default config "
                   "only: the package for the diffusion model, runs/sudoku-autoregressive-final for the baseline)")
    p.add_argument("--no-export", action="store_true", help="do not copy the result anywhere")
    args = p.parse_args()
    run = train
    if args.backend == "torch":
        from mlx_diffgemma.torch_backend.train import train as torch_train

        device = "cpu" if args.device == "cpu" else "cuda"
        run = functools.partial(torch_train, device=device, bf16=args.bf16)
    elif args.device:
        mx.set_default_device(mx.gpu if args.device == "gpu" else mx.cpu)
    default = "sudoku_schedule5_autoregressive.yaml" if args.baseline else "sudoku_schedule5.yaml"
    config = Path(args.config) if args.config else HERE / default
    try:
        chain = prerequisites(config)
        if chain and args.budget_s is not None:  # the budget would go to schedules it does not time
            raise TrainError(f"--budget-s times {config.name} only, and it starts from {chain[-1].name}'s run, not "
                             f"trained yet: train {' and '.join(c.name for c in chain)} first, or pass --config "
                             "training/sudoku.yaml for a budgeted run from scratch")
        for before in chain:  # a later schedule whose starting checkpoint is not trained yet
            pre = TrainConfig.from_file(before)
            if args.compile is not None:
                pre.compile = args.compile
            pre.validate(str(before))
            print(f"{config.name} starts where {before.name} ends: training that first", flush=True)
            tic = time.perf_counter()
            last = run(pre, progress=sys.stderr.isatty())
            print(f"trained in {time.perf_counter() - tic:.0f} s -> {last}", flush=True)
        cfg = TrainConfig.from_file(config)
        if args.out_dir:
            cfg.out_dir = args.out_dir
        if args.compile is not None:
            cfg.compile = args.compile
        if args.budget_s is not None:
            cfg.steps = steps_for_budget(cfg, args.budget_s, started, args.safety, run)
            if args.steps_file:
                write_text_atomic(args.steps_file, str(cfg.steps))
        if args.steps is not None:
            cfg.steps = args.steps
        cfg.validate(str(config))
        where = f"torch {device}" if args.backend == "torch" else mx.default_device()
        print(f"{cfg.objective}: {cfg.steps} steps of batch {cfg.batch_size} on {where}", flush=True)
        tic = time.perf_counter()
        last = run(cfg, progress=sys.stderr.isatty(), stop_at=args.stop_at, deadline=args.deadline)
        print(f"trained in {time.perf_counter() - tic:.0f} s -> {last}", flush=True)
        # only the bundled recipe replaces the bundled model by default; other configs export on request
        dest = Path(args.export) if args.export else None
        if dest is None and args.config is None:
            dest = BASELINE if args.baseline else BUNDLED
        if dest is not None and not args.no_export:
            export(last, dest, cfg.generation)
            print(f"exported {last} -> {dest}")
    except TrainError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
