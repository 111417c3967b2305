"""The OpenAI-compatible server, driven by the official `openai` client against servers this file
starts on 127.0.0.1 (free ports): chat, completion, streaming, the reasoning split, errors, auth,
the bounded queue, cancellation on disconnect, prefix reuse and the command line."""

import http.client
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time

import pytest

openai = pytest.importorskip("openai")

import mlx_diffgemma as dg  # noqa: E402
from mlx_diffgemma.generate import Event, Stats  # noqa: E402
from mlx_diffgemma.server import Limits, Server, _settle  # noqa: E402
from mlx_diffgemma.server import main as server_main  # noqa: E402
from mlx_diffgemma.tokenizer import chat_ids, encode_text, render_chat, visible_text  # noqa: E402

KNOBS = {"max_denoising_steps": 3}
MESSAGES = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Why is the sky blue?"}]


def start(path, **kw) -> Server:
    return Server(str(path), "127.0.0.1", 0, **kw).start()


def client(server, key="unused", **kw):
    host, port = server.address
    kw.setdefault("timeout", 60)
    return openai.OpenAI(base_url=f"http://{host}:{port}/v1", api_key=key, max_retries=0, **kw)


def raw(server, method, path, body=b"", headers=None):
    """(status, parsed JSON) over a plain connection, for bodies the openai client cannot send."""
    conn = http.client.HTTPConnection(*server.address, timeout=60)
    conn.request(method, path, body=body, headers=headers or {})
    r = conn.getresponse()
    data = r.read()
    conn.close()
    return r.status, json.loads(data) if data else None


@pytest.fixture(scope="module")
def engine(gemma_checkpoint):
    """The same checkpoint loaded here, to compute what each request must return when run alone."""
    path, _ = gemma_checkpoint
    model, tok = dg.load(path)
    _settle(model)  # the reference runs on the engine's thread
    return path, model, tok


@pytest.fixture(scope="module")
def server(engine):
    s = start(engine[0])
    yield s
    s.shutdown(grace=5)


def alone(engine, prompt_ids, max_tokens, seed, **knobs):
    """(token ids without pad, truncated to max_tokens) from stream_generate with a fresh cache."""
    _, model, tok = engine
    done = [e for e in dg.stream_generate(model, tok, prompt_ids, max_tokens=max_tokens, seed=seed, **knobs)
            if e.kind == "done"][0]
    ids = [t for t in done.token_ids if t != model.generation_config.pad_token_id]
    return ids[:max_tokens], done.stats


def test_chat_matches_the_engine_run_alone(server, engine):
    _, model, tok = engine
    r = client(server).chat.completions.create(model="anything", messages=MESSAGES, max_tokens=40, seed=5,
                                               extra_body=KNOBS)
    ids, stats = alone(engine, chat_ids(tok, MESSAGES), 40, 5, **KNOBS)
    assert r.object == "chat.completion" and r.model == server.model_name
    assert r.choices[0].message.role == "assistant"
    assert r.choices[0].message.content == visible_text(tok, ids)
    assert r.choices[0].finish_reason == ("stop" if set(ids) & set(model.generation_config.eos_token_id) else "length")
    u = r.usage
    assert u.prompt_tokens == len(chat_ids(tok, MESSAGES)) and u.completion_tokens == len(ids) <= 40
    assert u.total_tokens == u.prompt_tokens + u.completion_tokens
    assert u.model_extra["canvases"] == stats.canvases and u.model_extra["steps_per_canvas"] == stats.steps_per_canvas
    assert all(s <= 3 for s in u.model_extra["steps_per_canvas"])


def test_stream_generate_path_gives_the_same_answer(engine):
    """The server drives the engine's callback loop on its worker when it can; through the public
    `stream_generate` iterator (the fallback) the answer is the same."""
    _, _, tok = engine
    s = start(engine[0], stream_fn=dg.stream_generate)
    try:
        assert s.engine.inline is None
        r = client(s).chat.completions.create(model="x", messages=MESSAGES, max_tokens=40, seed=5, extra_body=KNOBS)
        ids, _ = alone(engine, chat_ids(tok, MESSAGES), 40, 5, **KNOBS)
        assert r.choices[0].message.content == visible_text(tok, ids) and r.usage.completion_tokens == len(ids)
    finally:
        s.shutdown(grace=5)


def test_completion_matches_the_engine_run_alone(server, engine):
    _, _, tok = engine
    r = client(server).completions.create(model="x", prompt="The quick brown fox", max_tokens=12, seed=2,
                                          extra_body=KNOBS)
    ids, _ = alone(engine, list(tok.encode("The quick brown fox")), 12, 2, **KNOBS)
    assert r.object == "text_completion" and r.choices[0].text == visible_text(tok, ids)
    assert r.usage.completion_tokens == len(ids)
    # token-id prompts are accepted as well and give the same answer
    r2 = client(server).completions.create(model="x", prompt=list(tok.encode("The quick brown fox")), max_tokens=12,
                                           seed=2, extra_body=KNOBS)
    assert r2.choices[0].text == r.choices[0].text


def test_streaming_sends_each_committed_canvas(server, engine):
    c = client(server)
    whole = c.chat.completions.create(model="x", messages=MESSAGES, max_tokens=90, seed=9, extra_body=KNOBS)
    chunks = list(c.chat.completions.create(model="x", messages=MESSAGES, max_tokens=90, seed=9, stream=True,
                                            stream_options={"include_usage": True}, extra_body=KNOBS))
    assert chunks[0].choices[0].delta.role == "assistant"
    pieces = [ch.choices[0].delta.content for ch in chunks if ch.choices and ch.choices[0].delta.content]
    assert "".join(pieces) == whole.choices[0].message.content
    canvases = whole.usage.model_extra["canvases"]
    # one content chunk per committed canvas (a held-back partial character may add one at the end)
    assert canvases >= 2 and canvases <= len(pieces) <= canvases + 1
    finish = [ch.choices[0].finish_reason for ch in chunks if ch.choices and ch.choices[0].finish_reason]
    assert finish == [whole.choices[0].finish_reason]
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == whole.usage.completion_tokens

    texts = [ch.choices[0].text for ch in client(server).completions.create(
        model="x", prompt="Diffusion models", max_tokens=40, seed=1, stream=True, extra_body=KNOBS)]
    again = client(server).completions.create(model="x", prompt="Diffusion models", max_tokens=40, seed=1,
                                              extra_body=KNOBS)
    assert "".join(texts) == again.choices[0].text


def test_conversation_prefix_reuses_the_kv_cache(server, engine):
    _, _, tok = engine
    c = client(server)
    first = c.chat.completions.create(model="x", messages=MESSAGES, max_tokens=20, seed=1, extra_body=KNOBS)
    turn2 = MESSAGES + [{"role": "assistant", "content": first.choices[0].message.content or "ok"},
                        {"role": "user", "content": "And at sunset?"}]
    r = c.chat.completions.create(model="x", messages=turn2, max_tokens=20, seed=1, extra_body=KNOBS)
    cached = r.usage.prompt_tokens_details.cached_tokens
    # all of turn 1 but its generation prompt was reused
    assert cached == len(encode_text(tok, render_chat(tok, MESSAGES, add_generation_prompt=False))) > 10
    ids, _ = alone(engine, chat_ids(tok, turn2), 20, 1, **KNOBS)
    assert r.choices[0].message.content == visible_text(tok, ids)  # reuse changes nothing


def test_thinking_flag_reaches_the_template(server, engine):
    _, _, tok = engine
    r = client(server).chat.completions.create(model="x", messages=MESSAGES, max_tokens=8, seed=0,
                                               extra_body={**KNOBS, "thinking": True})
    assert r.usage.prompt_tokens == len(chat_ids(tok, MESSAGES, thinking=True)) != len(chat_ids(tok, MESSAGES))


def scripted(canvases, delay=0.0, log=None):
    """A stand-in for stream_generate that commits the given token lists, one per canvas."""

    def stream_fn(model, tokenizer, prompt, max_tokens=None, seed=0, cache=None, **kw):
        stats = Stats(prompt_tokens=len(prompt))
        try:
            for i, tokens in enumerate(canvases):
                time.sleep(delay)
                yield Event("preview", block=i, text="ignored")  # an unknown kind: ignored
                yield Event("commit", block=i, tokens=list(tokens), text=visible_text(tokenizer, tokens))
                stats.canvases += 1
                stats.denoise_steps += 2
                stats.steps_per_canvas.append(2)
                if log is not None:
                    log.append(i)
            yield Event("done", stats=stats)
        except GeneratorExit:
            if log is not None:
                log.append("closed")
            raise

    return stream_fn


def test_reasoning_is_split_from_the_answer(engine):
    path, _, tok = engine
    v = tok.get_vocab()
    enc = lambda s: list(tok.encode(s))  # noqa: E731
    thought = [v["<|channel>"]] + enc("thought\nThe sky")
    # the channel closes inside the second canvas; the answer ends with the end-of-turn marker
    canvases = [thought, enc(" scatters blue.") + [v["<channel|>"]] + enc("Blue light scatters."),
                enc(" Done.") + [v["<turn|>"]]]
    s = start(path, stream_fn=scripted(canvases))
    try:
        r = client(s).chat.completions.create(model="x", messages=MESSAGES, max_tokens=256,
                                              extra_body={"thinking": True})
        msg = r.choices[0].message
        assert msg.model_extra["reasoning_content"] == "The sky scatters blue."
        assert msg.content == "Blue light scatters. Done."
        assert r.choices[0].finish_reason == "stop"
        assert r.usage.completion_tokens_details.reasoning_tokens == len(thought) - 1 + len(enc(" scatters blue."))
        chunks = list(client(s).chat.completions.create(model="x", messages=MESSAGES, max_tokens=256, stream=True))
        # max_tokens cuts the answer at a token, not at a canvas
        short = client(s).chat.completions.create(model="x", messages=MESSAGES, max_tokens=len(thought) + 2)
        assert short.usage.completion_tokens == len(thought) + 2 and short.choices[0].finish_reason == "length"
        assert short.choices[0].message.content == "" and short.choices[0].message.model_extra["reasoning_content"]
        deltas = [(ch.choices[0].delta.model_extra.get("reasoning_content"), ch.choices[0].delta.content)
                  for ch in chunks[1:-1]]
        assert deltas == [("The sky", None), (" scatters blue.", "Blue light scatters."), (None, " Done.")]
    finally:
        s.shutdown(grace=5)


def test_bad_requests_get_openai_errors(server, engine):
    c = client(server)
    bad = [
        dict(messages=[]),
        dict(messages=[{"role": "wizard", "content": "hi"}]),
        dict(messages=[{"role": "user", "content": "   "}]),
        dict(messages=[{"role": "user", "content": "hi"}], max_tokens=0),
        dict(messages=[{"role": "user", "content": "hi"}], max_tokens=10**6),
        dict(messages=[{"role": "user", "content": "hi"}], extra_body={"max_denoising_steps": "4"}),
        dict(messages=[{"role": "user", "content": "hi"}], extra_body={"t_min": 0.9, "t_max": 0.5}),
        dict(messages=[{"role": "user", "content": "hi"}], n=2),
        dict(messages=[{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}]),
    ]
    for kwargs in bad:
        with pytest.raises(openai.BadRequestError) as e:
            c.chat.completions.create(model="x", **kwargs)
        err = e.value.body
        assert e.value.status_code == 400 and err["type"] == "invalid_request_error" and err["message"], kwargs
    with pytest.raises(openai.BadRequestError):
        c.completions.create(model="x", prompt="")
    # bodies no client would send
    for body in (b"{not json", b"[1, 2]", b"\xff\xfe", b'{"messages": "hi"}', b"[" * 100000,
                 b'{"messages": [{"role": "user", "content": "hi"}], "stream": "yes"}',
                 b'{"messages": [{"role": "user", "content": "hi"}], "entropy_bound": 1e400}',
                 b'{"messages": [{"role": "user", "content": "hi"}], "t_max": 1' + b"0" * 400 + b"}",
                 b'{"messages": [{"role": "user", "content": "hi"}], "seed": 1' + b"0" * 5000 + b"}"):
        status, out = raw(server, "POST", "/v1/chat/completions", body, {"Content-Type": "application/json"})
        assert status == 400 and set(out["error"]) == {"message", "type", "param", "code"}, body[:20]
    status, out = raw(server, "POST", "/v1/chat/completions", b"x" * (2 << 20))
    assert status == 413 and out["error"]["code"] == "body_too_large"
    assert raw(server, "POST", "/v1/nothing", b"{}")[0] == 404
    assert raw(server, "GET", "/v1/models")[1]["data"][0]["id"] == server.model_name
    # the server is still healthy and answering after all that
    status, health = raw(server, "GET", "/health")
    assert status == 200 and health["status"] == "ok" and health["errors"]["400"] >= len(bad)
    assert c.chat.completions.create(model="x", messages=MESSAGES, max_tokens=4, extra_body=KNOBS).choices


def test_prompt_length_limit(engine):
    s = start(engine[0], limits=Limits(max_prompt_tokens=16))
    try:
        with pytest.raises(openai.BadRequestError) as e:
            client(s).chat.completions.create(model="x", messages=MESSAGES)
        assert e.value.body["code"] == "context_length_exceeded"
    finally:
        s.shutdown(grace=5)


def test_api_key(engine):
    s = start(engine[0], api_key="sesame")
    try:
        with pytest.raises(openai.AuthenticationError):
            client(s, key="wrong").models.list()
        with pytest.raises(openai.AuthenticationError):
            client(s, key="wrong").chat.completions.create(model="x", messages=MESSAGES)
        assert client(s, key="sesame").chat.completions.create(model="x", messages=MESSAGES, max_tokens=4,
                                                               extra_body=KNOBS).choices
        assert raw(s, "GET", "/health")[0] == 200  # liveness needs no key
    finally:
        s.shutdown(grace=5)


def test_full_queue_answers_429_and_shutdown_503(engine):
    path, _, tok = engine
    gate = threading.Event()

    def blocked(model, tokenizer, prompt, **kw):
        gate.wait(30)
        yield from scripted([list(tok.encode("ok"))])(model, tokenizer, prompt, **kw)

    s = start(path, stream_fn=blocked, limits=Limits(max_queue=1))
    results = []

    def ask():
        try:
            results.append(client(s).chat.completions.create(model="x", messages=MESSAGES).choices[0].message.content)
        except openai.APIStatusError as e:
            results.append(e.status_code)

    try:
        threads = [threading.Thread(target=ask) for _ in range(2)]  # one running, then one queued

        def wait_for(condition):
            deadline = time.time() + 60
            while not condition() and time.time() < deadline:
                time.sleep(0.02)
            assert condition()

        threads[0].start()
        wait_for(lambda: s.engine.running is not None)
        threads[1].start()
        wait_for(lambda: s.engine.jobs.qsize() == 1)
        with pytest.raises(openai.RateLimitError):
            client(s).chat.completions.create(model="x", messages=MESSAGES)
        gate.set()
        for t in threads:
            t.join(30)
        assert results == ["ok", "ok"]
        s.engine.closing = True
        with pytest.raises(openai.InternalServerError) as e:
            client(s).chat.completions.create(model="x", messages=MESSAGES)
        assert e.value.status_code == 503
    finally:
        gate.set()
        s.shutdown(grace=5)


def test_client_disconnect_cancels_generation(engine):
    path, _, tok = engine
    log = []
    s = start(path, stream_fn=scripted([list(tok.encode("word"))] * 50, delay=0.05, log=log))
    try:
        stream = client(s).chat.completions.create(model="x", messages=MESSAGES, stream=True)
        next(iter(stream))
        next(iter(stream))
        stream.close()
        deadline = time.time() + 10
        while "closed" not in log and time.time() < deadline:
            time.sleep(0.05)
        assert "closed" in log and len(log) < 40  # stopped early, at a canvas boundary
        # a non-streaming request whose client times out is cancelled too
        log.clear()
        with pytest.raises(openai.APITimeoutError):
            client(s, timeout=0.3).chat.completions.create(model="x", messages=MESSAGES)
        deadline = time.time() + 10
        while "closed" not in log and time.time() < deadline:
            time.sleep(0.05)
        assert "closed" in log and len(log) < 40
        assert raw(s, "GET", "/health")[1]["cancelled"] == 2
    finally:
        s.shutdown(grace=5)


def free_port():
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def test_command_line(engine, tmp_path, capsys):
    # bad arguments: one line on stderr, exit code 2 (in-process, to spare a slow interpreter start)
    for args in (["--model", str(tmp_path / "none")], ["--model", str(engine[0]), "--max-queue", "0"]):
        assert server_main([*args, "--port", str(free_port())]) == 2
        err = capsys.readouterr().err
        assert err.startswith("error: ") and err.count("\n") == 1, err

    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "mlx_diffgemma.server", "--model", str(engine[0]),
                             "--port", str(port), "--max-queue", "2"], stderr=subprocess.PIPE)
    try:
        deadline = time.time() + 120
        while time.time() < deadline:
            try:
                conn = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
                conn.request("GET", "/health")
                assert conn.getresponse().status == 200
                break
            except OSError:
                time.sleep(0.2)
        c = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="x", max_retries=0)
        assert c.chat.completions.create(model="x", messages=MESSAGES, max_tokens=4, extra_body=KNOBS).choices
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(60) == 0
        assert b"127.0.0.1" in proc.stderr.read()
    finally:
        if proc.poll() is None:
            os.kill(proc.pid, signal.SIGKILL)
            proc.wait()
