"""The block-autoregressive loop: encode, denoise a canvas until it stops, commit, repeat.

Also the command line: `python -m mlx_diffgemma.generate --model PATH --prompt TEXT`.
"""

from __future__ import annotations

import atexit
import math
import queue
import sys
import threading
import time
from dataclasses import dataclass, field
from typing import Callable, Iterator

import mlx.core as mx
import numpy as np

from .config import GenerationConfig
from .fast import check_model, denoise_canvas_fast, get_mode
from .kernels import head_statistics
from .sampler import BlockSampler, NoiseSource, finalize_block
from .tokenizer import Delta


class MLXOps:
    """The few array operations the loop needs, so another backend can supply its own
    (a model may carry an `ops` attribute; MLX models use this one)."""

    asarray = staticmethod(mx.array)
    head_statistics = staticmethod(head_statistics)

    @staticmethod
    def cast(x, dtype):
        return x.astype(dtype)

    @staticmethod
    def to_numpy(x) -> np.ndarray:
        return np.array(x)

    @staticmethod
    def sync(*arrays) -> None:
        mx.eval(*arrays)

    @staticmethod
    def reset_peak_memory() -> None:
        mx.reset_peak_memory()

    @staticmethod
    def peak_memory() -> int:
        return int(mx.get_peak_memory())


def ops_for(model):
    return getattr(model, "ops", MLXOps)


@dataclass
class Stats:
    prompt_tokens: int = 0
    committed_tokens: int = 0  # generated tokens that are not pad
    canvases: int = 0
    denoise_steps: int = 0  # decoder passes
    row_passes: int = 0  # canvas rows run through the trunk (steps x canvas rows for the reference)
    steps_per_canvas: list[int] = field(default_factory=list)
    prefill_s: float = 0.0
    prefill_fused: bool = False  # the prompt rode along with the first denoising pass: no prefill rate,
    # and generate_s (committed_tokens_per_s) includes its encode
    generate_s: float = 0.0
    peak_memory_bytes: int = 0
    first_text_s: float | None = None  # request start to the first committed text

    @property
    def tokens_per_forward(self) -> float:
        return self.committed_tokens / max(self.denoise_steps, 1)

    @property
    def row_passes_per_token(self) -> float:
        return self.row_passes / max(self.committed_tokens, 1)

    @property
    def committed_tokens_per_s(self) -> float:
        return self.committed_tokens / self.generate_s if self.generate_s else 0.0

    @property
    def prefill_tokens_per_s(self) -> float:
        return self.prompt_tokens / self.prefill_s if self.prefill_s else 0.0

    @property
    def prefill_summary(self) -> str:
        """For a stats line: the prefill rate, or where the prompt was encoded."""
        if self.prefill_fused:
            return "prompt encoded with the first step"
        return f"prefill {self.prefill_tokens_per_s:.1f} tok/s"

    def as_dict(self) -> dict:
        return {
            "prompt_tokens": self.prompt_tokens,
            "committed_tokens": self.committed_tokens,
            "canvases": self.canvases,
            "denoise_steps": self.denoise_steps,
            "steps_per_canvas": list(self.steps_per_canvas),
            "tokens_per_forward": round(self.tokens_per_forward, 3),
            "row_passes_per_token": round(self.row_passes_per_token, 3),
            "committed_tokens_per_s": round(self.committed_tokens_per_s, 3),
            "prefill_tokens_per_s": round(self.prefill_tokens_per_s, 3),
            "prefill_s": round(self.prefill_s, 4),
            "prefill_fused": self.prefill_fused,
            "generate_s": round(self.generate_s, 4),
            "peak_memory_bytes": self.peak_memory_bytes,
            "first_text_s": None if self.first_text_s is None else round(self.first_text_s, 4),
        }


@dataclass
class Event:
    """What `stream_generate` yields, in this order per canvas: "step" (and "preview") while it
    denoises, then "text" per committed token, then "commit"; "done" once at the end.

    - "step": one denoising step: `block`, `step`, `canvas` (the current argmax [C]), `accepted`
      (positions accepted this step), `mean_entropy`.
    - "preview" (opt-in): the current canvas' stable prefix (argmax unchanged since the last step
      and accepted), decoded as provisional `text` / `reasoning` after everything committed;
      `tokens` is that prefix. Each preview replaces the previous one (it may shrink); a commit
      clears it.
    - "text": the text one committed token completes: `text` (answer), `reasoning` (thought
      channel), `tool_call` (raw tool-call text, markers kept); `tokens` = [that token].
    - "commit": a canvas was committed: `tokens` (pad removed), and its `text` / `reasoning` /
      `tool_call`, the sum of its "text" events. Print either "text" or "commit" events, not both.
    - "done": `text` (the whole answer), `reasoning`, `tool_calls` (each verbatim), `token_ids`
      (every generated id, pad included), `stats`, `finish_reason` ("stop", "tool_calls",
      "length" or "cancelled").
    """

    kind: str
    block: int = 0
    step: int = 0
    canvas: np.ndarray | None = None
    accepted: int = 0
    mean_entropy: float = 0.0
    tokens: list[int] = field(default_factory=list)
    text: str = ""
    reasoning: str = ""
    tool_call: str = ""
    tool_calls: list[str] = field(default_factory=list)
    token_ids: list[int] = field(default_factory=list)
    stats: Stats | None = None
    finish_reason: str = ""


class Cancelled(Exception):
    """Raised inside the denoising loop to stop a request; `stream_generate` turns it into a
    "done" event with finish_reason "cancelled"."""


_LOCKS_GUARD = threading.Lock()


def model_lock(model) -> threading.RLock:
    """One lock per loaded model: requests from several threads take turns on the device (each
    request has its own cache, so turns at canvas granularity keep every result exact)."""
    lock = getattr(model, "_dg_lock", None)
    if lock is None:
        with _LOCKS_GUARD:
            lock = getattr(model, "_dg_lock", None)
            if lock is None:
                lock = threading.RLock()
                object.__setattr__(model, "_dg_lock", lock)
    return lock


def context_length(model) -> int | None:
    """The model's context (max_position_embeddings), None when the config does not say."""
    raw = getattr(model.config, "raw", None) or {}
    text = raw.get("text_config", raw)
    n = text.get("max_position_embeddings") if isinstance(text, dict) else None
    return int(n) if n else None


def denoise_canvas(
    model,
    cache,
    gen: GenerationConfig,
    noise: NoiseSource,
    block: int,
    on_step: Callable | None = None,
    canvas: np.ndarray | None = None,
    prefix: np.ndarray | None = None,
) -> tuple[np.ndarray, int]:
    """Run the reference sampler on one canvas; returns (argmax [B, C], decoder passes). `prefix`
    [B, P]: committed tokens not yet in the cache, encoded by the first pass (model.denoise)."""
    ops = ops_for(model)
    C = model.config.canvas_length
    if canvas is None:
        canvas = noise.initial_canvas(block, (1, C))
    state = BlockSampler(gen, noise, block, canvas)
    self_cond = None
    while not state.exhausted:
        logits = model.denoise(ops.asarray(state.canvas), cache, self_cond,
                               prefix=None if prefix is None else ops.asarray(prefix))
        prefix = None
        z, argmax, entropy, sample = ops.head_statistics(logits, state.temperature(), ops.asarray(state.uniforms()))
        self_cond = ops.cast(z, model.dtype)  # the reference feeds back bf16 logits for bf16 weights
        ops.sync(argmax, entropy, sample, self_cond)
        result = state.step(ops.to_numpy(argmax), ops.to_numpy(sample), ops.to_numpy(entropy))
        if on_step is not None:
            on_step(state.steps - 1, result)
        if result.done:
            break
    return state.argmax, state.steps


def denoise_block(model, cache, gen: GenerationConfig, noise: NoiseSource, block: int, fast, remaining: int,
                  on_step: Callable | None = None, prefix: np.ndarray | None = None) -> tuple[np.ndarray, int, int]:
    """One canvas of the block loop under a mode (a FastMode): the reference sampler on a whole
    canvas, or the fast loop on the mode's canvas for `remaining` wanted tokens; its first pass also
    encodes `prefix` [1, P] (the prompt, or the last commit). Returns (argmax [1, rows], decoder
    passes, trunk row-passes)."""
    C = model.config.canvas_length
    if fast.is_reference:
        argmax, steps = denoise_canvas(model, cache, gen, noise, block, on_step=on_step, prefix=prefix)
        return argmax, steps, steps * C
    result = denoise_canvas_fast(model, cache, gen, noise, block, fast, on_step=on_step,
                                 canvas_length=fast.canvas_length(C, remaining), prefix=prefix)
    return result.argmax, result.steps, result.row_passes


def denoise_prompts(model, prompts: np.ndarray, seed: int = 0, on_step: Callable | None = None,
                    **overrides) -> np.ndarray:
    """One canvas per prompt for a batch of equal-length prompts [B, P]: encode them, then run the
    reference sampler until every row has stopped. Returns the argmax canvases [B, C] (rows stop
    independently; EOS handling is the caller's). `overrides` change the generation config."""
    ops = ops_for(model)
    C = model.config.canvas_length
    gen = model.generation_config.override(max_new_tokens=C, **overrides)
    noise = NoiseSource(seed, model.config.vocab_size)
    cache = model.make_cache()
    model.encode(ops.asarray(np.asarray(prompts)), cache)
    canvas = noise.initial_canvas(0, (len(prompts), C))
    argmax, _ = denoise_canvas(model, cache, gen, noise, 0, on_step=on_step, canvas=canvas)
    return np.asarray(argmax)


def stream_generate(
    model,
    tokenizer,
    prompt,
    max_tokens: int | None = None,
    seed: int = 0,
    thinking: bool = False,
    generation_config: GenerationConfig | None = None,
    cache=None,
    mode=None,
    *,
    tools=None,
    preview: bool = False,
    cancel=None,
    fuse_prompt: bool = True,
    **overrides,
) -> Iterator[Event]:
    """Generate from `prompt` (text, a list of chat messages, or token ids), yielding `Event`s
    as they happen (steps live, text token by token as soon as its canvas is committed).

    `max_tokens` rounds up to whole canvases (fewer when the context runs out). Sampler knobs
    (`max_denoising_steps`, `entropy_bound`, `t_min`, `t_max`, `stability_threshold`,
    `confidence_threshold`) override the checkpoint's generation_config. Pass `cache` (from
    `model.make_cache()`) to continue a conversation: only the new tokens are encoded. `mode`
    picks a fast denoising mode by name (see `mlx_diffgemma.fast.MODES`; default "reference", the
    exact reference sampler). `tools` go to the chat template. `preview=True` adds "preview"
    events. `cancel` (a `threading.Event`, or a callable returning True) stops the request at the
    next denoising step, from any thread; closing the iterator does the same. A prompt no longer
    than a canvas is encoded by the first denoising pass; `fuse_prompt=False` gives it a pass of its
    own, timed as the prefill (stats.prefill_tokens_per_s), as longer prompts always get.

    Safe to call from any thread: the work runs on a worker thread of its own and takes the
    model's lock (`model_lock`) around device work, so concurrent requests take turns.
    """
    events: queue.SimpleQueue = queue.SimpleQueue()
    stop, finished = threading.Event(), threading.Event()

    def stopped() -> bool:
        if stop.is_set() or cancel is None:
            return stop.is_set()
        is_set = getattr(cancel, "is_set", None)
        return bool(is_set() if is_set is not None else cancel())

    # MLX streams are per thread: a lazy array made here cannot be evaluated on the engine thread
    settle(model)
    if cache is not None:
        ops_for(model).sync(*cache.state())
    args = (model, tokenizer, prompt, max_tokens, seed, thinking, generation_config, cache, mode, tools, preview,
            fuse_prompt)

    def job():
        try:
            _generate(events.put, stopped, *args, overrides)
        except BaseException as e:  # handed to the caller's thread, raised there
            events.put(_Failure(e))
        finally:
            events.put(_END)
            finished.set()

    ENGINE.submit(job)
    try:
        while True:
            item = events.get()
            if item is _END:
                break
            if isinstance(item, _Failure):
                raise item.error
            yield item
    finally:
        stop.set()  # the consumer left early: the job stops at its next step
        finished.wait()


class _Engine:
    """The one thread that runs every request's device work, in turn (FIFO).

    One long-lived thread, not one per request: each new thread that touches MLX gets streams
    of its own that are never freed (threads and memory creep up over requests, and the process
    can abort at exit), and the caller's thread may be a UI's or a server's. Stopped at exit."""

    def __init__(self):
        self.jobs: queue.SimpleQueue = queue.SimpleQueue()
        self.thread: threading.Thread | None = None
        self.guard = threading.Lock()

    def submit(self, job) -> None:
        if threading.current_thread() is self.thread:
            job()  # a request made from inside a job runs inline
            return
        with self.guard:
            if self.thread is None or not self.thread.is_alive():
                self.thread = threading.Thread(target=self._loop, name="mlx_diffgemma.engine", daemon=True)
                self.thread.start()
            self.jobs.put(job)

    def _loop(self) -> None:
        try:
            while (job := self.jobs.get()) is not None:
                job()
        finally:
            mx.synchronize()
            mx.clear_streams()  # this thread's streams: left alive, they abort the process at exit

    def stop(self) -> None:
        with self.guard:
            if self.thread is not None and self.thread.is_alive():
                self.jobs.put(None)
                self.thread.join()
            self.thread = None


ENGINE = _Engine()
atexit.register(ENGINE.stop)


_END = object()


def settle(model) -> None:
    """Evaluate every array an MLX model holds, parameters or not (e.g. RoPE frequencies built
    lazily at construction), so another thread can use it: MLX streams are per thread, and a
    lazy array recorded on one thread's stream fails to evaluate on another
    ("There is no Stream(cpu, 0) in current thread")."""
    import mlx.nn as nn

    if not isinstance(model, nn.Module):
        return
    found, seen = [], set()

    def walk(x, depth):
        if depth > 12 or id(x) in seen:
            return
        seen.add(id(x))
        if isinstance(x, mx.array):
            found.append(x)
        elif isinstance(x, dict):
            for v in x.values():
                walk(v, depth + 1)
        elif isinstance(x, (list, tuple)):
            for v in x:
                walk(v, depth + 1)
        if hasattr(x, "__dict__") and not isinstance(x, type):
            for v in vars(x).values():
                walk(v, depth + 1)

    walk(model, 0)
    mx.eval(found)


@dataclass
class _Failure:
    error: BaseException


def _generate(emit, stopped, model, tokenizer, prompt, max_tokens, seed, thinking, generation_config, cache,
              mode, tools, preview, fuse_prompt, overrides) -> None:
    """The block loop; every event goes through `emit`."""
    from .tokenizer import TextStream, chat_ids

    start = time.perf_counter()
    gen = (generation_config or model.generation_config).override(max_new_tokens=max_tokens, **overrides)
    if isinstance(prompt, (list, tuple)) and prompt and isinstance(prompt[0], (int, np.integer)):
        ids = [int(i) for i in prompt]
    else:
        ids = chat_ids(tokenizer, prompt, thinking=thinking, tools=tools)
    if not ids:
        raise ValueError("the prompt is empty")

    fast = get_mode(mode)
    check_model(fast, model)
    ops = ops_for(model)
    if not fast.is_reference and ops is not MLXOps:
        raise ValueError(f"mode {fast.name!r}: the fast modes run on the MLX backend only; leave the mode out "
                         "(the reference sampler) or load the model with MLX")
    C = fast.block_length(model.config.canvas_length)  # rows per canvas
    noise = NoiseSource(seed, model.config.vocab_size)
    cache = model.make_cache() if cache is None else cache
    blocks = math.ceil(gen.max_new_tokens / C)
    context = context_length(model)
    if context is not None:
        used = cache.offset + len(ids)
        held = f" (+ {cache.offset} already in the cache)" if cache.offset else ""
        if used + C > context:
            raise ValueError(
                f"the prompt is {len(ids)} tokens{held}, too long for the model's context of {context} tokens "
                f"with room for one {C}-token canvas; shorten the prompt" + (" or start a new conversation" if held else "")
            )
        blocks = min(blocks, (context - used) // C)
    stats = Stats(prompt_tokens=len(ids))
    lock = model_lock(model)

    # a prompt no longer than a canvas is encoded by the first denoising pass (one trunk pass, not
    # two); a longer one gets a pass of its own, which also reports its prefill rate
    pending = np.asarray([ids]) if fuse_prompt and len(ids) <= model.config.canvas_length else None
    start_offset = cache.offset
    stats.prefill_fused = pending is not None
    with lock:
        ops.reset_peak_memory()
        if pending is None:
            tic = time.perf_counter()
            model.encode(ops.asarray([ids]), cache)
            ops.sync(*cache.state())
            stats.prefill_s = time.perf_counter() - tic

    text = TextStream(tokenizer)
    generated: list[int] = []
    committed = None
    finish = "length"
    tic = time.perf_counter()
    for block in range(blocks):
        if stopped():
            finish = "cancelled"
            break
        last: dict = {"argmax": None, "preview": []}  # a commit clears the preview

        def on_step(step, result):
            if stopped():
                raise Cancelled
            argmax = result.argmax[0]
            emit(Event("step", block=block, step=step, canvas=argmax.copy(), accepted=int(result.accepted[0].sum()),
                       mean_entropy=float(result.mean_entropy[0])))
            if preview:
                tokens = _stable_prefix(argmax, last["argmax"], result.accepted[0], gen)
                if tokens != last["preview"]:
                    last["preview"] = tokens
                    draft = text.copy()
                    for t in tokens:
                        draft.add(t)
                    draft.finish()
                    emit(Event("preview", block=block, step=step, tokens=tokens,
                               text=draft.parsed.content[len(text.parsed.content):],
                               reasoning=draft.parsed.reasoning[len(text.parsed.reasoning):]))
            last["argmax"] = argmax.copy()

        try:
            with lock:
                if block > 0:
                    pending = committed  # re-encoded at the same positions, by the next canvas' first pass
                argmax, steps, row_passes = denoise_block(model, cache, gen, noise, block, fast,
                                                          gen.max_new_tokens - len(generated), on_step, pending)
                pending = None
        except Cancelled:
            finish = "cancelled"
            break
        stats.row_passes += row_passes
        committed, finished = finalize_block(argmax, gen)
        stats.canvases += 1
        stats.denoise_steps += steps
        stats.steps_per_canvas.append(steps)
        new = [int(t) for t in committed[0] if t != gen.pad_token_id]
        generated.extend(int(t) for t in committed[0])
        stats.committed_tokens += len(new)
        end = bool(finished.all()) or block == blocks - 1
        delta = Delta()
        for t in new:
            d = text.add(t)
            if d:
                emit(_text_event(block, [t], d, stats, start))
                delta += d
        if end:
            d = text.finish()
            if d:
                emit(_text_event(block, [], d, stats, start))
                delta += d
        emit(Event("commit", block=block, tokens=new, text=delta.content, reasoning=delta.reasoning,
                   tool_call=delta.tool_call))
        if finished.all():
            finish = "stop"
            break
    if stats.prefill_fused and cache.offset == start_offset:  # no canvas ran: the prompt still goes in
        with lock:
            model.encode(ops.asarray([ids]), cache)
    ops.sync(*cache.state())  # nothing lazy left for the next request's thread
    d = text.finish()  # after a cancel: text held back mid-character, if any
    if d:
        emit(_text_event(stats.canvases, [], d, stats, start))
    parsed = text.parsed
    if finish == "stop" and parsed.tool_calls:
        finish = "tool_calls"
    stats.generate_s = time.perf_counter() - tic
    stats.peak_memory_bytes = ops.peak_memory()
    emit(Event("done", token_ids=generated, stats=stats, text=parsed.content, reasoning=parsed.reasoning,
               tool_calls=list(parsed.tool_calls), finish_reason=finish))


def _text_event(block, tokens, delta, stats: Stats, start: float) -> Event:
    if stats.first_text_s is None:
        stats.first_text_s = time.perf_counter() - start
    return Event("text", block=block, tokens=tokens, text=delta.content, reasoning=delta.reasoning,
                 tool_call=delta.tool_call)


def _stable_prefix(argmax: np.ndarray, previous, accepted: np.ndarray, gen: GenerationConfig) -> list[int]:
    """The canvas' leading tokens whose argmax held since the last step and that were accepted
    (low entropy), cut after the first EOS, pad dropped."""
    if previous is None:
        return []
    stable = (argmax == previous) & accepted
    n = len(stable) if stable.all() else int(np.argmin(stable))
    tokens = [int(t) for t in argmax[:n]]
    eos = set(np.atleast_1d(gen.eos_token_id).tolist())
    for i, t in enumerate(tokens):
        if t in eos:
            return tokens[: i + 1]
    return [t for t in tokens if t != gen.pad_token_id]


def generate(model, tokenizer, prompt, verbose: bool = False, **kwargs) -> str:
    """The answer's visible text. kwargs as for `stream_generate`."""
    text = ""
    for event in stream_generate(model, tokenizer, prompt, **kwargs):
        if event.kind == "commit" and verbose:
            print(event.text, end="", flush=True)
        if event.kind == "done":
            text = event.text
            if verbose:
                s = event.stats
                print(
                    f"\n[{s.committed_tokens} tokens, {s.denoise_steps} steps, "
                    f"{s.committed_tokens_per_s:.1f} tok/s, {s.prefill_summary}]",
                    file=sys.stderr,
                )
    return text


def main(argv=None):
    from .cli import generate_cli

    return generate_cli(argv)


if __name__ == "__main__":
    sys.exit(main())
