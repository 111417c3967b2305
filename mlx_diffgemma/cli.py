"""Command lines. Errors a user can fix print one line and exit 2, never a traceback."""

from __future__ import annotations

import inspect
import json
import shutil
import sys
import threading
import time
import unicodedata

import click


class UserError(click.ClickException):
    exit_code = 2

    def show(self, file=None):
        click.echo(f"error: {self.format_message()}", err=True)


class OneLineCommand(click.Command):
    """A click command whose usage errors (a bad or missing flag) are one line too."""

    def parse_args(self, ctx, args):
        try:
            return super().parse_args(ctx, args)
        except click.UsageError as e:
            raise UserError(f"{e.format_message()} (see --help)") from None


class _Spinner:
    """A one-line progress display on stderr while a step of unknown length runs (loading):
    what it is doing and the seconds so far; nothing when stderr is not a terminal."""

    def __init__(self, label: str):
        self.label, self.stop = label, threading.Event()
        self.live = sys.stderr.isatty()
        self.thread = threading.Thread(target=self._run, daemon=True)

    def _run(self):
        frames, tic, i = "|/-\\", time.perf_counter(), 0
        while not self.stop.wait(0.1):
            sys.stderr.write(f"\r{frames[i % 4]} {self.label} {time.perf_counter() - tic:5.1f} s")
            sys.stderr.flush()
            i += 1

    def __enter__(self):
        self.tic = time.perf_counter()
        if self.live:
            self.thread.start()
        return self

    def __exit__(self, *exc):
        self.stop.set()
        if self.live:
            self.thread.join()
            done = "done" if exc[0] is None else "failed"
            sys.stderr.write(f"\r{self.label} {done} in {time.perf_counter() - self.tic:.1f} s\x1b[K\n")


def load_model(model_path: str, backend: str = "mlx", device: str | None = None):
    """`mlx_diffgemma.load` with the CLI's backend/device flags, errors as one line."""
    from .loading import LoadError, load

    kwargs = {}
    accepts = inspect.signature(load).parameters
    if backend != "mlx" or device is not None:
        if "backend" not in accepts:
            raise UserError(f"--backend {backend}/--device: this install's load() has no backends; use --backend mlx")
        kwargs = {"backend": backend, "device": device}
    try:
        with _Spinner(f"loading {model_path}"):
            return load(model_path, **kwargs)
    except LoadError as e:
        raise UserError(str(e)) from None
    except (ImportError, ValueError) as e:  # a backend that is not installed, an unknown device
        raise UserError(f"--backend {backend}: {e}") from None


def model_options(f):
    """The options the generate and chat commands share."""
    options = [
        click.option("--model", "-m", required=True, help="Model directory (converted or raw Hugging Face) or hub id."),
        click.option("--backend", type=click.Choice(["mlx", "torch"]), default="mlx", show_default=True,
                     help="Array library to run on (torch: CUDA or CPU machines)."),
        click.option("--device", default=None, help="Device of the torch backend: cuda, cuda:0, cpu (MLX picks its own)."),
        click.option("--system", default=None, help="A system message."),
        click.option("--max-tokens", type=click.IntRange(min=1), default=None,
                     help="Tokens to generate, rounded up to whole canvases (checkpoint default: one canvas, 256). "
                          "Raise it with --thinking."),
        click.option("--thinking/--no-thinking", default=False, show_default=True,
                     help="Let the model think first (its thoughts are shown apart from the answer)."),
        click.option("--seed", type=click.IntRange(min=0), default=0, show_default=True, help="Seed of the noise source."),
        click.option("--steps", type=click.IntRange(min=1), default=None,
                     help="Most denoising steps per canvas (checkpoint default 48)."),
        click.option("--entropy-bound", type=click.FloatRange(min=0, min_open=True), default=None,
                     help="Entropy budget (nats) of the positions accepted per step (default 0.1; higher is faster, rougher)."),
        click.option("--t-max", type=click.FloatRange(min=0, min_open=True), default=None,
                     help="Sampling temperature at the first step (default 0.8)."),
        click.option("--t-min", type=click.FloatRange(min=0), default=None,
                     help="Temperature floor approached at the last step (default 0.4)."),
        click.option("--mode", default=None,
                     help="Denoising mode: reference (default, exact), or a fast mode (see mlx_diffgemma.fast.MODES)."),
    ]
    for option in reversed(options):
        f = option(f)
    return f


def sampler_overrides(steps, entropy_bound, t_max, t_min) -> dict:
    if t_max is not None and t_min is not None and t_min > t_max:
        raise UserError(f"--t-min {t_min} is above --t-max {t_max}; the temperature anneals from t-max down to t-min")
    return dict(max_denoising_steps=steps, entropy_bound=entropy_bound, t_max=t_max, t_min=t_min)


def check_mode(mode):
    if mode is None:
        return None
    try:
        from .fast import get_mode
    except ImportError:
        raise UserError("--mode: this install has no fast modes; leave --mode out") from None
    try:
        get_mode(mode)
    except (KeyError, ValueError) as e:
        raise UserError(f"--mode {mode}: {e}") from None
    return mode


def read_stdin() -> str:
    try:
        return sys.stdin.buffer.read().decode("utf-8")
    except UnicodeDecodeError:
        raise UserError("stdin is not valid UTF-8; pass --prompt or re-encode the input") from None


class CanvasView:
    """`--show-canvas`: the committed text, then the canvas being denoised, redrawn in place each
    step (accepted positions bright, the rest dim). Needs an ANSI terminal."""

    def __init__(self, tokenizer, out=None):
        from .tokenizer import _hf, markers

        self.out = out or sys.stdout
        self.hf = _hf(tokenizer)
        self.hidden = markers(tokenizer).hidden
        self.committed = ""
        self.lines = 0  # lines drawn last frame, erased before the next

    def piece(self, token: int) -> str:
        if token in self.hidden:
            return "·"
        return _printable(self.hf.decode([int(token)]).replace("\n", "⏎")) or "·"

    def step(self, event, steps_max: int):
        width = shutil.get_terminal_size((100, 30)).columns
        canvas = "".join(self.piece(t) for t in event.canvas)
        header = (f"[canvas {event.block + 1} · step {event.step + 1}/{steps_max} · accepted {event.accepted} · "
                  f"mean entropy {event.mean_entropy:.3f}]")
        self.draw([*self._wrap(self.committed, width)[-6:], header, *self._wrap(canvas, width)])

    def commit(self, text: str):
        self.committed += _printable(text, keep_newlines=True)
        width = shutil.get_terminal_size((100, 30)).columns
        self.draw(self._wrap(self.committed, width)[-6:])

    def draw(self, lines):
        if self.lines:
            self.out.write(f"\x1b[{self.lines}F\x1b[J")  # back to the frame's first line, clear below
        self.out.write("\n".join(lines) + "\n")
        self.out.flush()
        self.lines = len(lines)

    @staticmethod
    def _wrap(text: str, width: int) -> list[str]:
        """Lines of at most `width` terminal cells (wide characters take two), so that the
        frame's height is known and the next frame can erase it exactly."""
        out = []
        for line in text.split("\n"):
            row, cells = "", 0
            for ch in line:
                w = 2 if unicodedata.east_asian_width(ch) in "WF" else 1
                if cells + w > width:
                    out.append(row)
                    row, cells = "", 0
                row, cells = row + ch, cells + w
            out.append(row)
        return out


def _printable(text: str, keep_newlines: bool = False) -> str:
    """Control characters (tabs, carriage returns, escapes) and zero-width marks would move the
    cursor or hide from the width count: shown as a middle dot."""
    out = []
    for ch in text:
        if ch == "\n" and keep_newlines:
            out.append(ch)
        elif unicodedata.category(ch) in ("Cc", "Cf", "Mn", "Me", "Zl", "Zp"):
            out.append("·")
        else:
            out.append(ch)
    return "".join(out)


@click.command(cls=OneLineCommand, context_settings={"help_option_names": ["-h", "--help"]})
@model_options
@click.option("--prompt", "-p", default=None, help="The user message. Read from stdin when omitted or '-'.")
@click.option("--show-canvas", is_flag=True, help="Show the canvas resolving step by step (a terminal view).")
@click.option("--json", "as_json", is_flag=True,
              help="Print one JSON object: answer, reasoning, tool_calls, finish_reason and stats.")
def generate_cli(model, backend, device, system, max_tokens, thinking, seed, steps, entropy_bound, t_max, t_min, mode,
                 prompt, show_canvas, as_json):
    """Generate an answer with DiffusionGemma.

    The prompt is encoded once; then 256-token canvases of random tokens are denoised in parallel,
    step by step, and committed one after another. The answer goes to stdout, token by token as
    each canvas is committed; the model's thoughts (--thinking) and a statistics line go to stderr.

    \b
    Examples:
      python -m mlx_diffgemma.generate -m ./diffusiongemma-4bit -p "Why is the sky blue?"
      echo "Write a haiku" | python -m mlx_diffgemma.generate -m ./diffusiongemma-4bit --json
      python -m mlx_diffgemma.generate -m ./diffusiongemma-4bit -p "Plan a trip" --thinking --max-tokens 1024
    """
    if as_json and show_canvas:
        raise UserError("--json and --show-canvas conflict: pick one output")
    overrides = sampler_overrides(steps, entropy_bound, t_max, t_min)
    mode = check_mode(mode)
    if prompt is None or prompt == "-":
        prompt = read_stdin()
    if not prompt.strip():
        raise UserError("the prompt is empty; pass --prompt TEXT or pipe text on stdin")
    messages = ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": prompt}]

    from .generate import stream_generate

    m, tokenizer = load_model(model, backend, device)
    steps_max = steps or m.generation_config.max_denoising_steps
    view = CanvasView(tokenizer) if show_canvas else None
    dim = sys.stderr.isatty()
    done = None
    in_reasoning = False
    try:
        events = stream_generate(m, tokenizer, messages, max_tokens=max_tokens, seed=seed, thinking=thinking,
                                 **({"mode": mode} if mode else {}), **overrides)
        for event in events:
            if event.kind == "step" and view:
                view.step(event, steps_max)
            elif event.kind == "commit" and view:
                view.commit(event.text)
            elif event.kind == "text" and not as_json and not view:
                if event.reasoning:
                    if not in_reasoning:
                        click.echo(click.style("thinking: ", dim=dim), nl=False, err=True)
                        in_reasoning = True
                    click.echo(click.style(event.reasoning, dim=dim), nl=False, err=True)
                if event.text:
                    if in_reasoning:
                        click.echo(err=True)
                        in_reasoning = False
                    click.echo(event.text, nl=False)
            elif event.kind == "done":
                done = event
    except ValueError as e:
        raise UserError(str(e)) from None
    s = done.stats
    if as_json:
        click.echo(json.dumps({
            "answer": done.text, "reasoning": done.reasoning, "tool_calls": done.tool_calls,
            "finish_reason": done.finish_reason,
            "stats": {**s.as_dict(), "steps_per_canvas_mean": round(s.denoise_steps / max(s.canvases, 1), 3)},
        }))
        return
    if not view:
        click.echo()
    click.echo(
        f"[{s.committed_tokens} tokens in {s.canvases} canvas(es), {s.denoise_steps} steps, "
        f"{s.committed_tokens_per_s:.1f} tok/s, {s.tokens_per_forward:.2f} tokens/forward, "
        f"{s.prefill_summary}, peak {s.peak_memory_bytes / 2**20:.1f} MiB, {done.finish_reason}]",
        err=True,
    )
