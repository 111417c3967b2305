"""The chat session keeps its KV cache across turns, and the REPL's commands."""

import subprocess
import sys

import pytest

from mlx_diffgemma import load, stream_generate
from mlx_diffgemma.chat import ChatSession
from mlx_diffgemma.tokenizer import chat_ids, encode_text

KW = dict(max_tokens=40, max_denoising_steps=3, eos_token_id=[10**6])  # two canvases of 32, no EOS


@pytest.fixture(scope="module")
def tiny(gemma_checkpoint):
    path, _ = gemma_checkpoint
    return load(path)


def spy_encode(model, monkeypatch):
    """Lengths of what goes into the cache, in order: an encode pass, or the prefix a canvas' first
    denoising pass encodes."""
    calls = []
    encode, denoise_hidden = model.encode, model.denoise_hidden

    def spy(ids, cache):
        calls.append(int(ids.shape[-1]))
        return encode(ids, cache)

    def spy_prefix(*args, prefix=None, **kwargs):
        if prefix is not None:
            calls.append(int(prefix.shape[-1]))
        return denoise_hidden(*args, prefix=prefix, **kwargs)

    monkeypatch.setattr(model, "encode", spy)
    monkeypatch.setattr(model, "denoise_hidden", spy_prefix)
    return calls


def test_second_turn_encodes_only_new_tokens_and_matches_a_fresh_run(tiny, monkeypatch):
    model, tok = tiny
    C = model.config.canvas_length
    session = ChatSession(model, tok, system="Be brief", seed=4, **KW)
    first = [e for e in session.send("Why is the sky blue?")][-1]
    assert session.cache.offset == len(session.encoded) == len(chat_ids(tok, session.messages[:2])) + C
    assert session.pending == first.token_ids[-C:] and not session.closed
    history = list(session.encoded)

    calls = spy_encode(model, monkeypatch)
    continuation = session._continuation({"role": "user", "content": "And the sea?"})
    second = [e for e in session.send("And the sea?")][-1]
    assert calls == [len(continuation), C]  # the new tail + turn, then the first canvas of the answer
    assert continuation[:C] == first.token_ids[-C:]
    assert tok.decode(continuation[C:], skip_special_tokens=False) == "<turn|>\n<|turn>user\nAnd the sea?<turn|>\n<|turn>model\n<|channel>thought\n<channel|>"
    assert session.cache.offset == len(session.encoded) == len(history) + len(continuation) + C

    monkeypatch.undo()
    fresh = list(stream_generate(model, tok, history + continuation, seed=5, **KW))[-1]
    assert fresh.token_ids == second.token_ids
    assert [m["role"] for m in session.messages] == ["system", "user", "assistant", "user", "assistant"]


def test_an_answer_closed_by_its_eos_is_not_closed_twice(tiny):
    model, tok = tiny
    session = ChatSession(model, tok, **KW)
    list(session.send("Hi"))
    turn_end = tok.convert_tokens_to_ids("<turn|>")
    session.pending, session.closed = [40, 41, turn_end], True
    ids = session._continuation({"role": "user", "content": "Hi"})
    assert ids[:3] == [40, 41, turn_end]
    assert ids[3:] == encode_text(tok, "\n<|turn>user\nHi<turn|>\n<|turn>model\n<|channel>thought\n<channel|>")


def test_thinking_toggle_and_reset_re_encode(tiny, monkeypatch):
    model, tok = tiny
    session = ChatSession(model, tok, **KW)
    list(session.send("Hi"))
    session.thinking = True
    calls = spy_encode(model, monkeypatch)
    list(session.send("Hi again"))
    whole = chat_ids(tok, session.messages[:3], thinking=True)
    assert calls[0] == len(whole)  # the conversation, re-rendered with <|think|> in the system turn
    assert whole[:5] == chat_ids(tok, "x", thinking=True)[:5]
    session.reset()
    assert session.cache is None and session.messages == [] and session.turn_stats == []


def run_chat(path, stdin, *args):
    return subprocess.run(
        [sys.executable, "-m", "mlx_diffgemma.chat", "--model", str(path), "--steps", "2", "--max-tokens", "8", *args],
        input=stdin, capture_output=True, timeout=300,
    )


def test_repl_commands(gemma_checkpoint):
    path, _ = gemma_checkpoint
    r = run_chat(path, b"Hello\n/stats\n/thinking\nWhy?\n/stats\n/reset\n/stats\n/nope\n/quit\nnever sent\n")
    out, err = r.stdout.decode(), r.stderr.decode()
    assert r.returncode == 0, err
    assert "[thinking on]" in out and "[new conversation]" in out and "no turns yet" in out
    assert "turns 1 · cache" in out and "turns 2 · cache" in out
    assert "unknown command /nope" in out
    assert "Traceback" not in err


def test_repl_bad_input(gemma_checkpoint, tmp_path):
    path, _ = gemma_checkpoint
    r = run_chat(path, b"Hello\n\xff\xfe bad\n")
    assert r.returncode == 2 and "not valid UTF-8" in r.stderr.decode() and "Traceback" not in r.stderr.decode()
    r = run_chat(tmp_path / "missing", b"")
    assert r.returncode == 2 and "no such directory" in r.stderr.decode()
