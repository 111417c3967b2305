"""Fast modes: partial canvas passes are exact, a no-op mode reproduces the reference, and each
mode runs and does less work."""

from dataclasses import replace

import mlx.core as mx
import numpy as np
import pytest

from mlx_diffgemma import load, stream_generate
from mlx_diffgemma.fast import MODES, FastMode, get_mode


@pytest.fixture(scope="module")
def sharp(sharp_checkpoint):
    return load(sharp_checkpoint[0])


def test_partial_pass_with_context_equals_full_pass(gemma_checkpoint):
    model, _ = load(gemma_checkpoint[0])
    V, C = model.config.vocab_size, model.config.canvas_length
    rng = np.random.default_rng(0)
    cache = model.make_cache()
    model.encode(mx.array(rng.integers(0, V, (1, 30))), cache)
    canvas = rng.integers(0, V, (1, C))
    soft = mx.array(rng.normal(size=(1, C, model.config.hidden_size)).astype(np.float32))
    positions = cache.offset + mx.arange(C)
    full, kv = model.denoise_hidden(mx.array(canvas), cache, soft, positions=positions, collect_kv=True)
    # the fast-RoPE path and the positions path agree (looser on a GPU: MLX 0.32.4's CUDA backend gave
    # 4e-3 on an H100, its fp32 matmuls being TF32-like; the CPU is exact fp32)
    atol = 1e-4 if mx.default_device().type == mx.DeviceType.cpu else 1e-2
    np.testing.assert_allclose(np.array(model.denoise_hidden(mx.array(canvas), cache, soft)), np.array(full), atol=atol)

    rows = np.sort(rng.choice(C, 11, replace=False))
    ctx = np.setdiff1d(np.arange(C), rows)
    r, c = mx.array(rows), mx.array(ctx)
    part = model.denoise_hidden(
        mx.array(canvas[:, rows]), cache, soft[:, r], positions=cache.offset + r,
        context=[(k[:, :, c], v[:, :, c]) for k, v in kv],
    )
    np.testing.assert_allclose(np.array(part), np.array(full[:, r]), atol=atol)


def test_fast_loop_without_departures_reproduces_the_reference(sharp):
    model, tok = sharp
    kw = dict(max_tokens=24, max_denoising_steps=12, seed=3, eos_token_id=[10**6], confidence_threshold=0.3)
    ref = list(stream_generate(model, tok, [2, 4, 40, 41, 5], **kw))[-1]
    same = list(stream_generate(model, tok, [2, 4, 40, 41, 5], mode=FastMode("none"), **kw))[-1]
    assert same.token_ids == ref.token_ids
    assert same.stats.steps_per_canvas == ref.stats.steps_per_canvas


@pytest.mark.parametrize("name", ["freeze", "compact", "turbo"])
def test_modes_do_less_trunk_work(sharp, name):
    model, tok = sharp
    kw = dict(max_tokens=32, max_denoising_steps=24, seed=1, eos_token_id=[10**6], confidence_threshold=0.05)
    ref = list(stream_generate(model, tok, [2, 4, 40, 41, 5], **kw))[-1].stats
    fast = list(stream_generate(model, tok, [2, 4, 40, 41, 5], mode=name, **kw))[-1].stats
    assert fast.committed_tokens == ref.committed_tokens
    assert fast.denoise_steps <= ref.denoise_steps
    assert fast.row_passes_per_token < ref.row_passes_per_token
    if MODES[name].compact:
        assert fast.row_passes < fast.denoise_steps * model.config.canvas_length  # rows left the trunk


def test_compaction_refreshed_every_step_is_freeze(sharp):
    # refresh_every=1 runs every row at every step: no stale K/V, so exactly `freeze`
    model, tok = sharp
    kw = dict(max_tokens=32, max_denoising_steps=24, seed=1, eos_token_id=[10**6], confidence_threshold=0.05)
    run = lambda mode: list(stream_generate(model, tok, [2, 4, 40, 41, 5], mode=mode, **kw))[-1]  # noqa: E731
    freeze = run("freeze")
    always = run(replace(MODES["compact"], name="compact-r1", refresh_every=1))
    never = run(replace(MODES["compact"], name="compact-r0", refresh_every=None))
    assert always.token_ids == freeze.token_ids and always.stats.row_passes == freeze.stats.row_passes
    C = model.config.canvas_length
    assert never.stats.row_passes < never.stats.denoise_steps * C  # rows left the trunk
    every4 = run(replace(MODES["compact"], name="compact-r4", refresh_every=4)).stats
    refreshes = sum(-(-s // 4) for s in every4.steps_per_canvas)  # steps 0, 4, 8, ... of each canvas
    assert refreshes * C <= every4.row_passes < every4.denoise_steps * C


def test_unknown_mode_is_a_clear_error():
    with pytest.raises(ValueError, match="unknown mode 'warp'.*reference"):
        get_mode("warp")


def test_adaptive_canvas_shrinks_the_last_canvas(gemma_checkpoint):
    model, tok = load(gemma_checkpoint[0])
    mode = FastMode("adaptive", freeze_entropy=0.05, compact=True, adaptive_canvas=True, min_canvas=8)
    kw = dict(max_denoising_steps=4, seed=0, eos_token_id=[10**6])
    done = list(stream_generate(model, tok, [2, 4, 40, 5], max_tokens=44, mode=mode, **kw))[-1]
    assert len(done.token_ids) == 32 + 16  # one whole canvas, then 12 wanted -> 16 rows
    assert mode.canvas_length(32, 100) == 32 and mode.canvas_length(32, 1) == 8
    ref = list(stream_generate(model, tok, [2, 4, 40, 5], max_tokens=44, **kw))[-1]
    assert len(ref.token_ids) == 64  # the reference always denoises whole canvases


def test_bucket_sizes():
    from mlx_diffgemma.fast import _bucket

    assert [_bucket(n, 4, 81) for n in (1, 4, 5, 9, 33, 64, 65)] == [4, 4, 8, 16, 64, 64, 81]
    assert [_bucket(n, 4, 81, multiple=8) for n in (1, 5, 9, 33, 80, 81)] == [8, 8, 16, 40, 80, 81]


def sampler_calls(monkeypatch, model, tok, mode) -> list[tuple]:
    """Run a short generation under `mode`; return what the fast loop handed the sampler at each
    step: (block, argmax, entropy for the acceptance, stop_entropy)."""
    import mlx_diffgemma.fast as fast

    seen = []

    class Spy(fast.BlockSampler):
        def step(self, argmax, sample, entropy, stop_entropy=None):
            seen.append((self.block, argmax.copy(), entropy.copy(), stop_entropy.copy()))
            return super().step(argmax, sample, entropy, stop_entropy=stop_entropy)

    monkeypatch.setattr(fast, "BlockSampler", Spy)
    kw = dict(max_tokens=32, max_denoising_steps=24, seed=1, eos_token_id=[10**6], confidence_threshold=0.05)
    list(stream_generate(model, tok, [2, 4, 40, 41, 5], mode=mode, **kw))
    return seen


@pytest.mark.parametrize("settle", [False, True])
def test_settle_frozen_zeroes_frozen_entropy_in_the_acceptance(sharp, monkeypatch, settle):
    seen = sampler_calls(monkeypatch, *sharp, replace(MODES["freeze"], name="f", settle_frozen=settle))
    assert any((stop == 0).any() for *_, stop in seen), "no step had frozen positions"
    for _, _, entropy, stop in seen:
        if settle:
            np.testing.assert_array_equal(entropy, stop)
        else:
            live = stop != 0
            np.testing.assert_array_equal(entropy[live], stop[live])
    if not settle:
        # without settling, some frozen position enters the acceptance with its last entropy
        assert any((e[s == 0] > 0).any() for _, _, e, s in seen)


@pytest.mark.parametrize("rescore", [False, True])
def test_rescore_frozen_refreshes_entropy_not_tokens(sharp, monkeypatch, rescore):
    seen = sampler_calls(monkeypatch, *sharp, replace(MODES["freeze"], name="f", rescore_frozen=rescore))
    changed = 0
    for (b0, a0, e0, s0), (b1, a1, e1, _) in zip(seen, seen[1:]):
        if b0 != b1:
            continue  # a new canvas
        kept = s0 == 0  # frozen before the later step
        np.testing.assert_array_equal(a1[kept], a0[kept])  # frozen tokens never change
        changed += int((e1[kept] != e0[kept]).sum())
    assert (changed > 0) == rescore  # only rescoring gives frozen rows a new entropy
