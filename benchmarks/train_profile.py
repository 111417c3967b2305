"""Where a torch training step's GPU time goes: a few steps of a training config under
torch.profiler, the kernels ranked by their total GPU time.

    python -m benchmarks.train_profile --config training/sudoku_gpu.yaml --device cuda --out DIR

Writes DIR/train_profile-<config>.txt: a header (card, versions, ms per step plain, with
torch.compile and with torch.compile under bf16 autocast, side by side in the run; with `--mlx`
the MLX trainer's too) and the ranked table of the torch step.
"""

import argparse
import dataclasses
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))


def main() -> int:
    import torch
    from torch.profiler import ProfilerActivity, profile

    from mlx_diffgemma.torch_backend.train import train
    from mlx_diffgemma.train import TrainConfig

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--config", required=True)
    p.add_argument("--device", default="cuda")
    p.add_argument("--warmup", type=int, default=12, help="untimed steps first (compilation)")
    p.add_argument("--timed", type=int, default=10, help="timed steps, plain and compiled")
    p.add_argument("--steps", type=int, default=3, help="profiled steps")
    p.add_argument("--compile", action="store_true", help="profile the compiled step (default: plain)")
    p.add_argument("--no-bf16", action="store_true", help="skip timing the compiled step under bf16 autocast")
    p.add_argument("--mlx", action="store_true", help="also time the MLX trainer (plain and mx.compile) on "
                   "MLX's default device, first")
    p.add_argument("--rows", type=int, default=30)
    p.add_argument("--out", default="benchmarks/results")
    args = p.parse_args()

    cfg = TrainConfig.from_file(args.config)
    cfg.compile = args.compile
    cfg.steps = max(cfg.steps, args.warmup + args.timed, args.steps)  # a short config still runs them all

    def per_step(compile: bool, bf16: bool = False, trainer=None) -> float:
        """ms per step after the first `--warmup` (which also compile), a fresh model each time"""
        times: list[float] = []
        kw = {"device": args.device, "bf16": bf16} if trainer is None else {}
        with tempfile.TemporaryDirectory() as tmp:
            run = dataclasses.replace(cfg, out_dir=tmp, save_every=10**6, log_every=10**6, compile=compile)
            (trainer or train)(run, progress=False, stop_at=args.warmup + args.timed,
                               on_step=lambda s, l, dt: times.append(dt), **kw)
        return 1e3 * sum(times[args.warmup:]) / len(times[args.warmup:])

    timed = {}
    if args.mlx:  # the MLX trainer on MLX's default device, the same steps
        from mlx_diffgemma.train import train as mlx_train

        timed["mlx"] = per_step(False, trainer=mlx_train)
        timed["mlx mx.compile"] = per_step(True, trainer=mlx_train)
    timed |= {"plain": per_step(False), "torch.compile": per_step(True)}
    if not args.no_bf16:
        timed["torch.compile + bf16"] = per_step(True, bf16=True)
    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if args.device.startswith("cuda") else [])
    with tempfile.TemporaryDirectory() as tmp, profile(activities=acts) as prof:
        run = dataclasses.replace(cfg, out_dir=tmp, save_every=10**6, log_every=10**6)
        tic = time.perf_counter()
        train(run, device=args.device, progress=False, stop_at=args.steps)  # with the config's compile
        profiled = (time.perf_counter() - tic) / args.steps
    key = "cuda_time_total" if args.device.startswith("cuda") else "cpu_time_total"
    table = prof.key_averages().table(sort_by=key, row_limit=args.rows, max_name_column_width=70)
    card = torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"
    import mlx.core as mx

    head = (f"# {Path(args.config).name}: batch {cfg.batch_size}, {cfg.objective}, on {card}, torch {torch.__version__} "
            f"({torch.get_num_threads()} CPU threads), MLX {mx.__version__}\n"
            f"# {time.strftime('%Y-%m-%d %H:%M:%S')}; ms/step over steps {args.warmup + 1}-{args.warmup + args.timed}: "
            + ", ".join(f"{k} {v:.1f}" for k, v in timed.items())
            + f"; {profiled * 1e3:.1f} under the profiler (incl. build){', compiled' if args.compile else ''}\n")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    dest = out / f"train_profile-{Path(args.config).stem}.txt"
    dest.write_text(head + table + "\n")
    print(head + table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
