"""stream_generate as apps use it: event kinds and order, live steps, preview, text deltas,
cancellation, worker threads, the context limit, and flat threads over repeated requests."""

import os
import threading

import pytest

from mlx_diffgemma import load, stream_generate
from mlx_diffgemma.generate import context_length

FAST = dict(max_denoising_steps=3)


@pytest.fixture(scope="module")
def tiny(gemma_checkpoint):
    path, _ = gemma_checkpoint
    return load(path)


def test_event_order_and_text_deltas_add_up(tiny):
    model, tok = tiny
    events = list(stream_generate(model, tok, "Why is the sky blue?", max_tokens=64, seed=3, **FAST))
    kinds = [e.kind for e in events]
    assert kinds[-1] == "done" and kinds.count("done") == 1 and kinds.count("commit") == 2
    done = events[-1]
    assert kinds.count("step") == done.stats.denoise_steps == 6
    for block in (0, 1):  # per canvas: steps, then its text, then its commit
        idx = [i for i, e in enumerate(events) if e.block == block and e.kind != "done"]
        own = [events[i].kind for i in idx]
        assert own == sorted(own, key=["step", "text", "commit"].index)
        commit = events[idx[-1]]
        texts = [events[i] for i in idx if events[i].kind == "text"]
        assert commit.text == "".join(e.text for e in texts)
        assert commit.reasoning == "".join(e.reasoning for e in texts)
        assert all(len(e.tokens) <= 1 for e in texts)  # token by token
    assert "".join(e.text for e in events if e.kind == "text") == done.text
    assert "".join(e.reasoning for e in events if e.kind == "text") == done.reasoning
    assert done.finish_reason == "length" and len(done.token_ids) == 64
    step = events[0]
    assert step.canvas.shape == (32,) and 1 <= step.accepted <= 32 and step.mean_entropy > 0
    assert done.stats.first_text_s is not None and done.stats.as_dict()["first_text_s"] > 0


def test_steps_are_live_and_cancel_stops_mid_canvas(tiny):
    model, tok = tiny
    cancel = threading.Event()
    seen = []
    for e in stream_generate(model, tok, "Hello", max_tokens=32, max_denoising_steps=40, cancel=cancel):
        seen.append(e)
        if e.kind == "step":
            cancel.set()  # had steps been buffered per canvas, all 40 would have run already
    done = seen[-1]
    assert done.kind == "done" and done.finish_reason == "cancelled"
    assert done.stats.canvases == 0 and done.token_ids == []
    assert 1 <= sum(e.kind == "step" for e in seen) < 40


def test_cancel_from_another_thread_and_callable(tiny):
    model, tok = tiny
    cancel = threading.Event()
    out = {}

    def worker():
        out["events"] = list(stream_generate(model, tok, "Hello", max_tokens=320, cancel=cancel, **FAST))

    t = threading.Thread(target=worker)
    t.start()
    cancel.set()
    t.join(60)
    assert not t.is_alive()
    done = out["events"][-1]
    assert done.finish_reason == "cancelled" and done.stats.canvases < 10

    calls = []
    events = list(stream_generate(model, tok, "Hello", max_tokens=96, cancel=lambda: len(calls) > 4 or calls.append(1), **FAST))
    assert events[-1].finish_reason == "cancelled" and events[-1].stats.denoise_steps < 9


def test_closing_early_leaves_the_engine_ready(tiny):
    model, tok = tiny
    reference = list(stream_generate(model, tok, "Hi", max_tokens=64, seed=5, **FAST))[-1]
    it = stream_generate(model, tok, "Hi", max_tokens=64, seed=5, **FAST)
    next(it)
    it.close()
    again = list(stream_generate(model, tok, "Hi", max_tokens=64, seed=5, **FAST))[-1]
    assert again.token_ids == reference.token_ids


def test_concurrent_threads_get_their_own_answers(tiny):
    model, tok = tiny
    prompts = {1: "Why is the sky blue?", 2: "Write a short poem about the sea.", 3: "Sudoku"}
    sequential = {s: list(stream_generate(model, tok, p, max_tokens=64, seed=s, **FAST))[-1].token_ids
                  for s, p in prompts.items()}
    results = {}

    def run(s):
        results[s] = list(stream_generate(model, tok, prompts[s], max_tokens=64, seed=s, **FAST))[-1].token_ids

    threads = [threading.Thread(target=run, args=(s,)) for s in prompts]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert results == sequential


def test_threads_flat_over_requests(tiny):
    model, tok = tiny
    list(stream_generate(model, tok, "x", max_tokens=32, max_denoising_steps=1))
    before = len(os.listdir("/proc/self/task")) if os.path.isdir("/proc/self/task") else threading.active_count()
    for _ in range(6):
        list(stream_generate(model, tok, "x", max_tokens=32, max_denoising_steps=1))
    after = len(os.listdir("/proc/self/task")) if os.path.isdir("/proc/self/task") else threading.active_count()
    assert after <= before


def test_preview_is_the_stable_accepted_prefix(sharp_checkpoint):
    path, _ = sharp_checkpoint
    model, tok = load(path)
    kw = dict(max_tokens=24, seed=2, max_denoising_steps=12, confidence_threshold=1e-9)
    plain = list(stream_generate(model, tok, "Why is the sky blue?", **kw))
    assert not any(e.kind == "preview" for e in plain)
    events = list(stream_generate(model, tok, "Why is the sky blue?", preview=True, **kw))
    assert [e.token_ids for e in events if e.kind == "done"] == [plain[-1].token_ids]  # preview changes nothing
    previews = [e for e in events if e.kind == "preview"]
    assert any(p.tokens for p in previews)
    steps = {(e.block, e.step): e for e in events if e.kind == "step"}
    for p in previews:
        canvas = steps[(p.block, p.step)].canvas
        assert p.tokens == [int(t) for t in canvas[: len(p.tokens)]]
        assert p.step >= 1  # stable means unchanged since a previous step
    # the first words show before their canvas is committed
    first = next(i for i, e in enumerate(events) if e.kind == "preview" and e.tokens)
    commit = next(i for i, e in enumerate(events) if e.kind == "commit" and e.block == events[first].block)
    assert first < commit


def test_context_limit(tiny):
    model, tok = tiny
    context, C = context_length(model), model.config.canvas_length
    assert context == 4096
    with pytest.raises(ValueError, match="too long for the model's context of 4096"):
        list(stream_generate(model, tok, list(range(5, 105)) * 41, **FAST))
    # room for two canvases only: generation stops there, as "length"
    ids = [5] * (context - 2 * C - 7)
    done = list(stream_generate(model, tok, ids, max_tokens=10 * C, max_denoising_steps=1, eos_token_id=[10**6]))[-1]
    assert done.stats.canvases == 2 and done.finish_reason == "length"


def test_prompt_fused_into_the_first_step_or_given_its_own_pass(tiny):
    model, tok = tiny
    ids = list(range(5, 25))  # shorter than the 32-row canvas: fused unless asked otherwise
    runs = {}
    for fuse in (True, False):
        cache = model.make_cache()
        done = list(stream_generate(model, tok, ids, max_tokens=64, seed=5, cache=cache, fuse_prompt=fuse, **FAST))[-1]
        runs[fuse] = done
        assert done.stats.prefill_fused is fuse and (done.stats.prefill_tokens_per_s > 0) is not fuse
        assert cache.offset == len(ids) + 32  # the prompt and the first commit, either way
    assert runs[True].token_ids == runs[False].token_ids
    assert "first step" in runs[True].stats.prefill_summary and "tok/s" in runs[False].stats.prefill_summary


def test_a_request_cancelled_before_its_first_canvas_still_encodes_the_prompt(tiny):
    model, tok = tiny
    cache, ids = model.make_cache(), list(range(5, 15))
    done = list(stream_generate(model, tok, ids, max_tokens=32, cache=cache, cancel=lambda: True, **FAST))[-1]
    assert done.finish_reason == "cancelled" and done.stats.canvases == 0
    assert cache.offset == len(ids)  # a conversation's cache holds what was said, as before
