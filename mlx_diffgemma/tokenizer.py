"""Tokenizer, chat template and the text the user sees.

Built on mlx-lm's `TokenizerWrapper` (a Hugging Face tokenizer). The chat template is the
checkpoint's own whenever it ships one (rendered with jinja2 by transformers); otherwise
`GEMMA4_CHAT_TEMPLATE`, written to reproduce the prompt ids the spec lists (section 6).

Model output is split, token by token, into three streams (`TextStream`):
- content: the answer, with every special token removed (turn, channel, tool, pad, EOS markers);
- reasoning: the text inside `<|channel>thought\\n ... <channel|>` (the channel name dropped);
- tool calls: each `<|tool_call> ... <tool_call|>` span verbatim, markers and `<|"|>` quotes
  kept, for tool parsers; never part of the content.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field
from pathlib import Path

# Gemma 4's prompt format. Thinking off pre-fills an empty thought channel so the model answers
# directly; thinking on puts <|think|> in the system turn and leaves the channel to the model.
# Earlier model turns lose their thought channel (as llama.cpp's copy of the template does).
# The tool declaration format is ours (the real one ships with the checkpoint's template).
GEMMA4_CHAT_TEMPLATE = """\
{{- bos_token -}}
{%- set thinking = enable_thinking | default(false) -%}
{%- set ns = namespace(system=none) -%}
{%- if messages and messages[0]['role'] in ['system', 'developer'] -%}
  {%- set ns.system = messages[0]['content'] -%}
  {%- set messages = messages[1:] -%}
{%- endif -%}
{%- macro text_of(content) -%}
  {%- if content is string -%}{{ content }}
  {%- elif content is not none -%}
    {%- for part in content if part['type'] == 'text' -%}{{ part['text'] }}{%- endfor -%}
  {%- endif -%}
{%- endmacro -%}
{%- if thinking or ns.system is not none or tools -%}
  {{- '<|turn>system\\n' -}}
  {%- if thinking -%}{{- '<|think|>\\n' -}}{%- endif -%}
  {%- if ns.system is not none -%}{{- text_of(ns.system) -}}{%- endif -%}
  {%- for tool in tools or [] -%}{{- '<|tool>' + (tool | tojson) + '<tool|>' -}}{%- endfor -%}
  {{- '<turn|>\\n' -}}
{%- endif -%}
{%- for m in messages -%}
  {%- set role = 'model' if m['role'] == 'assistant' else m['role'] -%}
  {%- set content = text_of(m['content']) -%}
  {%- if role == 'model' and '<channel|>' in content -%}
    {%- set content = content.split('<channel|>')[-1] -%}
  {%- endif -%}
  {%- if role == 'tool' -%}
    {{- '<|tool_response>' + content + '<tool_response|>' -}}
  {%- else -%}
    {{- '<|turn>' + role + '\\n' + content -}}
    {%- for call in m['tool_calls'] or [] -%}{{- '<|tool_call>' + (call | tojson) + '<tool_call|>' -}}{%- endfor -%}
    {{- '<turn|>\\n' -}}
  {%- endif -%}
{%- endfor -%}
{%- if add_generation_prompt -%}
  {{- '<|turn>model\\n' -}}
  {%- if not thinking -%}{{- '<|channel>thought\\n<channel|>' -}}{%- endif -%}
{%- endif -%}
"""

CHANNEL_START, CHANNEL_END = "<|channel>", "<channel|>"
TOOL_CALL_START, TOOL_CALL_END = "<|tool_call>", "<tool_call|>"
TOOL_QUOTE = '<|"|>'


def load_tokenizer(model_dir: Path, eos_token_ids=None):
    from mlx_lm.tokenizer_utils import load

    return load(Path(model_dir), eos_token_ids=eos_token_ids)


def _hf(tokenizer):
    """The Hugging Face tokenizer inside mlx-lm's wrapper (or the tokenizer itself)."""
    from mlx_lm.tokenizer_utils import TokenizerWrapper

    return tokenizer._tokenizer if isinstance(tokenizer, TokenizerWrapper) else tokenizer


def chat_template(tokenizer) -> str:
    """The checkpoint's own template when it ships one, else ours."""
    return getattr(_hf(tokenizer), "chat_template", None) or GEMMA4_CHAT_TEMPLATE


def render_chat(tokenizer, messages, thinking: bool = False, tools=None, add_generation_prompt: bool = True) -> str:
    """The prompt text of `messages` (a string is one user turn), <bos> included."""
    if isinstance(messages, str):
        messages = [{"role": "user", "content": messages}]
    return _hf(tokenizer).apply_chat_template(
        list(messages), tools=tools, chat_template=chat_template(tokenizer), tokenize=False,
        add_generation_prompt=add_generation_prompt, enable_thinking=thinking,
    )


def chat_ids(tokenizer, messages, thinking: bool = False, tools=None) -> list[int]:
    """Token ids of `messages` with the generation prompt appended. The template emits <bos>
    itself, so no special tokens are added on top."""
    return encode_text(tokenizer, render_chat(tokenizer, messages, thinking=thinking, tools=tools))


def encode_text(tokenizer, text: str) -> list[int]:
    return list(_hf(tokenizer).encode(text, add_special_tokens=False))


# -- what the user sees ------------------------------------------------------------------------


@dataclass(frozen=True)
class Markers:
    """The ids that steer `TextStream`: hidden (every special token), and the channel and
    tool-call delimiters (None when the vocabulary lacks them)."""

    hidden: frozenset
    channel_start: int | None
    channel_end: int | None
    tool_call_start: int | None
    tool_call_end: int | None
    tool_quote: int | None


def markers(tokenizer) -> Markers:
    cached = getattr(tokenizer, "_dg_markers", None)
    if cached is not None:
        return cached
    hf = _hf(tokenizer)
    hidden = set(getattr(hf, "all_special_ids", []) or [])
    for i, tok in (getattr(hf, "added_tokens_decoder", None) or {}).items():
        if getattr(tok, "special", False):
            hidden.add(int(i))
    vocab = hf.get_vocab()
    m = Markers(
        frozenset(hidden), vocab.get(CHANNEL_START), vocab.get(CHANNEL_END),
        vocab.get(TOOL_CALL_START), vocab.get(TOOL_CALL_END), vocab.get(TOOL_QUOTE),
    )
    try:
        tokenizer._dg_markers = m
    except AttributeError:
        pass
    return m


class _Detokenizer:
    """Incremental decode of one run of tokens: text appears as soon as it is whole (a byte-level
    character split over tokens is held back), decoding only a short window each time."""

    def __init__(self, decode):
        self.decode = decode
        self.tokens: list[int] = []
        self.prefix = self.read = 0  # tokens[prefix:read] were decoded already (context for spacing)

    def add(self, token: int) -> str:
        self.tokens.append(token)
        done = self.decode(self.tokens[self.prefix : self.read])
        text = self.decode(self.tokens[self.prefix :])
        if len(text) > len(done) and not text.endswith("\ufffd"):
            self.prefix, self.read = self.read, len(self.tokens)
            return text[len(done) :]
        return ""

    def flush(self) -> str:
        done = self.decode(self.tokens[self.prefix : self.read])
        text = self.decode(self.tokens[self.prefix :])
        self.prefix = self.read = len(self.tokens)
        return text[len(done) :]


@dataclass
class Delta:
    """New text from one or more tokens."""

    content: str = ""
    reasoning: str = ""
    tool_call: str = ""  # raw, markers included

    def __bool__(self):
        return bool(self.content or self.reasoning or self.tool_call)

    def __iadd__(self, other: "Delta"):
        self.content += other.content
        self.reasoning += other.reasoning
        self.tool_call += other.tool_call
        return self


@dataclass
class Parsed:
    content: str = ""
    reasoning: str = ""
    tool_calls: list[str] = field(default_factory=list)  # each `<|tool_call>...<tool_call|>`, verbatim


class TextStream:
    """Split generated tokens into content, reasoning and tool calls, one token at a time.

    `add(token)` returns the `Delta` that token completes; `finish()` flushes what is held back.
    `parsed` is everything so far. Cheap to `copy()` (the preview parses a provisional tail).
    """

    CONTENT, CHANNEL_NAME, REASONING, TOOL_CALL = "content", "channel_name", "reasoning", "tool_call"

    def __init__(self, tokenizer):
        hf = _hf(tokenizer)
        self.markers = markers(tokenizer)
        self._decode_plain = lambda ids: hf.decode(ids, skip_special_tokens=True)
        self._decode_raw = lambda ids: hf.decode(ids, skip_special_tokens=False)
        self.state = self.CONTENT
        self.parsed = Parsed()
        self._name = ""
        self._tool = ""
        self._detok = _Detokenizer(self._decode_plain)

    def copy(self) -> "TextStream":
        new = copy.copy(self)
        new.parsed = Parsed(self.parsed.content, self.parsed.reasoning, list(self.parsed.tool_calls))
        new._detok = copy.copy(self._detok)
        new._detok.tokens = list(self._detok.tokens)
        return new

    def add(self, token: int) -> Delta:
        token = int(token)
        m = self.markers
        delta = Delta()
        if self.state == self.TOOL_CALL:
            if token == m.tool_call_end:
                delta += self._emit(self._detok.flush())
                delta += self._emit_tool(TOOL_CALL_END)
                self.parsed.tool_calls.append(self._tool)
                self._switch(self.CONTENT)
                return delta
            if token in m.hidden and token != m.tool_quote:
                return delta  # turn / pad markers never enter a tool call
            return self._emit(self._detok.add(token))
        if token == m.channel_start and self.state == self.CONTENT:
            delta += self._emit(self._detok.flush())
            self._switch(self.CHANNEL_NAME)
            self._name = ""
            return delta
        if token == m.channel_end and self.state in (self.CHANNEL_NAME, self.REASONING):
            delta += self._emit(self._detok.flush())
            self._switch(self.CONTENT)
            return delta
        if token == m.tool_call_start:
            delta += self._emit(self._detok.flush())
            self._switch(self.TOOL_CALL, raw=True)
            self._tool = ""
            delta += self._emit_tool(TOOL_CALL_START)
            return delta
        if token in m.hidden:
            return delta
        return self._emit(self._detok.add(token))

    def finish(self) -> Delta:
        """Flush held-back text; an unclosed tool call is kept as it stands."""
        delta = self._emit(self._detok.flush())
        if self.state == self.TOOL_CALL and self._tool:
            self.parsed.tool_calls.append(self._tool)
            self._tool = ""
        self._switch(self.CONTENT)
        return delta

    def _switch(self, state, raw=False):
        self.state = state
        self._detok = _Detokenizer(self._decode_raw if raw else self._decode_plain)

    def _emit_tool(self, text: str) -> Delta:
        self._tool += text
        return Delta(tool_call=text)

    def _emit(self, text: str) -> Delta:
        if not text:
            return Delta()
        if self.state == self.CONTENT:
            self.parsed.content += text
            return Delta(content=text)
        if self.state == self.TOOL_CALL:
            return self._emit_tool(text)
        if self.state == self.CHANNEL_NAME:
            # the channel's name runs to the first newline; the rest is its text
            self._name += text
            if "\n" not in self._name:
                return Delta()
            text = self._name.split("\n", 1)[1]
            self.state = self.REASONING
            if not text:
                return Delta()
        self.parsed.reasoning += text
        return Delta(reasoning=text)


def parse_output(tokenizer, ids) -> Parsed:
    """Content, reasoning and tool calls of generated `ids` (what `TextStream` yields, at once)."""
    stream = TextStream(tokenizer)
    for t in ids:
        stream.add(t)
    stream.finish()
    return stream.parsed


def visible_text(tokenizer, ids) -> str:
    """The content of `ids`: no reasoning, no tool calls, no special tokens."""
    return parse_output(tokenizer, ids).content
