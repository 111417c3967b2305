"""Tokenizer, chat template and the text the user sees.

Built on mlx-lm's `TokenizerWrapper` (a Hugging Face tokenizer plus a streaming detokenizer); the
chat template is the checkpoint's own (jinja2, via the tokenizer).
"""

from __future__ import annotations

from pathlib import Path


def load_tokenizer(model_dir: Path, eos_token_ids=None):
    from mlx_lm.tokenizer_utils import load

    return load(Path(model_dir), eos_token_ids=eos_token_ids)


def chat_ids(tokenizer, messages, thinking: bool = False) -> list[int]:
    """Token ids of `messages` (a string is one user turn) with the generation prompt appended.
    The template emits <bos> itself, so no special tokens are added on top."""
    if isinstance(messages, str):
        messages = [{"role": "user", "content": messages}]
    if getattr(tokenizer, "has_chat_template", False):
        ids = tokenizer.apply_chat_template(
            messages, add_generation_prompt=True, enable_thinking=thinking, tokenize=True
        )
        return list(ids["input_ids"] if isinstance(ids, dict) else ids)
    text = "\n".join(m["content"] for m in messages)
    return list(tokenizer.encode(text))


def visible_text(tokenizer, ids) -> str:
    """Decoded text without special tokens (pad, EOS, turn and channel markers)."""
    return tokenizer.decode([int(i) for i in ids], skip_special_tokens=True)
