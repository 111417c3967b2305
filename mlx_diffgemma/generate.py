"""The block-autoregressive loop: encode, denoise a canvas until it stops, commit, repeat.

Also the command line: `python -m mlx_diffgemma.generate --model PATH --prompt TEXT`.
"""

from __future__ import annotations

import math
import sys
import time
from dataclasses import dataclass, field
from typing import Callable, Iterator

import mlx.core as mx
import numpy as np

from .config import GenerationConfig
from .fast import denoise_canvas_fast, get_mode
from .kernels import head_statistics
from .sampler import BlockSampler, NoiseSource, finalize_block


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
    generate_s: float = 0.0
    peak_memory_bytes: int = 0

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
            "generate_s": round(self.generate_s, 4),
            "peak_memory_bytes": self.peak_memory_bytes,
        }


@dataclass
class Event:
    """What `stream_generate` yields.

    kind "step": one denoising step (`block`, `step`, `canvas` = the current argmax [C],
    `accepted` positions, `mean_entropy`). kind "commit": a canvas was committed (`tokens` with pad
    removed, `text` = the new visible text). kind "done": the end, with `stats` and `token_ids`.
    """

    kind: str
    block: int = 0
    step: int = 0
    canvas: np.ndarray | None = None
    accepted: int = 0
    mean_entropy: float = 0.0
    tokens: list[int] = field(default_factory=list)
    text: str = ""
    token_ids: list[int] = field(default_factory=list)
    stats: Stats | None = None


def denoise_canvas(
    model,
    cache,
    gen: GenerationConfig,
    noise: NoiseSource,
    block: int,
    on_step: Callable | None = None,
    canvas: np.ndarray | None = None,
) -> tuple[np.ndarray, int]:
    """Run the reference sampler on one canvas; returns (argmax [B, C], decoder passes)."""
    ops = ops_for(model)
    C = model.config.canvas_length
    if canvas is None:
        canvas = noise.initial_canvas(block, (1, C))
    state = BlockSampler(gen, noise, block, canvas)
    self_cond = None
    while not state.exhausted:
        logits = model.denoise(ops.asarray(state.canvas), cache, self_cond)
        z, argmax, entropy, sample = ops.head_statistics(logits, state.temperature(), ops.asarray(state.uniforms()))
        self_cond = ops.cast(z, model.dtype)  # the reference feeds back bf16 logits for bf16 weights
        ops.sync(argmax, entropy, sample, self_cond)
        result = state.step(ops.to_numpy(argmax), ops.to_numpy(sample), ops.to_numpy(entropy))
        if on_step is not None:
            on_step(state.steps - 1, result)
        if result.done:
            break
    return state.argmax, state.steps


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
    **overrides,
) -> Iterator[Event]:
    """Generate from `prompt` (text, a list of chat messages, or token ids), yielding events.

    `max_tokens` rounds up to whole canvases. Sampler knobs (`max_denoising_steps`,
    `entropy_bound`, `t_min`, `t_max`, `stability_threshold`, `confidence_threshold`) override the
    checkpoint's generation_config. Pass `cache` (from `model.make_cache()`) to continue a
    conversation: only the new tokens are encoded. `mode` picks a fast denoising mode by name
    (see `mlx_diffgemma.fast.MODES`; default "reference", the exact reference sampler).
    """
    from .tokenizer import chat_ids, visible_text

    gen = (generation_config or model.generation_config).override(max_new_tokens=max_tokens, **overrides)
    if isinstance(prompt, (list, tuple)) and prompt and isinstance(prompt[0], (int, np.integer)):
        ids = [int(i) for i in prompt]
    else:
        ids = chat_ids(tokenizer, prompt, thinking=thinking)
    if not ids:
        raise ValueError("the prompt is empty")

    fast = get_mode(mode)
    ops = ops_for(model)
    C = model.config.canvas_length
    noise = NoiseSource(seed, model.config.vocab_size)
    cache = model.make_cache() if cache is None else cache
    stats = Stats(prompt_tokens=len(ids))
    ops.reset_peak_memory()

    tic = time.perf_counter()
    model.encode(ops.asarray([ids]), cache)
    ops.sync(*cache.state())
    stats.prefill_s = time.perf_counter() - tic

    tic = time.perf_counter()
    generated: list[int] = []
    for block in range(math.ceil(gen.max_new_tokens / C)):
        if block > 0:
            model.encode(ops.asarray(committed), cache)  # re-encode the commit at the same positions

        steps_events: list[Event] = []

        def on_step(step, result):
            steps_events.append(
                Event(
                    "step",
                    block=block,
                    step=step,
                    canvas=result.argmax[0].copy(),
                    accepted=int(result.accepted[0].sum()),
                    mean_entropy=float(result.mean_entropy[0]),
                )
            )

        if fast.is_reference:
            argmax, steps = denoise_canvas(model, cache, gen, noise, block, on_step=on_step)
            row_passes = steps * C
        else:
            result = denoise_canvas_fast(model, cache, gen, noise, block, fast, on_step=on_step)
            argmax, steps, row_passes = result.argmax, result.steps, result.row_passes
        stats.row_passes += row_passes
        yield from steps_events
        committed, finished = finalize_block(argmax, gen)
        stats.canvases += 1
        stats.denoise_steps += steps
        stats.steps_per_canvas.append(steps)
        new = [int(t) for t in committed[0] if t != gen.pad_token_id]
        generated.extend(int(t) for t in committed[0])
        stats.committed_tokens += len(new)
        yield Event("commit", block=block, tokens=new, text=visible_text(tokenizer, new))
        if finished.all():
            break
    stats.generate_s = time.perf_counter() - tic
    stats.peak_memory_bytes = ops.peak_memory()
    yield Event("done", token_ids=generated, stats=stats, text=visible_text(tokenizer, generated))


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
                    f"{s.committed_tokens_per_s:.1f} tok/s, prefill {s.prefill_tokens_per_s:.1f} tok/s]",
                    file=sys.stderr,
                )
    return text


def main(argv=None):
    from .cli import generate_cli

    return generate_cli(argv)


if __name__ == "__main__":
    sys.exit(main())
