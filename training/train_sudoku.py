"""Train the bundled Sudoku model (and its autoregressive baseline) from scratch, reproducibly.

    python training/train_sudoku.py                 # diffusion model -> mlx_diffgemma/models/sudoku
    python training/train_sudoku.py --baseline      # the autoregressive baseline -> runs/
    python training/train_sudoku.py --stop-at 400   # stop early (the schedule stays that of `steps`)

Everything is seeded: the model init (`seed`), the grid pool and every batch (a function of
(seed, step)), the corruption and the self-conditioning draws, so the same command on the same
library versions writes the same weights (bit-for-bit on the same machine; BLAS builds may differ
in the last bits). For speed on Linux, run it with OpenBLAS preloaded:
LD_PRELOAD=/usr/lib/x86_64-linux-gnu/openblas-pthread/libblas.so.3.
"""

import argparse
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))

from mlx_diffgemma.train import TrainConfig, TrainError, export, train  # noqa: E402

BUNDLED = HERE.parent / "mlx_diffgemma" / "models" / "sudoku"

# The bundled model is the step-STOP_AT checkpoint of training/sudoku.yaml: the end of its
# configured schedule (see docs/sudoku.md).
STOP_AT = 1000


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--baseline", action="store_true", help="train the autoregressive baseline instead")
    p.add_argument("--stop-at", type=int, default=STOP_AT, help="stop at this step (default: %(default)s)")
    p.add_argument("--no-export", action="store_true", help="do not copy the result into the package")
    args = p.parse_args()
    config = HERE / ("sudoku_autoregressive.yaml" if args.baseline else "sudoku.yaml")
    try:
        cfg = TrainConfig.from_file(config)
        last = train(cfg, stop_at=args.stop_at)
    except TrainError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if not args.baseline and not args.no_export:
        export(last, BUNDLED)
        print(f"exported {last} -> {BUNDLED}")
    else:
        print(last)
    return 0


if __name__ == "__main__":
    sys.exit(main())
