"""The markdown table and the PNG plots of one result file.

`python -m benchmarks.report RESULT.json` recomputes the GEMM shares and rewrites the .md and .png
beside it.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from mlx_diffgemma.files import write_text_atomic

REFERENCE = "transformers"  # speed ratios are against the reference implementation


def _gib(b):
    return f"{b / 2**30:.2f}" if b else "—"


def _num(x, fmt="{:.1f}"):
    return fmt.format(x) if isinstance(x, (int, float)) else "—"


def _ms(r):
    if not r.get("ms_per_step"):
        return "—"
    lo, hi = r.get("ms_per_step_min"), r.get("ms_per_step_max")
    if lo is not None and hi is not None and hi > lo:
        return f"{r['ms_per_step']:.1f} [{lo:.1f}–{hi:.1f}]"
    return f"{r['ms_per_step']:.1f}"


def machine_lines(result: dict) -> list[str]:
    m = result["machine"]
    v = {**m.get("versions", {}), **{f"{k} (bench venv)": x for k, x in m.get("bench_venv_versions", {}).items()
                                     if m.get("versions", {}).get(k) != x}}
    lines = [
        f"- Machine: {m['cpu']}, {m['cpu_count']} cores, {_gib(m.get('memory_bytes'))} GiB RAM"
        + (f", GPU: {'; '.join(m['gpus'])}" if m.get("gpus") else ", no GPU") + f" ({m['platform']})",
        "- Libraries: " + ", ".join(f"{k} {x}" for k, x in sorted(v.items())),
        f"- Commit: {m.get('commit')}; started {result['started']}; command `{result['command']}`",
        f"- Settings: {result['settings']['dtype']}; {result['settings']['sampler']}; "
        f"{result['settings']['prompt']}; MLX BLAS preload: {result['settings'].get('openblas_for_mlx') or 'none'}",
    ]
    for c in result.get("continued", []):
        lines.append(f"- Continued {c['started']} (same machine, same result file): `{c['command']}`")
    if m.get("shared"):
        la = m.get("load_average_start"), m.get("load_average_end")
        lines.append(f"- **Shared machine**: {m['shared_note']} (load average at start {la[0]}, at end {la[1]}).")
    return lines


def markdown(result: dict) -> str:
    rows = result["rows"]
    out = ["# DiffusionGemma engines side by side", ""] + machine_lines(result) + [""]
    ref = {(r["size"], r["scenario"]): r for r in rows if r["system"] == REFERENCE and r["status"] == "ok"}
    for size in dict.fromkeys(r["size"] for r in rows):
        out += [f"## {size}", "",
                "| system | scenario | ms/step median [min–max] | × transformers | committed tok/s | prefill tok/s "
                "| peak mem GiB | row passes/token | GEMM share | note |",
                "|---|---|---|---|---|---|---|---|---|---|"]
        gemm = [r for r in rows if r["size"] == size and r["scenario"] == "gemm"]
        for r in rows:
            if r["size"] != size or r["scenario"] == "gemm":
                continue
            if r["status"] != "ok":
                out.append(f"| {r['system']} | {r['scenario']} | | | | | | | | {r['status']}: {r.get('reason', '')} |")
                continue
            base = ref.get((size, r["scenario"]))
            if r["system"] == "ar-twin" and r["scenario"] == "generate":
                base = ref.get((size, "generate-16"))
            ratio = "—"
            if base and r["system"] != REFERENCE:
                if r.get("committed_tokens_per_s") and base.get("committed_tokens_per_s"):
                    ratio = f"{r['committed_tokens_per_s'] / base['committed_tokens_per_s']:.2f}× tok/s"
                elif r["scenario"].startswith("step@") and r["system"] != "ar-twin":
                    ratio = f"{base['ms_per_step'] / r['ms_per_step']:.2f}× speed"
            note = []
            if r.get("steps_per_canvas"):
                note.append(f"steps/canvas {r['steps_per_canvas']}")
            if r.get("committed_tokens"):
                note.append(f"{r['committed_tokens']} tokens")
            out.append(
                f"| {r['system']} | {r['scenario']} | {_ms(r)} | {ratio} | {_num(r.get('committed_tokens_per_s'))} "
                f"| {_num(r.get('prefill_tokens_per_s'))} | {_gib(r.get('peak_memory_bytes'))} "
                f"| {_num(r.get('row_passes_per_token'), '{:.2f}')} "
                f"| {_num(100 * r['gemm_fraction'] if r.get('gemm_fraction') else None, '{:.1f}%')} | {'; '.join(note)} |"
            )
        for g in gemm:
            if g["status"] == "ok":
                out.append(f"\nDense GEMM ({g['system']}, {g['gemm_n']}³, {g.get('device', '')}): "
                           f"{g['gemm_flops_per_s'] / 1e9:.1f} GFLOP/s (median after 2 warm-ups; the shares use "
                           "the best rate of the run per backend)")
            else:
                out.append(f"\nDense GEMM ({g['system']}): {g['status']}: {g.get('reason', '')}")
        out.append("")
    out += [
        "Reading the table: `step@P` = one full-width denoise step (256-row canvas) after a P-token prefix; "
        "for ar-twin, one greedy decode step. `generate-16` = whole canvases, exactly 16 steps each, EOS off; "
        "`generate-adaptive` = the checkpoint's stop rule (random weights rarely stop early). "
        "Peak memory is the worker process's max RSS. GEMM share = model FLOPs of the step / step time / "
        "the backend's best dense matmul rate in the same run. Random weights say nothing about quality.",
        "",
    ]
    return "\n".join(out)


def _save(plt, fig, title: str, stem: Path, suffix: str) -> str:
    """Title, lay out, write STEM-SUFFIX.png and close the figure; returns the path."""
    fig.suptitle(title, fontsize=8)
    fig.tight_layout()
    path = stem.with_name(f"{stem.name}-{suffix}.png")
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return str(path)


def plots(result: dict, stem: Path) -> list[str]:
    """tokens/s by system and step time against prefix length; [] when matplotlib is missing."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return []
    rows = [r for r in result["rows"] if r["status"] == "ok" and r["scenario"] != "gemm"]
    sizes = list(dict.fromkeys(r["size"] for r in rows))
    written = []
    if not sizes:
        return written
    title = result["machine"]["cpu"] + (f" + {result['machine']['gpus'][0]}" if result["machine"].get("gpus") else "")
    if result["machine"].get("shared"):
        title += " (shared)"

    gen = [r for r in rows if r["scenario"].startswith("generate") and r.get("committed_tokens_per_s")]
    if gen:
        gen_sizes = [s for s in sizes if any(r["size"] == s for r in gen)]
        fig, axes = plt.subplots(1, len(gen_sizes), figsize=(5 * len(gen_sizes), 4.2), squeeze=False)
        for ax, size in zip(axes[0], gen_sizes):
            sel = [r for r in gen if r["size"] == size]
            labels = [f"{r['system']}\n{r['scenario'].replace('generate', 'gen')}" for r in sel]
            bars = ax.bar(range(len(sel)), [r["committed_tokens_per_s"] for r in sel],
                   color=["C0" if r["system"].startswith("ours") else "C7" if r["system"] == "ar-twin" else "C1"
                          for r in sel])
            ax.bar_label(bars, fmt="%.3g", fontsize=7)
            ax.set_xticks(range(len(sel)), labels, rotation=60, ha="right", fontsize=7)
            ax.set_yscale("log")
            ax.set_title(f"{size}: committed tokens/s", fontsize=9)
        written.append(_save(plt, fig, title, stem, "tokens"))

    steps = [r for r in rows if r["scenario"].startswith("step@")]
    if steps:
        step_sizes = [s for s in sizes if any(r["size"] == s for r in steps)]
        fig, axes = plt.subplots(1, len(step_sizes), figsize=(5 * len(step_sizes), 4.2), squeeze=False)
        for ax, size in zip(axes[0], step_sizes):
            for system in dict.fromkeys(r["system"] for r in steps if r["size"] == size):
                sel = sorted((r for r in steps if r["size"] == size and r["system"] == system),
                             key=lambda r: r["prefix_tokens"])
                x = [r["prefix_tokens"] for r in sel]
                ax.errorbar(x, [r["ms_per_step"] for r in sel], marker="o", label=system,
                            yerr=[[r["ms_per_step"] - r.get("ms_per_step_min", r["ms_per_step"]) for r in sel],
                                  [r.get("ms_per_step_max", r["ms_per_step"]) - r["ms_per_step"] for r in sel]])
            ax.set_xscale("log", base=2)
            ax.set_yscale("log")
            ax.set_xlabel("prefix tokens")
            ax.set_ylabel("ms per step (ar-twin: per token)")
            ax.set_title(f"{size}: step time vs prefix", fontsize=9)
            ax.legend(fontsize=7)
        written.append(_save(plt, fig, title, stem, "steps"))
    return written


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) != 1 or not Path(argv[0]).is_file():
        print("usage: python -m benchmarks.report RESULT.json", file=sys.stderr)
        return 2
    from .run import add_fractions

    path = Path(argv[0])
    result = json.loads(path.read_text())
    add_fractions(result["rows"])  # with this version's FLOP model and peak rule
    write_text_atomic(path, json.dumps(result, indent=1))
    stem = path.with_suffix("")
    write_text_atomic(stem.with_suffix(".md"), markdown(result))
    print("\n".join([str(stem.with_suffix(".md"))] + plots(result, stem)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
