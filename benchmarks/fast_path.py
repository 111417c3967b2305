"""The fast path's quality gate and speed: a trained model, reference sampler against each fast mode,
on the same held-out items and seeds, one item at a time (batch 1, as a chat is).

    python -m benchmarks.fast_path --model sudoku --puzzles 300                  # Sudoku: the answer fills the canvas
    python -m benchmarks.fast_path --task sort --model sort --puzzles 300        # sorting: answers of 1-48 tokens

Writes benchmarks/results/fast_path-<stamp>.json and .md: the exact-answer rate (with its standard
error and the paired disagreement against the reference), a finer per-token accuracy with its paired
difference, denoising steps, trunk row-passes per committed token and wall time per committed token
(with --separate-prompt also without the prompt's encode, the same work in every mode), each mode
against the reference measured in this run, and the same by group (givens for Sudoku, list length
for sorting). As `generate` does, the prompt and each commit are encoded by the next canvas' first
pass unless --separate-prompt gives them passes of their own.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

import mlx.core as mx
import numpy as np

from benchmarks.machine import record as machine_record
from benchmarks.sudoku_eval import HELD_OUT_SEED, mean_stderr, per_puzzle
from mlx_diffgemma import load, sorting, sudoku
from mlx_diffgemma.fast import MODES, check_model, get_mode
from mlx_diffgemma.files import write_text_atomic
from mlx_diffgemma.generate import denoise_block
from mlx_diffgemma.loading import LoadError
from mlx_diffgemma.sampler import NoiseSource, finalize_block

RESULTS = Path(__file__).parent / "results"


class SudokuItems:
    """Held-out puzzles; exact = solved, accuracy = blank cells right; every puzzle commits 81 cells."""

    exact_label, accuracy_label, group_label = "solved", "cells right", "givens"

    def __init__(self, n: int, bounds: tuple[int, int], seed: int):
        self.puzzles, self.solutions = sudoku.puzzle_set(seed, n, bounds)

    def __len__(self):
        return len(self.puzzles)

    def prompt(self, i: int) -> list[int]:
        return sudoku.prompt_ids(self.puzzles[i])

    def score(self, i: int, tokens: np.ndarray) -> tuple[bool, float]:
        solved, right = per_puzzle(self.puzzles[i : i + 1], self.solutions[i : i + 1], sudoku.canvas_digits(tokens)[None])
        return bool(solved[0]), float(right[0])

    def committed(self, i: int) -> int:
        return sudoku.CELLS

    def group(self, i: int) -> str:
        return str(int(np.count_nonzero(self.puzzles[i])))


class SortItems:
    """Held-out digit lists; exact = sorted exactly, accuracy = answer rows right (digits and EOS);
    a list of L digits commits L + 1 tokens (the answer and its EOS; the rest of the canvas is pad)."""

    exact_label, accuracy_label, group_label = "sorted", "tokens right", "length"

    def __init__(self, n: int, bounds: tuple[int, int], seed: int):
        self.lists = sorting.list_set(seed, n, bounds)

    def __len__(self):
        return len(self.lists)

    def prompt(self, i: int) -> list[int]:
        return sorting.prompt_batch([self.lists[i]])[0].tolist()

    def score(self, i: int, tokens: np.ndarray) -> tuple[bool, float]:
        return sorting.is_sorted_answer(self.lists[i], tokens), sorting.tokens_right(self.lists[i], tokens)

    def committed(self, i: int) -> int:
        return len(self.lists[i]) + 1

    def group(self, i: int) -> str:
        lo = (len(self.lists[i]) - 1) // 12 * 12 + 1  # 1-12, 13-24, 25-36, 37-48
        return f"{lo}-{lo + 11}"


TASKS = {"sudoku": (SudokuItems, (30, 45)), "sort": (SortItems, (1, sorting.WIDTH))}


def run_one(model, prompt: list[int], seed: int, mode: str, gen, fuse: bool = True):
    """(committed tokens [canvas_length], denoising steps, trunk row-passes, seconds spent encoding
    the prompt on its own) for one prompt under `mode`: canvases committed one after another, as the
    block loop does, until one holds an EOS or the model's canvas_length tokens are committed (one
    canvas, unless a mode's canvases are shorter). With `fuse`, as `generate` does, every commit and a
    prompt no longer than a canvas are encoded by the next canvas' first pass (the prompt's own
    time is then None)."""
    fast = get_mode(mode)
    C = model.config.canvas_length
    cache = model.make_cache()
    pending, prompt_s = np.array([prompt]), None
    if not fuse or len(prompt) > C:
        tic = time.perf_counter()
        model.encode(mx.array(pending), cache)
        mx.eval(cache.state())
        prompt_s, pending = time.perf_counter() - tic, None
    noise = NoiseSource(seed, model.config.vocab_size)
    out, steps, rows, block = [], 0, 0, 0
    while len(out) < C:
        if block and not fuse:
            model.encode(mx.array(pending), cache)
            pending = None
        argmax, s, r = denoise_block(model, cache, gen, noise, block, fast, C - len(out), prefix=pending)
        argmax = np.asarray(argmax)
        pending, finished = finalize_block(argmax, gen)
        out.extend(argmax[0].tolist())  # as denoised: the scores read up to the first EOS
        steps, rows, block = steps + s, rows + r, block + 1
        if finished.all():
            break
    tokens = np.full(C, gen.pad_token_id, dtype=np.int64)  # pad after an early EOS, as a commit does
    tokens[: min(C, len(out))] = out[:C]
    return tokens, steps, rows, prompt_s


def run(model, items, seed: int, modes: list[str], fuse: bool = True, budget_s: float | None = None) -> list[dict]:
    """Every mode on every item; with `budget_s`, no new item starts once that many seconds have
    been spent measuring (a time-boxed GPU lease), and the table covers the items done."""
    gen = model.generation_config.override(max_new_tokens=model.config.canvas_length)
    n = len(items)
    # warm-up, so the first mode does not pay for compilation and allocation
    for mode in modes:
        run_one(model, items.prompt(0), seed, mode, gen, fuse)
    started = time.perf_counter()
    # item by item, every mode in turn: a change in the machine's load during the run then falls
    # on all modes alike instead of on whichever mode was running
    runs = {mode: dict(exact=[], accuracy=[], steps=[], rows=[], wall=[], prompt=[]) for mode in modes}
    for i in range(n):
        if budget_s is not None and i >= 2 and time.perf_counter() - started > budget_s:
            print(f"--time-budget {budget_s:g} s spent: stopping after {i} of {n} items", file=sys.stderr)
            n = i
            break
        prompt = items.prompt(i)
        for mode in modes:
            tic = time.perf_counter()
            tokens, s, r, prompt_s = run_one(model, prompt, seed + i, mode, gen, fuse)
            m = runs[mode]
            m["wall"].append(time.perf_counter() - tic)
            m["prompt"].append(np.nan if prompt_s is None else prompt_s)
            exact, accuracy = items.score(i, tokens)
            m["exact"].append(exact)
            m["accuracy"].append(accuracy)
            m["steps"].append(s)
            m["rows"].append(r)
    runs = {mode: {k: np.array(v, dtype=np.float64) for k, v in m.items()} for mode, m in runs.items()}

    committed = np.array([items.committed(i) for i in range(n)], dtype=np.float64)
    groups = np.array([items.group(i) for i in range(n)])
    ref = runs["reference"]
    table = []
    for mode, m in runs.items():
        rate = m["exact"].mean()
        accuracy = mean_stderr(m["accuracy"])
        # paired: the same items and seeds, so the per-item difference has its own noise
        accuracy_diff = mean_stderr(m["accuracy"] - ref["accuracy"])
        exact_diff = mean_stderr(m["exact"] - ref["exact"])
        by_group = {}
        for g in sorted(set(groups), key=lambda g: int(g.split("-")[0])):
            sel = groups == g
            by_group[g] = {
                "items": int(sel.sum()),
                "exact": round(float(m["exact"][sel].mean()), 3),
                "row_pass_reduction": round(float(ref["rows"][sel].sum() / m["rows"][sel].sum()), 2),
                "wall_time_reduction": round(float(ref["wall"][sel].sum() / m["wall"][sel].sum()), 2),
            }
        table.append({
            "mode": mode,
            "puzzles": n,
            "exact": round(float(rate), 4),
            "exact_count": int(m["exact"].sum()),
            "exact_stderr": round(math.sqrt(rate * (1 - rate) / n), 4),
            "disagree_with_reference": int((m["exact"] != ref["exact"]).sum()),
            "accuracy": accuracy["mean"],
            "accuracy_stderr": accuracy["stderr"],
            "accuracy_minus_reference": accuracy_diff["mean"],
            "accuracy_minus_reference_stderr": accuracy_diff["stderr"],
            "exact_minus_reference": exact_diff["mean"],
            "exact_minus_reference_stderr": exact_diff["stderr"],
            "mean_steps": round(float(m["steps"].mean()), 2),
            # where the steps go: items the reference answered exactly, and the ones it missed
            "mean_steps_where_reference_exact": _mean_or_none(m["steps"][ref["exact"] == 1]),
            "mean_steps_where_reference_missed": _mean_or_none(m["steps"][ref["exact"] == 0]),
            "max_steps_where_reference_exact": _max_or_none(m["steps"][ref["exact"] == 1]),
            "row_passes_per_token": round(float(m["rows"].sum() / committed.sum()), 3),
            "ms_per_token": round(1e3 * float(m["wall"].sum() / committed.sum()), 4),
            "row_pass_reduction": round(float(ref["rows"].sum() / m["rows"].sum()), 2),
            "wall_time_reduction": round(float(ref["wall"].sum() / m["wall"].sum()), 2),
            # over the items only (a bootstrap of the paired times); a slower or faster machine from
            # one run to the next moves the ratio too, and is not in it
            "wall_time_reduction_95ci": _ratio_interval(ref["wall"], m["wall"]),
            # items whose prompt rode along with the first canvas step (fused, and no longer than a canvas)
            "prompt_fused_items": int(np.isnan(m["prompt"]).sum()),
            # with a prompt encoded on its own (--separate-prompt): the same without it, which every mode does alike
            "prompt_ms_per_item": None if fuse else round(1e3 * float(m["prompt"].mean()), 3),
            "denoise_wall_time_reduction": None if fuse else round(
                float((ref["wall"] - ref["prompt"]).sum() / (m["wall"] - m["prompt"]).sum()), 2),
            "by_group": by_group,
        })
    return table


def _mean_or_none(a: np.ndarray) -> float | None:
    return round(float(a.mean()), 2) if len(a) else None


def _max_or_none(a: np.ndarray) -> int | None:
    return int(a.max()) if len(a) else None


def _ratio_interval(base: np.ndarray, mode: np.ndarray, draws: int = 2000) -> list[float]:
    """95% bootstrap interval of sum(base) / sum(mode) over items resampled with replacement,
    the two arrays paired item by item."""
    rng = np.random.default_rng(0)
    idx = rng.integers(0, len(base), size=(draws, len(base)))
    ratios = base[idx].sum(axis=1) / mode[idx].sum(axis=1)
    return [round(float(q), 2) for q in np.percentile(ratios, [2.5, 97.5])]


def _prompt_schedule(fused: int, items: int) -> str:
    if fused == items:
        return "with the first canvas step"
    if fused == 0:
        return "in a pass of its own (longer than a canvas, or --separate-prompt)"
    return f"with the first canvas step for {fused} of {items} items, in a pass of its own for the longer rest"


def write(table, args, items) -> Path:
    RESULTS.mkdir(parents=True, exist_ok=True)
    stamp = time.strftime("%Y%m%d-%H%M%S")
    out = RESULTS / f"fast_path-{stamp}.json"
    command = "python -m benchmarks.fast_path " + " ".join(args.argv)
    doc = {"benchmark": "fast_path", "command": command, "task": args.task, "model": args.model,
           "bounds": list(args.bounds), "seed": args.seed, "puzzle_seed": args.puzzle_seed,
           "prompt_encoded": _prompt_schedule(table[0]["prompt_fused_items"], table[0]["puzzles"]),
           "items_asked": len(items), "mlx_device": str(mx.default_device()),
           "machine": machine_record(shared=args.shared), "rows": table}
    write_text_atomic(out, json.dumps(doc, indent=2))
    ex, acc, grp = items.exact_label, items.accuracy_label, items.group_label
    lines = [
        f"# Fast path on the {args.task} model ({table[0]['puzzles']} items, {grp} {args.bounds[0]}-{args.bounds[1]})",
        "",
        f"Command: `{command}`",
        "",
        f"The prompt is encoded {doc['prompt_encoded']}.",
        "",
        f"| mode | {ex} | ± | {ex} minus ref. (paired) | {acc} | ± | minus ref. (paired) | steps | "
        "row-passes/token | ms/token | row-passes ÷ | wall time ÷ | 95% interval over items |"
        + (" wall time ÷ after the prompt |" if args.separate_prompt else ""),
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|" + ("---|" if args.separate_prompt else ""),
    ]
    for r in table:
        lines.append(
            f"| {r['mode']} | {r['exact']:.3f} | {r['exact_stderr']:.3f} | "
            f"{r['exact_minus_reference']:+.3f} ± {r['exact_minus_reference_stderr']:.3f} | {r['accuracy']:.3f} | "
            f"{r['accuracy_stderr']:.3f} | {r['accuracy_minus_reference']:+.3f} ± {r['accuracy_minus_reference_stderr']:.3f} | "
            f"{r['mean_steps']} | {r['row_passes_per_token']} | {r['ms_per_token']} | {r['row_pass_reduction']}x | "
            f"{r['wall_time_reduction']}x | {r['wall_time_reduction_95ci'][0]}-{r['wall_time_reduction_95ci'][1]}x |"
            + (f" {r['denoise_wall_time_reduction']}x |" if args.separate_prompt else "")
        )
    ref_exact = table[0]["exact_count"]
    lines += ["", f"Steps per item, split by the reference's answer: the {ref_exact} items it answered exactly "
              f"and the {table[0]['puzzles'] - ref_exact} it missed", "",
              "| mode | mean steps, reference exact | most steps, reference exact | mean steps, reference missed |",
              "|---|---|---|---|"]
    for r in table:
        lines.append(f"| {r['mode']} | {r['mean_steps_where_reference_exact']} | {r['max_steps_where_reference_exact']} | "
                     f"{r['mean_steps_where_reference_missed']} |")
    groups = list(table[0]["by_group"])
    lines += ["", f"By {grp}: {ex} rate, row-passes ÷ and wall time ÷ against the reference", "",
              "| mode | " + " | ".join(f"{g} ({table[0]['by_group'][g]['items']})" for g in groups) + " |",
              "|---|" + "---|" * len(groups)]
    for r in table:
        cells = [f"{b['exact']:.2f}, {b['row_pass_reduction']}x, {b['wall_time_reduction']}x"
                 for b in (r["by_group"][g] for g in groups)]
        lines.append(f"| {r['mode']} | " + " | ".join(cells) + " |")
    load = (doc["machine"].get("load_average_start") or [float("nan")])[0]
    note = doc["machine"].get("shared_note") or f"no other benchmark on the CPU (1-minute load average {load:.2f} at the start)"
    where = f"{doc['machine'].get('cpu', '?')}, {doc['machine'].get('cpu_count')} cores"
    if mx.default_device() == mx.gpu:  # MLX on a GPU (Metal, or CUDA on NVIDIA): name the card
        where = f"MLX on {', '.join(doc['machine'].get('gpus') or ['a GPU'])} (host {where}); {note.split(';')[0]}"
        note = "the host CPU's load does not price GPU time"
    if table[0]["puzzles"] < len(items):
        note += f"; stopped by --time-budget after {table[0]['puzzles']} of {len(items)} items"
    lines += ["", f"Machine: {where}; {note}"]
    write_text_atomic(out.with_suffix(".md"), "\n".join(lines) + "\n")
    return out


def _runs_on(mode: str, model) -> bool:
    try:
        check_model(get_mode(mode), model)
    except ValueError:
        return False
    return True


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--task", choices=sorted(TASKS), default="sudoku")
    p.add_argument("--model", default=None, help="model directory or bundled name (default: the task's name)")
    p.add_argument("--puzzles", type=int, default=300, help="held-out items (puzzles or lists)")
    p.add_argument("--givens", "--lengths", dest="bounds", type=int, nargs=2, default=None,
                   help="givens range (Sudoku, default 30 45) or list lengths (sort, default 1 48)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--puzzle-seed", type=int, default=HELD_OUT_SEED)
    p.add_argument("--shared", action="store_true", help="other jobs share the CPU: the result says its timings are noisy")
    p.add_argument("--separate-prompt", action="store_true",
                   help="encode the prompt and each commit in a pass of their own (as before the fused "
                   "first pass), and report the wall time without the prompt too")
    p.add_argument("--time-budget", type=float, default=None,
                   help="start no new item after this many seconds of measuring; report the items done")
    p.add_argument("--modes", default=None,
                   help="comma-separated modes; a mode may carry knobs, e.g. compact+refresh_every=8 "
                   "(default: every named mode the model can run)")
    args = p.parse_args(argv)
    args.argv = list(sys.argv[1:] if argv is None else argv)
    cls, default_bounds = TASKS[args.task]
    args.model = args.model or args.task
    args.bounds = tuple(args.bounds or default_bounds)
    modes = [m for m in (args.modes or ",".join(MODES)).split(",") if m]
    try:
        for m in modes:
            get_mode(m)
        if args.puzzles < 2:
            raise ValueError(f"--puzzles {args.puzzles}: need at least 2 items for a standard error")
        items = cls(args.puzzles, args.bounds, args.puzzle_seed)
        model, _ = load(args.model)
        if args.modes is None:  # by default, skip the named modes this model cannot run (short canvases)
            modes = [m for m in modes if _runs_on(m, model)]
        else:
            for m in modes:
                check_model(get_mode(m), model)
    except (ValueError, LoadError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if "reference" not in modes:
        modes.insert(0, "reference")
    table = run(model, items, args.seed, modes, fuse=not args.separate_prompt, budget_s=args.time_budget)
    out = write(table, args, items)
    print(out.with_suffix(".md").read_text())
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
