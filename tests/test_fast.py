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
    full, kv = model.denoise_hidden(mx.array(canvas), cache, soft, rows=mx.arange(C), collect_kv=True)
    # the fast-RoPE path and the positions path agree (looser on a GPU: MLX 0.32.4's CUDA backend gave
    # 4e-3 on an H100, its fp32 matmuls being TF32-like; the CPU is exact fp32)
    atol = 1e-4 if mx.default_device().type == mx.DeviceType.cpu else 1e-2
    np.testing.assert_allclose(np.array(model.denoise_hidden(mx.array(canvas), cache, soft)), np.array(full), atol=atol)

    rows = np.sort(rng.choice(C, 11, replace=False))
    r = mx.array(rows)
    stale = [(k * 0.5, v * 0.5) for k, v in kv]  # what the other rows attend is what canvas_kv holds
    part, new_kv = model.denoise_hidden(mx.array(canvas[:, rows]), cache, soft[:, r], rows=r, canvas_kv=kv,
                                        collect_kv=True)
    np.testing.assert_allclose(np.array(part), np.array(full[:, r]), atol=atol)
    for (k, v), (nk, nv) in zip(kv, new_kv):  # every row's K/V comes back: the same, recomputed
        np.testing.assert_allclose(np.array(nk), np.array(k), atol=atol)
        np.testing.assert_allclose(np.array(nv), np.array(v), atol=atol)
    off = model.denoise_hidden(mx.array(canvas[:, rows]), cache, soft[:, r], rows=r, canvas_kv=stale)
    assert float(mx.abs(off - part).max()) > 1e-3  # the other rows' K/V are read, not recomputed


@pytest.mark.parametrize("held, P", [(0, 5), (0, 40), (25, 12)])
def test_prefix_pass_equals_encode_then_denoise(gemma_checkpoint, held, P):
    """denoise(..., prefix=ids) is encode(ids) then denoise in one trunk pass: the same logits, the
    same cache, the same offset; batch 2, prompts past the sliding window (16) included."""
    model, _ = load(gemma_checkpoint[0])
    V, C = model.config.vocab_size, model.config.canvas_length
    rng = np.random.default_rng(P)
    first = mx.array(rng.integers(0, V, (2, held)))
    prefix, canvas = mx.array(rng.integers(0, V, (2, P))), mx.array(rng.integers(0, V, (2, C)))
    soft = mx.array(rng.normal(size=(2, C, model.config.hidden_size)).astype(np.float32))

    def start():
        cache = model.make_cache()
        if held:
            model.encode(first, cache)
        return cache

    two = start()
    model.encode(prefix, two)
    want = model.denoise(canvas, two)
    one = start()
    got = model.denoise(canvas, one, prefix=prefix)
    assert one.offset == two.offset == held + P
    np.testing.assert_allclose(np.array(got), np.array(want), atol=1e-4)
    for a, b in zip(one.state(), two.state()):
        np.testing.assert_allclose(np.array(a), np.array(b), atol=1e-4)

    # the fast loop's first pass: rows, collected K/V, self-conditioning input
    h, kv = model.denoise_hidden(canvas, two, soft, rows=mx.arange(C), collect_kv=True)
    fused_h, fused_kv = model.denoise_hidden(canvas, start(), soft, rows=mx.arange(C), collect_kv=True, prefix=prefix)
    np.testing.assert_allclose(np.array(fused_h), np.array(h), atol=1e-4)
    for (k, v), (fk, fv) in zip(kv, fused_kv):
        assert fk.shape == k.shape  # the canvas rows only
        np.testing.assert_allclose(np.array(fk), np.array(k), atol=1e-4)
        np.testing.assert_allclose(np.array(fv), np.array(v), atol=1e-4)
    with pytest.raises(ValueError, match="whole canvas"):
        model.denoise_hidden(canvas[:, :3], start(), None, rows=mx.arange(3), canvas_kv=kv, prefix=prefix)


def test_fast_loop_without_departures_reproduces_the_reference(sharp):
    model, tok = sharp
    kw = dict(max_tokens=24, max_denoising_steps=12, seed=3, eos_token_id=[10**6], confidence_threshold=0.3)
    ref = list(stream_generate(model, tok, [2, 4, 40, 41, 5], **kw))[-1]
    same = list(stream_generate(model, tok, [2, 4, 40, 41, 5], mode=FastMode("none"), **kw))[-1]
    assert same.token_ids == ref.token_ids
    assert same.stats.steps_per_canvas == ref.stats.steps_per_canvas


@pytest.mark.parametrize("name", ["freeze", "compact", "settled", "bounded", "short", "turbo"])
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


def test_short_canvases_are_committed_one_after_another(gemma_checkpoint):
    model, tok = load(gemma_checkpoint[0])
    C = model.config.canvas_length
    mode = get_mode("settled+block_rows=8")
    assert mode.block_length(C) == 8 and mode.canvas_length(C, 3) == 8 and MODES["settled"].block_length(C) == C
    kw = dict(max_denoising_steps=4, seed=0, eos_token_id=[10**6])
    # a model trained on whole canvases only refuses them, naming the fix
    with pytest.raises(ValueError, match=r"8-row canvases, but this model lists no trained_canvas_lengths.*'settled'"):
        list(stream_generate(model, tok, [2, 4, 40, 5], max_tokens=20, mode=mode, **kw))
    model.config.raw["trained_canvas_lengths"] = [16, 32]  # as `mlx_diffgemma.train` writes it
    with pytest.raises(ValueError, match=r"8-row canvases, but this model was trained on canvases of 16, 32 rows"):
        list(stream_generate(model, tok, [2, 4, 40, 5], max_tokens=20, mode=mode, **kw))
    model.config.raw["trained_canvas_lengths"] = [8, 32]
    done = list(stream_generate(model, tok, [2, 4, 40, 5], max_tokens=20, mode=mode, **kw))[-1]
    assert len(done.token_ids) == 24 and done.stats.canvases == 3  # 20 wanted -> three 8-row canvases
    assert done.stats.row_passes <= 8 * done.stats.denoise_steps
    # longer than the model's canvas: the model's canvas length
    assert get_mode("settled+block_rows=1000").block_length(C) == C


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


@pytest.mark.parametrize("unaccepted", [False, True])
def test_freeze_unaccepted_freezes_every_confident_position(sharp, monkeypatch, unaccepted):
    mode = replace(MODES["freeze"], name="f", freeze_unaccepted=unaccepted)
    seen = sampler_calls(monkeypatch, *sharp, mode)
    skipped = 0  # confident positions that stayed unfrozen (the entropy budget did not accept them)
    for (b0, _, e0, s0), (b1, _, _, s1) in zip(seen, seen[1:]):
        if b0 != b1:
            continue  # a new canvas
        confident = (e0 < mode.freeze_entropy) & (s0 != 0)  # not frozen yet
        skipped += int((confident & (s1 != 0)).sum())
    assert (skipped == 0) == unaccepted and any((s == 0).any() for *_, s in seen)


def test_max_steps_commits_on_the_reference_schedule(sharp, monkeypatch):
    free = list(sampler_calls(monkeypatch, *sharp, MODES["freeze"]))  # a copy: the next spy stacks on this one
    capped = sampler_calls(monkeypatch, *sharp, replace(MODES["freeze"], name="f", max_steps=3))
    per_block = lambda seen: np.bincount([b for b, *_ in seen])  # noqa: E731
    assert per_block(capped).max() == 3 and per_block(free)[0] > 3
    # the first canvas' first three steps are the uncapped run's: the temperature schedule is kept
    for (b, a, e, _), (fb, fa, fe, _) in zip(capped[:3], free[:3]):
        assert b == fb == 0
        np.testing.assert_array_equal(a, fa)
        np.testing.assert_array_equal(e, fe)


class Oracle:
    """A stand-in model whose logits point at a fixed target canvas: row i's hidden state is i.
    Rows holding EOS are sure from the first step; the answer rows only from `sure_from` calls on.
    It records (rows run, context rows) of every trunk pass."""

    def __init__(self, target, vocab_size=16, sure_from=2):
        from types import SimpleNamespace

        self.config = SimpleNamespace(canvas_length=len(target), vocab_size=vocab_size, final_logit_softcapping=None)
        self.target = np.asarray(target)
        self.eos_rows = mx.array(self.target == 1)
        self.sure_from, self.heads, self.passes = sure_from, 0, []

    def denoise_hidden(self, x, cache, soft, rows=None, canvas_kv=None, collect_kv=False, prefix=None):
        rows = mx.arange(x.shape[1]) if rows is None else rows
        # (rows computed, canvas rows attended)
        self.passes.append((x.shape[1], x.shape[1] if canvas_kv is None else canvas_kv[0][0].shape[2]))
        h = rows.astype(mx.float32)[None, :, None]
        if not collect_kv:
            return h
        return h, canvas_kv if canvas_kv is not None else [(h[:, None], h[:, None])]

    def logits(self, h):
        rows = h[..., 0].astype(mx.int32)
        onehot = mx.array(np.eye(self.config.vocab_size, dtype=np.float32)[self.target])[rows]
        sure = mx.logical_or(self.eos_rows[rows], self.heads >= self.sure_from)[..., None]
        self.heads += 1
        return mx.where(sure, 40.0, 1.0) * onehot

    def soft_embeds(self, z):
        return mx.zeros((*z.shape[:2], 1))


def run_oracle(mode, target, canvas_length=None):
    from types import SimpleNamespace

    from mlx_diffgemma.config import GenerationConfig
    from mlx_diffgemma.fast import denoise_canvas_fast
    from mlx_diffgemma.sampler import NoiseSource

    model = Oracle(target)
    gen = GenerationConfig(max_denoising_steps=8, eos_token_id=[1])
    out = denoise_canvas_fast(model, SimpleNamespace(offset=7), gen, NoiseSource(0, 16), 0, mode,
                              canvas_length=canvas_length)
    return model.passes, out


TARGET = [4, 5, 6, 7, 8] + [1] * 11  # five answer rows, then EOS


@pytest.mark.parametrize("compact", [False, True])
@pytest.mark.parametrize("keep", [0, 3])
def test_drop_tail_removes_the_rows_after_a_settled_eos(compact, keep):
    """Once the EOS at row 5 is frozen, later passes run (and attend to) rows 0-5 and `keep` more."""
    mode = FastMode("t", freeze_entropy=0.05, compact=compact, eos_tail_cut=True, drop_tail=keep)
    passes, out = run_oracle(mode, TARGET)
    assert passes[0] == (16, 16)  # the first pass runs the whole canvas
    assert all(seen == 6 + keep for _, seen in passes[1:]) and len(passes) >= 3, passes
    assert out.row_passes == sum(rows for rows, _ in passes)
    np.testing.assert_array_equal(out.argmax[0, :6], TARGET[:6])


def test_eos_tail_cut_keeps_the_tail_in_the_attention():
    # compaction without refresh: the frozen tail leaves the trunk but every pass still attends to it
    mode = FastMode("t", freeze_entropy=0.05, compact=True, eos_tail_cut=True)
    passes, out = run_oracle(mode, TARGET)
    assert passes[0] == (16, 16) and all(rows < 16 and seen == 16 for rows, seen in passes[1:]), passes
    np.testing.assert_array_equal(out.argmax[0, :6], TARGET[:6])
    # without compaction every pass runs the whole canvas
    passes, _ = run_oracle(MODES["freeze"], TARGET)
    assert all(rows == 16 for rows, _ in passes)


class Fickle(Oracle):
    """An Oracle that changes its mind: rows 0-1 are sure from the start and point at TARGET until
    the third head call, then (still sure) at other tokens; rows 2-4 become sure from the fourth."""

    def __init__(self):
        super().__init__(TARGET)
        self.later = np.array([9, 10] + TARGET[2:])

    def logits(self, h):
        rows = h[..., 0].astype(mx.int32)
        target = self.target if self.heads < 2 else self.later
        onehot = mx.array(np.eye(self.config.vocab_size, dtype=np.float32)[target])[rows]
        sure = mx.logical_or(mx.array(np.arange(len(target)) < 2)[rows], self.heads >= 3)
        sure = mx.logical_or(sure, self.eos_rows[rows])[..., None]
        self.heads += 1
        return mx.where(sure, 40.0, 1.0) * onehot


@pytest.mark.parametrize("thaw", [False, True])
def test_thaw_unfreezes_a_position_whose_argmax_changed(thaw):
    from types import SimpleNamespace

    from mlx_diffgemma.config import GenerationConfig
    from mlx_diffgemma.fast import denoise_canvas_fast
    from mlx_diffgemma.sampler import NoiseSource

    model = Fickle()
    mode = replace(MODES["freeze"], name="f", thaw=thaw)  # the trunk runs every row: every step may thaw
    gen = GenerationConfig(max_denoising_steps=8, eos_token_id=[1])
    out = denoise_canvas_fast(model, SimpleNamespace(offset=7), gen, NoiseSource(0, 16), 0, mode)
    # rows 0-1 froze to TARGET's tokens on the first step; only a thawing mode takes the later ones
    np.testing.assert_array_equal(out.argmax[0, :2], [9, 10] if thaw else TARGET[:2])
    np.testing.assert_array_equal(out.argmax[0, 2:], TARGET[2:])


def test_mode_knobs_from_a_string():
    m = get_mode("compact+refresh_every=8+settle_frozen=1+drop_tail=none+freeze_entropy=0.1")
    assert m == replace(MODES["compact"], name=m.name, refresh_every=8, settle_frozen=True, freeze_entropy=0.1)
    assert m.name == "compact+refresh_every=8+settle_frozen=1+drop_tail=none+freeze_entropy=0.1"
    assert get_mode("freeze+drop_tail=2").drop_tail == 2
    # the named mode is the knob string the Sudoku gate measured
    measured = get_mode("settled+freeze_unaccepted=1+max_steps=24")
    assert MODES["bounded"] == replace(measured, name="bounded")
    for bad, culprit in [("compact+warp=1", "'warp=1' is not knob=value"), ("compact+refresh_every", "not knob=value"),
                         ("compact+compact=yes", "compact='yes' is not a valid bool"),
                         ("compact+refresh_every=x", "refresh_every='x'"), ("warp+compact=1", "unknown mode 'warp'"),
                         ("settled+max_steps=0", "max_steps must be at least 1"),
                         ("compact+refresh_every=0", "refresh_every must be at least 1"),
                         ("reference+thaw=1", "thaw needs freeze_entropy")]:
        with pytest.raises(ValueError, match=culprit):
            get_mode(bad)


@pytest.mark.parametrize("scale, rows, threshold", [(True, 4, 0.02), (False, 4, 0.005), (True, 16, 0.005)])
def test_scale_stop_keeps_a_whole_canvas_entropy_budget(monkeypatch, scale, rows, threshold):
    """On a canvas a quarter of the model's, the mean-entropy stop threshold is 4x (the same sum)."""
    from mlx_diffgemma import fast

    seen, sampler = [], fast.BlockSampler
    monkeypatch.setattr(fast, "BlockSampler", lambda gen, *a: seen.append(gen.confidence_threshold) or sampler(gen, *a))
    passes, _ = run_oracle(FastMode("t", freeze_entropy=0.05, scale_stop=scale), TARGET, canvas_length=rows)
    assert seen == [pytest.approx(threshold)] and passes[0][0] == rows
