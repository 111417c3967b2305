"""Fast denoising modes: less work per committed token than the reference sampler.

Each mode is a named set of departures from the reference, measured against it on a trained model
(docs/fast_path.md). The reference sampler (`generate.denoise_canvas`) re-evaluates every canvas
position every step; these modes stop paying for positions that are already decided:

- monotone commit (`freeze_entropy`): an accepted position whose entropy is below the threshold is
  frozen to its argmax; it is never re-noised and leaves the LM head and the sampler;
- active-set compaction (`compact`): frozen rows also leave the trunk; the rows still denoised attend
  to the frozen rows' K/V from the last step that computed them (stale K/V), and the active set is
  padded to a few bucket sizes so shapes repeat;
- top-k head (`top_k`): the fused LM-head epilogue (kernels/epilogue.py) replaces the fp32 softmax
  over the vocabulary (the sample stays exact), and self-conditioning uses the renormalised top-k
  embedding rows instead of a full-vocabulary softmax @ E;
- freezing schedule (`target_steps`): besides the entropy rule, the lowest-entropy active positions
  are frozen on a schedule that leaves none active after `target_steps` steps (a MaskGIT-style
  quota; the reference keeps refining until stable and confident, up to 48 steps);
- EOS tail cut (`eos_tail_cut`): once a frozen position holds an EOS, the rows after it are frozen
  too (they become pad at the commit); with compaction they leave the trunk, but stay in the
  attention as K/V refreshed on refresh steps. `drop_tail` removes them from the canvas altogether;
  on the sort model that cost 21 points of exact answers (docs/fast_path.md), so no mode uses it;
- prefix-stable exit (`prefix_exit`): the canvas stops when the argmax up to the first EOS is stable
  and confident, ignoring the padded tail;
- adaptive canvas (`adaptive_canvas`): when fewer tokens are wanted than a canvas holds, the canvas
  shrinks to them (at least `min_canvas` rows), instead of denoising a whole canvas to throw away;
- short canvases (`block_rows`): every canvas has this many rows, committed one after another as the
  block loop does, so a short answer pays for a short canvas and a long one for a few. It needs a
  model trained on such blocks (the sort task's `canvas_lengths`); a model trained only on whole
  canvases is not (docs/fast_path.md). With `scale_stop` such a canvas keeps a whole canvas'
  entropy budget in the stable-and-confident stop (the same sum, not the same mean).

`settle_frozen` (frozen positions count as entropy 0 in the acceptance too, not only in the stop
test) is the `settled` mode's one change to `compact`. `bounded` adds two more:
`freeze_unaccepted` (a position under `freeze_entropy` freezes to its argmax even when the entropy
budget did not accept its sample) and `max_steps=24` (a canvas commits its argmax after this many
passes; the temperature schedule stays the reference's, over `max_denoising_steps`). Knobs no named
mode turns on (measured in docs/fast_path.md): `rescore_frozen` (frozen rows the trunk ran also get
the head, so their entropy is current; their tokens stay frozen), `bucket_multiple` (finer
active-set buckets), `drop_tail` and `thaw` (a step that runs every row also scores the frozen rows,
and one whose argmax changed or whose entropy is back over `freeze_entropy` is unfrozen).
`get_mode("compact+refresh_every=8")` sets knobs from a string.
"""

from __future__ import annotations

from dataclasses import dataclass, fields, replace

import mlx.core as mx
import numpy as np

from .config import GenerationConfig
from .kernels import head_statistics, lm_head_epilogue
from .sampler import BlockSampler, NoiseSource


@dataclass(frozen=True)
class FastMode:
    name: str
    freeze_entropy: float | None = None
    compact: bool = False
    top_k: int = 0
    eos_tail_cut: bool = False
    prefix_exit: bool = False
    min_bucket: int = 4  # active sets are padded to powers of two from here up to the canvas
    target_steps: int | None = None  # freeze the most confident positions on a schedule that ends by then
    adaptive_canvas: bool = False  # a last canvas no longer than the tokens still wanted
    refresh_every: int | None = None  # with compact: every n-th step runs every row (fresh K/V)
    min_canvas: int = 64
    settle_frozen: bool = False  # frozen positions count as entropy 0 in the acceptance too
    bucket_multiple: int | None = None  # pad active sets to multiples of this instead of powers of two
    rescore_frozen: bool = False  # frozen rows the trunk ran this step also get the head: a current entropy
    drop_tail: int | None = None  # with eos_tail_cut: rows this far past the settled EOS leave the canvas
    block_rows: int | None = None  # canvases of this many rows instead of the model's canvas_length
    scale_stop: bool = False  # a shorter canvas keeps a whole canvas' entropy budget in the stop test
    freeze_unaccepted: bool = False  # freeze every position under freeze_entropy, accepted or not
    max_steps: int | None = None  # a canvas commits its argmax after this many passes (schedule unchanged)
    thaw: bool = False  # steps that run every row rescore frozen rows; one no longer sure of its token thaws

    def __post_init__(self):
        for knob in ("max_steps", "refresh_every", "target_steps", "block_rows", "bucket_multiple"):
            value = getattr(self, knob)
            if value is not None and value < 1:
                raise ValueError(f"mode {self.name!r}: {knob} must be at least 1 (or none), got {value}")
        if self.thaw and self.freeze_entropy is None:
            raise ValueError(f"mode {self.name!r}: thaw needs freeze_entropy (nothing is frozen without it)")

    def block_length(self, C: int) -> int:
        """Rows per canvas before any adaptive shrinking: C, or `block_rows` when that is shorter."""
        return min(C, self.block_rows) if self.block_rows else C

    def canvas_length(self, C: int, remaining: int) -> int:
        """Rows of the next canvas: the block length, or for adaptive canvases the tokens still
        wanted rounded up to a multiple of 8 when that is shorter (at least `min_canvas`)."""
        rows = self.block_length(C)
        if not self.adaptive_canvas:
            return rows
        return min(rows, max(self.min_canvas, -(-remaining // 8) * 8))

    @property
    def is_reference(self) -> bool:
        return self == MODES["reference"]


MODES = {
    "reference": FastMode("reference"),
    # monotone commit only: the trunk still runs on every row (no stale K/V)
    "freeze": FastMode("freeze", freeze_entropy=0.05),
    # monotone commit, + frozen rows leave the trunk (stale K/V), except every 4th step, which runs
    # every row: never refreshing cost 8 points of Sudoku cell accuracy, every 4th step 1.4
    "compact": FastMode("compact", freeze_entropy=0.05, compact=True, refresh_every=4),
    # compact, + frozen positions count as settled (entropy 0) in the acceptance, which gives back
    # the steps that freezing costs (2.3x the reference's on a sort checkpoint; docs/fast_path.md)
    "settled": FastMode("settled", freeze_entropy=0.05, compact=True, refresh_every=4, settle_frozen=True),
    # settled on 48-row canvases committed one after another, each stopping on a whole canvas'
    # entropy budget; for models trained on short canvases (docs/fast_path.md)
    "short": FastMode("short", freeze_entropy=0.05, compact=True, refresh_every=4, settle_frozen=True,
                      block_rows=48, scale_stop=True),
    # settled, + every position under freeze_entropy freezes whether the entropy budget accepted it or
    # not, and a canvas commits its argmax after 24 passes: a bounded cost per canvas, within noise of
    # the reference on the eight-layer Sudoku model at 5.4x fewer row-passes (docs/fast_path.md)
    "bounded": FastMode("bounded", freeze_entropy=0.05, compact=True, refresh_every=4, settle_frozen=True,
                        freeze_unaccepted=True, max_steps=24),
    # monotone commit, + a freezing schedule that ends every canvas within 16 steps (trunk on every row)
    "scheduled": FastMode("scheduled", freeze_entropy=0.05, target_steps=16),
    # + compaction, + a freezing schedule that ends every canvas within 16 steps, the top-k head and
    # self-conditioning, EOS tail cut, prefix-stable exit, adaptive canvas
    "turbo": FastMode("turbo", freeze_entropy=0.05, compact=True, refresh_every=4, target_steps=16, top_k=64,
                      eos_tail_cut=True, prefix_exit=True, adaptive_canvas=True),
}


def get_mode(mode) -> FastMode:
    """A FastMode, a mode name, or a name with knobs: "compact+refresh_every=8+settle_frozen=1"
    (values are integers, floats, 0/1 for flags, or none)."""
    if isinstance(mode, FastMode):
        return mode
    if mode is None:
        return MODES["reference"]
    name, *knobs = str(mode).split("+")
    if name not in MODES:
        raise ValueError(f"unknown mode {name!r}; choose one of {', '.join(MODES)}")
    if not knobs:
        return MODES[name]
    known = {f.name: f for f in fields(FastMode) if f.name != "name"}
    changes = {}
    for knob in knobs:
        key, sep, value = knob.partition("=")
        if not sep or key not in known:
            raise ValueError(f"mode {mode!r}: {knob!r} is not knob=value with a FastMode knob ({', '.join(known)})")
        changes[key] = _knob_value(mode, key, value, known[key].type)
    return replace(MODES[name], name=str(mode), **changes)


def check_model(mode: FastMode, model) -> None:
    """A mode with canvases shorter than the model's needs a model trained on such canvases: its
    config.json lists them under `trained_canvas_lengths` (written by `mlx_diffgemma.train`). On a
    model trained on whole canvases only they cost most of the quality (docs/fast_path.md)."""
    C = model.config.canvas_length
    rows = mode.block_length(C)
    if rows == C:
        return
    trained = (getattr(model.config, "raw", None) or {}).get("trained_canvas_lengths")
    if trained and rows >= min(trained):
        return
    known = (f"was trained on canvases of {', '.join(map(str, sorted(trained)))} rows" if trained else
             f"lists no trained_canvas_lengths in config.json, so only its whole {C}-row canvases are known to work")
    raise ValueError(
        f"mode {mode.name!r} denoises {rows}-row canvases, but this model {known}; use 'settled', "
        "or a model trained with short canvases (data.canvas_lengths, training/sort_blocks.yaml)"
    )


def _knob_value(mode, key: str, value: str, annotation: str):
    if value.lower() == "none" and "None" in str(annotation):
        return None
    try:
        if str(annotation).startswith("bool"):
            if value not in ("0", "1"):
                raise ValueError
            return value == "1"
        return float(value) if str(annotation).startswith("float") else int(value)
    except ValueError:
        raise ValueError(f"mode {mode!r}: {key}={value!r} is not a valid {annotation}") from None


def _bucket(n: int, smallest: int, C: int, multiple: int | None = None) -> int:
    if multiple:
        return min(C, max(smallest, -(-n // multiple) * multiple))
    b = smallest
    while b < n:
        b *= 2
    return min(b, C)


@dataclass
class FastResult:
    argmax: np.ndarray  # [1, C] what to commit
    steps: int
    row_passes: int  # canvas rows run through the trunk, summed over steps


def denoise_canvas_fast(
    model,
    cache,
    gen: GenerationConfig,
    noise: NoiseSource,
    block: int,
    mode: FastMode,
    on_step=None,
    canvas_length: int | None = None,
    prefix: np.ndarray | None = None,
) -> FastResult:
    """One canvas under `mode` (batch size 1). The first pass also encodes `prefix` [1, P]
    (committed tokens not yet in the cache): the canvas starts after it."""
    C = canvas_length or model.config.canvas_length
    if mode.scale_stop and C < model.config.canvas_length:
        # the reference stops when the mean entropy over its whole canvas is under the threshold:
        # on a short answer the EOS tail's near-zero rows dilute that mean; a shorter canvas has
        # less tail, so it keeps the same summed entropy instead of the same mean
        scale = model.config.canvas_length / C
        gen = gen.override(confidence_threshold=gen.confidence_threshold * scale)
    canvas = noise.initial_canvas(block, (1, C))
    state = BlockSampler(gen, noise, block, canvas)
    eos = np.asarray(gen.eos_token_id)

    frozen = np.zeros(C, dtype=bool)
    entropy = np.zeros((1, C), dtype=np.float32)
    argmax = canvas.copy()
    sample = canvas.copy()
    soft = None  # [1, C, H] self-conditioning input, None on the first step
    kv = None  # per layer (k, v) [1, kv_heads, C, D] of every canvas row, as last computed
    previous = None  # last step's argmax, for the prefix-stable exit
    row_passes = 0
    end = C  # with drop_tail, rows from here on have left the canvas: no trunk, head or attention

    while not state.exhausted:
        active = np.flatnonzero(~frozen[:end])
        refresh = mode.refresh_every and state.steps % mode.refresh_every == 0
        if mode.compact and kv is not None and not refresh:
            n = _bucket(len(active), mode.min_bucket, end, mode.bucket_multiple)
            # pad with frozen rows up to a bucket size so shapes repeat (their K/V get refreshed)
            rows = np.sort(np.concatenate([active, np.flatnonzero(frozen[:end])[: n - len(active)]]))
        else:
            rows = np.arange(end)
        row_passes += len(rows)

        rows_mx = mx.array(rows)
        x = mx.array(state.canvas[:, rows])
        soft_rows = None if soft is None else soft[:, rows_mx]
        if mode.compact:
            if kv is not None and kv[0][0].shape[2] > end:  # rows past `end` have left the canvas
                kv = [(k[:, :, :end], v[:, :, :end]) for k, v in kv]
            # kv: every canvas row's K/V as last computed; this pass refreshes its rows' and returns it
            h, kv = model.denoise_hidden(x, cache, soft_rows, rows=rows_mx, canvas_kv=kv, collect_kv=True,
                                         prefix=prefix)
        else:
            h = model.denoise_hidden(x, cache, soft_rows, prefix=prefix)
        prefix = None  # in the cache from here on

        # the head and the sampler only for rows that are still active (with rescore_frozen, also for
        # frozen rows the trunk just ran: their entropy and self-conditioning stay current)
        full_pass = len(rows) == end
        scored = rows if mode.rescore_frozen or (mode.thaw and full_pass) else active
        pos_in_rows = np.searchsorted(rows, scored)
        h_scored = h[:, mx.array(pos_in_rows)]
        T = state.temperature()
        u = mx.array(state.uniforms()[:, scored])
        if mode.top_k:
            # fused epilogue on the raw head output: no fp32 [rows, vocab] temporaries
            raw = model.embed_tokens.as_linear(h_scored)[0]
            am, ent, _, smp, top_ids, top_vals = lm_head_epilogue(
                raw, model.config.final_logit_softcapping, T, u[0], mode.top_k
            )
            am, ent, smp = am[None], ent[None], smp[None]
            top_p = mx.softmax(top_vals, axis=-1)  # renormalised over the top-k
            emb = model.embed_tokens(top_ids)  # [A, k, H]
            new_soft = ((top_p.astype(emb.dtype)[..., None] * emb).sum(axis=-2) * model.embed_scale)[None]
        else:
            z, am, ent, smp = head_statistics(model.logits(h_scored), T, u)
            new_soft = model.soft_embeds(z)
        if soft is None:  # the first step runs and scores every row, in order
            soft = new_soft
        else:
            soft = mx.put_along_axis(soft, mx.array(scored)[None, :, None], new_soft, axis=1)
        to_eval = [am, ent, smp, soft] + ([a for pair in kv for a in pair] if kv is not None else [])
        mx.eval(*to_eval)

        am, ent = np.array(am), np.array(ent)
        if mode.thaw and full_pass:
            # a frozen position whose fresh argmax differs, or whose entropy is back over the freeze
            # threshold, was frozen too early (the rows around it have changed since): it denoises again
            doubt = frozen[scored] & ((am[0] != argmax[0, scored]) | (ent[0] >= mode.freeze_entropy))
            frozen[scored[doubt]] = False
        live = ~frozen[scored]  # a frozen row keeps its token; only its entropy is refreshed
        argmax[:, scored[live]] = am[:, live]
        entropy[:, scored] = ent
        sample[:, scored[live]] = np.array(smp)[:, live]
        sample[:, frozen] = argmax[:, frozen]
        # a frozen position can no longer change: in the stop test it counts as settled, where its
        # entropy from the step that froze it (up to freeze_entropy, 10x the reference's confidence
        # threshold) would hold the mean above the threshold long after the canvas is done
        settled = np.where(frozen, np.float32(0), entropy)
        result = state.step(argmax.copy(), sample, settled if mode.settle_frozen else entropy, stop_entropy=settled)
        if mode.freeze_entropy is not None:
            newly = (entropy[0] < mode.freeze_entropy) & ~frozen
            if not mode.freeze_unaccepted:
                newly &= result.accepted[0]
            frozen |= newly
            if mode.target_steps:
                _freeze_on_schedule(frozen, entropy[0], mode.target_steps - state.steps)
            if mode.eos_tail_cut:
                hits = np.flatnonzero(frozen[:end] & np.isin(argmax[0, :end], eos))
                if len(hits):
                    frozen[hits[0] + 1 :] = True  # after a settled EOS everything becomes pad
                    if mode.drop_tail is not None:
                        end = min(end, hits[0] + 1 + mode.drop_tail)
        state.canvas[:, frozen] = argmax[:, frozen]  # frozen rows are never re-noised

        if on_step is not None:
            on_step(state.steps - 1, replace(result, canvas=state.canvas.copy()))
        done = result.done or frozen.all() or (mode.max_steps is not None and state.steps >= mode.max_steps)
        if mode.prefix_exit and not done:
            done = _prefix_settled(argmax[0], previous, entropy[0], eos, gen)
        previous = argmax[0].copy()
        if done:
            break
    return FastResult(argmax, state.steps, row_passes)


def _freeze_on_schedule(frozen: np.ndarray, entropy: np.ndarray, steps_left: int) -> None:
    """Freeze the lowest-entropy active positions so that every position is frozen after
    `steps_left` more steps: ceil(active / (steps_left + 1)) of them now."""
    active = np.flatnonzero(~frozen)
    if not len(active):
        return
    k = len(active) if steps_left <= 0 else -(-len(active) // (steps_left + 1))
    frozen[active[np.argsort(entropy[active], kind="stable")[:k]]] = True


def _prefix_settled(argmax, previous, entropy, eos, gen: GenerationConfig) -> bool:
    """Stable (same argmax as the previous step) and confident on the prefix up to and including
    the first EOS; the tail after it will be padded anyway."""
    hits = np.flatnonzero(np.isin(argmax, eos))
    if previous is None or not len(hits):
        return False
    end = hits[0] + 1
    return bool((previous[:end] == argmax[:end]).all() and entropy[:end].mean() < gen.confidence_threshold)
