"""Command lines. Errors a user can fix print one line and exit 2, never a traceback."""

from __future__ import annotations

import json
import sys

import click


class UserError(click.ClickException):
    exit_code = 2

    def show(self, file=None):
        click.echo(f"error: {self.format_message()}", err=True)


def _load(model_path):
    from .loading import LoadError, load

    try:
        return load(model_path)
    except LoadError as e:
        raise UserError(str(e)) from None


@click.command(context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--model", "-m", required=True, help="Model directory (converted or raw Hugging Face) or hub id.")
@click.option("--prompt", "-p", default=None, help="The user message. Read from stdin when omitted or '-'.")
@click.option("--system", default=None, help="An optional system message.")
@click.option("--max-tokens", type=click.IntRange(min=1), default=None,
              help="Tokens to generate, rounded up to whole 256-token canvases (checkpoint default: 256).")
@click.option("--thinking/--no-thinking", default=False, show_default=True, help="Let the model think first.")
@click.option("--seed", type=click.IntRange(min=0), default=0, show_default=True, help="Seed of the noise source.")
@click.option("--steps", type=click.IntRange(min=1), default=None, help="Max denoising steps per canvas (default 48).")
@click.option("--entropy-bound", type=click.FloatRange(min=0, min_open=True), default=None,
              help="Entropy budget of the acceptance rule (default 0.1).")
@click.option("--t-max", type=click.FloatRange(min=0), default=None, help="Temperature at the first step (0.8).")
@click.option("--t-min", type=click.FloatRange(min=0), default=None, help="Temperature floor at the last step (0.4).")
@click.option("--json", "as_json", is_flag=True, help="Print the answer and statistics as JSON.")
def generate_cli(model, prompt, system, max_tokens, thinking, seed, steps, entropy_bound, t_max, t_min, as_json):
    """Generate an answer with DiffusionGemma: the prompt is encoded once, then 256-token canvases
    are denoised in parallel and committed one after another."""
    if prompt is None or prompt == "-":
        try:
            prompt = sys.stdin.buffer.read().decode("utf-8")
        except UnicodeDecodeError:
            raise UserError("stdin is not valid UTF-8; pass --prompt or re-encode the input") from None
    if not prompt.strip():
        raise UserError("the prompt is empty; pass --prompt TEXT or pipe text on stdin")
    messages = ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": prompt}]

    from .generate import stream_generate

    m, tokenizer = _load(model)
    overrides = dict(max_denoising_steps=steps, entropy_bound=entropy_bound, t_max=t_max, t_min=t_min)
    try:
        events = stream_generate(m, tokenizer, messages, max_tokens=max_tokens, seed=seed, thinking=thinking,
                                 **overrides)
        for event in events:
            if event.kind == "commit" and not as_json:
                click.echo(event.text, nl=False)
            elif event.kind == "done":
                done = event
    except ValueError as e:
        raise UserError(str(e)) from None
    if as_json:
        click.echo(json.dumps({"text": done.text, "stats": done.stats.as_dict()}))
    else:
        click.echo()
        s = done.stats
        click.echo(
            f"[{s.committed_tokens} tokens in {s.canvases} canvas(es), {s.denoise_steps} steps, "
            f"{s.committed_tokens_per_s:.1f} tok/s, prefill {s.prefill_tokens_per_s:.1f} tok/s]",
            err=True,
        )
