"""A multi-turn chat that keeps its KV cache between turns: `python -m mlx_diffgemma.chat`.

Each turn encodes only what is new: the tail of the previous answer that is not in the cache yet
(its last committed canvas, up to the EOS) and the new user turn. Earlier answers stay in the
cache as generated, thought channel included (the template would drop earlier thoughts from a
re-rendered history; keeping them costs no re-encoding). Toggling thinking changes the system
turn, so the next turn re-encodes the conversation from its messages.
"""

from __future__ import annotations

import sys
from typing import Iterator

import click

from .cli import OneLineCommand, UserError, check_mode, load_model, model_options, sampler_overrides

_SENTINEL = "\u2063ANSWER\u2063"  # stands for an answer's content when locating the turn's end


class ChatSession:
    """One conversation on a loaded model. `send(text)` yields `stream_generate` events."""

    def __init__(self, model, tokenizer, system: str | None = None, thinking: bool = False,
                 max_tokens: int | None = None, seed: int = 0, mode=None, **overrides):
        self.model, self.tokenizer = model, tokenizer
        self.system, self.max_tokens, self.seed, self.mode = system, max_tokens, seed, mode
        self.overrides = {k: v for k, v in overrides.items() if v is not None}
        self._thinking = thinking
        self.turn_stats: list = []
        self.reset()

    def reset(self) -> None:
        """Forget the conversation (and free its cache)."""
        self.messages = [{"role": "system", "content": self.system}] if self.system else []
        self.cache = None
        self.encoded: list[int] = []  # the ids in the cache, in order
        self.pending: list[int] = []  # the last answer's tail, not encoded yet
        self.closed = False  # the last answer ended with an EOS
        self.turn_stats = []

    @property
    def thinking(self) -> bool:
        return self._thinking

    @thinking.setter
    def thinking(self, on: bool) -> None:
        if bool(on) != self._thinking:
            self._thinking = bool(on)
            self.cache = None  # the system turn changes: re-encode from the messages next turn

    def send(self, text: str) -> Iterator:
        from .generate import stream_generate
        from .tokenizer import chat_ids

        message = {"role": "user", "content": text}
        ids = self._continuation(message) if self.cache is not None else None
        if ids is None:  # first turn, after /thinking, or a template we cannot continue
            cache = self.model.make_cache()
            ids = chat_ids(self.tokenizer, self.messages + [message], thinking=self._thinking)
            encoded = []
        else:
            cache, encoded = self.cache, self.encoded
        gen = self.model.generation_config.override(**self.overrides)
        C = self.model.config.canvas_length
        done = None
        try:
            for event in stream_generate(
                self.model, self.tokenizer, ids, max_tokens=self.max_tokens, seed=self.seed + len(self.turn_stats),
                cache=cache, **({"mode": self.mode} if self.mode else {}), **self.overrides,
            ):
                if event.kind == "done":
                    done = event
                yield event
        except BaseException:
            if cache.offset != len(encoded):
                self.cache = None  # part of this turn is in the cache: rebuild from the messages next turn
            raise
        tokens = done.token_ids
        # every committed canvas but the last was encoded by the block loop
        self.encoded = encoded + ids + tokens[:-C]
        last = tokens[-C:]
        eos = set(gen.eos_token_id)
        cut = next((i for i, t in enumerate(last) if t in eos), None)
        self.pending = last if cut is None else last[: cut + 1]
        self.closed = cut is not None
        self.cache = cache
        self.messages += [message, {"role": "assistant", "content": done.text}]
        self.turn_stats.append(done.stats)

    def _continuation(self, message) -> list[int] | None:
        """Ids that follow the cache: the last answer's tail, the end of its turn, the new turn."""
        from .tokenizer import _hf, encode_text, render_chat

        history = self.messages[:-1] + [{"role": "assistant", "content": _SENTINEL}]
        before = render_chat(self.tokenizer, history, thinking=self._thinking, add_generation_prompt=False)
        after = render_chat(self.tokenizer, history + [message], thinking=self._thinking)
        if not after.startswith(before) or _SENTINEL not in before:
            return None
        turn_end = before[before.rindex(_SENTINEL) + len(_SENTINEL):]  # e.g. "<turn|>\n"
        if self.closed:
            eos_text = _hf(self.tokenizer).decode(self.pending[-1:], skip_special_tokens=False)
            if turn_end.startswith(eos_text):
                turn_end = turn_end[len(eos_text):]  # the answer's own EOS closed the turn
        return self.pending + encode_text(self.tokenizer, turn_end + after[len(before):])

    def stats_line(self) -> str:
        if not self.turn_stats:
            return "no turns yet"
        s = self.turn_stats[-1]
        cached = self.cache.offset if self.cache is not None else 0
        nbytes = self.cache.nbytes if self.cache is not None else 0
        return (
            f"turns {len(self.turn_stats)} · cache {cached} tokens ({nbytes / 2**20:.1f} MiB) · last turn: "
            f"{s.prompt_tokens} new tokens ({s.prefill_summary}), {s.committed_tokens} tokens "
            f"in {s.canvases} canvas(es), {s.denoise_steps} steps, {s.committed_tokens_per_s:.1f} tok/s, "
            f"{s.tokens_per_forward:.2f} tokens/forward, peak {s.peak_memory_bytes / 2**20:.1f} MiB"
        )


HELP = "commands: /reset (new conversation), /thinking [on|off], /stats, /help, /quit"


@click.command(cls=OneLineCommand, context_settings={"help_option_names": ["-h", "--help"]})
@model_options
def chat_cli(model, backend, device, system, max_tokens, thinking, seed, steps, entropy_bound, t_max, t_min, mode):
    """Chat with DiffusionGemma in the terminal.

    Type a message and press Enter. Earlier turns stay in the KV cache, so each turn encodes only
    the new text. The model's thoughts (thinking on) are shown dimmed before the answer.

    \b
    Commands: /reset  start a new conversation
              /thinking [on|off]  toggle thinking (re-encodes the conversation once)
              /stats  cache size and speed of the last turn
              /quit   leave (or Ctrl-D)
    """
    overrides = sampler_overrides(steps, entropy_bound, t_max, t_min)
    mode = check_mode(mode)
    m, tokenizer = load_model(model, backend, device)
    session = ChatSession(m, tokenizer, system=system, thinking=thinking, max_tokens=max_tokens, seed=seed,
                          mode=mode, **overrides)
    tty = sys.stdin.isatty()
    styled = sys.stdout.isatty()
    click.echo(f"chat with {model} · thinking {'on' if thinking else 'off'} · {HELP}")
    while True:
        if tty:
            click.echo("> ", nl=False)
        raw = sys.stdin.buffer.readline()
        if not raw:
            break
        try:
            line = raw.decode("utf-8").strip()
        except UnicodeDecodeError:
            raise UserError("stdin is not valid UTF-8; re-encode the input") from None
        if not line:
            continue
        if line.startswith("/"):
            command, _, arg = line.partition(" ")
            if command in ("/quit", "/exit"):
                break
            if command == "/reset":
                session.reset()
                click.echo("[new conversation]")
            elif command == "/thinking":
                arg = arg.strip().lower()
                if arg not in ("", "on", "off"):
                    click.echo("usage: /thinking [on|off]")
                    continue
                session.thinking = (not session.thinking) if not arg else arg == "on"
                click.echo(f"[thinking {'on' if session.thinking else 'off'}]")
            elif command == "/stats":
                click.echo(f"[{session.stats_line()}]")
            elif command == "/help":
                click.echo(HELP)
            else:
                click.echo(f"unknown command {command}; {HELP}")
            continue
        reasoning = False
        try:
            for event in session.send(line):
                if event.kind != "text":
                    continue
                if event.reasoning:
                    if not reasoning:
                        click.echo(click.style("thinking: ", dim=styled), nl=False)
                        reasoning = True
                    click.echo(click.style(event.reasoning, dim=styled), nl=False)
                if event.text:
                    if reasoning:
                        click.echo()
                        reasoning = False
                    click.echo(event.text, nl=False)
        except ValueError as e:  # e.g. the conversation outgrew the context
            click.echo(f"error: {e}; /reset starts over", err=True)
            continue
        click.echo()


def main(argv=None):
    return chat_cli(argv)


if __name__ == "__main__":
    sys.exit(main())
