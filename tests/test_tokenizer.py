"""Chat template (golden ids from the spec), thinking on/off, and splitting output into
content / reasoning / tool calls without leaking markers."""

import pytest

from mlx_diffgemma.testing import build_tokenizer
from mlx_diffgemma.tokenizer import (
    GEMMA4_CHAT_TEMPLATE, TextStream, chat_ids, encode_text, parse_output, render_chat, visible_text,
)

# The spec's id table (section 6), plus the words of its example prompt and a few of our own
# placed on unused ids, so that our template, rendered and tokenized, must give the spec's ids.
SPEC_IDS = {
    "<pad>": 0, "<eos>": 1, "<bos>": 2, "<unk>": 3,
    "<|tool>": 46, "<tool|>": 47, "<|tool_call>": 48, "<tool_call|>": 49,
    "<|tool_response>": 50, "<tool_response|>": 51, '<|"|>': 52,
    "<|think|>": 98, "<|channel>": 100, "<channel|>": 101, "<|turn>": 105, "<turn|>": 106,
}
WORDS = {
    "\n": 107, "user": 2364, "model": 4368, "system": 9731, "thought": 45518,
    "Write": 6974, "▁a": 496, "▁long": 1440, "▁essay": 20494, "▁about": 1003, "▁Portugal": 23613, ".": 236761,
    # ours (not from the spec): for the parsing tests
    "Be": 300, "▁brief": 301, "Hi": 302, "▁there": 303, "Let": 304, "▁me": 305, "▁think": 306,
    "call": 307, ":": 308, "weather": 309, "{": 310, "}": 311, "city": 312, "Paris": 313, "Sure": 314,
}
PORTUGAL = [6974, 496, 1440, 20494, 1003, 23613, 236761]


@pytest.fixture(scope="module")
def spec_tokenizer():
    """A WordLevel tokenizer whose ids for the spec's tokens are the spec's ids (no chat template)."""
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {**SPEC_IDS, **WORDS}
    size = max(vocab.values()) + 1
    taken = set(vocab.values())
    vocab.update({f"<unused{i}>": i for i in range(size) if i not in taken})
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="never"), pre_tokenizers.Punctuation("isolated")]
    )
    tok.decoder = decoders.Metaspace(replacement="▁", prepend_scheme="never")
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in SPEC_IDS])
    tok.add_tokens([AddedToken("\n", special=False, normalized=False)])
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<bos>", eos_token="<eos>", pad_token="<pad>", unk_token="<unk>"
    )
    assert fast.chat_template is None  # so our template is the one rendered
    return fast


def test_golden_ids_thinking_off(spec_tokenizer):
    ids = chat_ids(spec_tokenizer, "Write a long essay about Portugal.", thinking=False)
    assert ids == [2, 105, 2364, 107, *PORTUGAL, 106, 107, 105, 4368, 107, 100, 45518, 107, 101]


def test_golden_ids_thinking_on(spec_tokenizer):
    ids = chat_ids(spec_tokenizer, "Write a long essay about Portugal.", thinking=True)
    assert ids == [2, 105, 9731, 107, 98, 107, 106, 107, 105, 2364, 107, *PORTUGAL, 106, 107, 105, 4368, 107]


def test_system_and_history(spec_tokenizer):
    messages = [
        {"role": "system", "content": "Be brief"},
        {"role": "user", "content": "Hi"},
        {"role": "assistant", "content": "<|channel>thought\nLet me think<channel|>Hi there"},
        {"role": "user", "content": [{"type": "text", "text": "Hi"}]},
    ]
    text = render_chat(spec_tokenizer, messages, thinking=True)
    assert text == (
        "<bos><|turn>system\n<|think|>\nBe brief<turn|>\n<|turn>user\nHi<turn|>\n"
        "<|turn>model\nHi there<turn|>\n<|turn>user\nHi<turn|>\n<|turn>model\n"
    )  # assistant -> model, the earlier thought channel dropped
    off = render_chat(spec_tokenizer, messages[:2], thinking=False)
    assert off == "<bos><|turn>system\nBe brief<turn|>\n<|turn>user\nHi<turn|>\n<|turn>model\n<|channel>thought\n<channel|>"


def test_the_checkpoints_own_template_wins(spec_tokenizer):
    import copy

    tok = copy.deepcopy(spec_tokenizer)
    tok.chat_template = "{{ bos_token }}{% for m in messages %}{{ m['content'] }}{% endfor %}<turn|>"
    assert chat_ids(tok, "Hi there") == [2, 302, 303, 106]
    assert GEMMA4_CHAT_TEMPLATE != tok.chat_template


def test_thought_channel_goes_to_reasoning(spec_tokenizer):
    ids = encode_text(spec_tokenizer, "<|channel>thought\nLet me think<channel|>Hi there<turn|><pad><pad>")
    out = parse_output(spec_tokenizer, ids)
    assert out.reasoning == "Let me think"
    assert out.content == "Hi there"
    assert out.tool_calls == []


def test_tool_calls_kept_verbatim_never_in_content(spec_tokenizer):
    raw = '<|tool_call>call:weather{city:<|"|>Paris<|"|>}<tool_call|>'
    ids = encode_text(spec_tokenizer, "Sure" + raw + "<turn|>")
    out = parse_output(spec_tokenizer, ids)
    assert out.tool_calls == [raw]
    assert out.content == "Sure"
    assert "<|" not in out.content and "weather" not in out.content


def test_special_tokens_never_visible(spec_tokenizer):
    ids = encode_text(spec_tokenizer, "<bos><|turn>model\nHi<|think|> there<turn|><eos><tool_response|>")
    assert visible_text(spec_tokenizer, ids) == "model\nHi there"


@pytest.fixture(scope="module")
def bpe():
    return build_tokenizer()


def test_stream_deltas_add_up_to_the_whole_decode(bpe):
    # byte-level BPE: multi-byte characters span tokens and must not come out half-decoded
    text = "Why is the sky blue? Déjà vu — 日本語 🌊 sea.\nNext line"
    ids = bpe.encode(text, add_special_tokens=False)
    assert len(ids) > len(text) // 2
    stream, pieces = TextStream(bpe), []
    for t in ids:
        d = stream.add(t)
        assert "\ufffd" not in d.content
        pieces.append(d.content)
    pieces.append(stream.finish().content)
    assert "".join(pieces) == text == stream.parsed.content
    assert sum(bool(p) for p in pieces) > 10  # token by token, not all at the end


def test_stream_split_matches_batch_parse_and_copy_is_independent(bpe):
    text = "<|channel>thought\nthe sky<channel|>Blue <|tool_call>call{x}<tool_call|> sea<turn|>"
    ids = bpe.encode(text, add_special_tokens=False)
    stream = TextStream(bpe)
    content = reasoning = tool = ""
    for i, t in enumerate(ids):
        if i == len(ids) // 2:
            fork = stream.copy()
            for u in ids[i:]:
                fork.add(u)
            fork.finish()
        d = stream.add(t)
        content, reasoning, tool = content + d.content, reasoning + d.reasoning, tool + d.tool_call
    stream.finish()
    assert (content, reasoning) == ("Blue  sea", "the sky")
    assert tool == "<|tool_call>call{x}<tool_call|>"
    assert fork.parsed == stream.parsed == parse_output(bpe, ids)


def test_unclosed_channel_and_tool_call(bpe):
    out = parse_output(bpe, bpe.encode("<|channel>thought\nstill thinking", add_special_tokens=False))
    assert out.reasoning == "still thinking" and out.content == ""
    out = parse_output(bpe, bpe.encode("ok<|tool_call>call{", add_special_tokens=False))
    assert out.content == "ok" and out.tool_calls == ["<|tool_call>call{"]
