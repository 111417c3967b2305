"""The reference sampler (transformers' `DiffusionGemmaGenerationMixin.generate` with the
`EntropyBoundSampler`), on the host, in numpy.

Everything here sees only small per-position arrays ([B, C]: argmax, sample, entropy), never logits,
so the same code drives every backend. The vocabulary-wide work (temperature, softmax, entropy,
argmax, inverse-CDF sampling) is the backend's `head statistics`; see `kernels/`.

The noise source supplies every random draw from one seeded counter-based generator (Philox keyed
by the seed, counter = (block, step, stream)), so any backend given the same seed makes the same
draws, and draws can be addressed directly instead of replayed.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .config import GenerationConfig

_CANVAS, _RENOISE, _UNIFORM = 0, 1, 2


class NoiseSource:
    """Seeded draws: the initial canvas of each block, and per step the re-noise ids and one
    uniform per position for inverse-CDF sampling."""

    def __init__(self, seed: int, vocab_size: int):
        if seed < 0:
            raise ValueError(f"seed must be >= 0, got {seed}")
        self.seed, self.vocab_size = int(seed), int(vocab_size)

    def _rng(self, block: int, step: int, stream: int) -> np.random.Generator:
        return np.random.Generator(np.random.Philox(key=self.seed, counter=[block, step, stream, 0]))

    def initial_canvas(self, block: int, shape: tuple[int, int]) -> np.ndarray:
        return self._rng(block, 0, _CANVAS).integers(0, self.vocab_size, size=shape, dtype=np.int64)

    def renoise(self, block: int, step: int, shape: tuple[int, int]) -> np.ndarray:
        return self._rng(block, step, _RENOISE).integers(0, self.vocab_size, size=shape, dtype=np.int64)

    def uniforms(self, block: int, step: int, shape: tuple[int, int]) -> np.ndarray:
        return self._rng(block, step, _UNIFORM).random(size=shape, dtype=np.float32)


def temperature(gen: GenerationConfig, remaining: int) -> np.float32:
    """Linear schedule t_min + (t_max - t_min) * n/N for n = N..1, rounded as the reference (fp32)."""
    frac = np.float32(remaining) / np.float32(gen.max_denoising_steps)
    return np.float32(np.float32(gen.t_max - gen.t_min) * frac) + np.float32(gen.t_min)


def entropy_bound_accept(entropy: np.ndarray, bound: float) -> np.ndarray:
    """Accept the lowest-entropy positions while the entropy summed *before* each stays <= bound
    (EB-sampler, arXiv 2505.24857). entropy [B, C] -> bool [B, C]."""
    order = np.argsort(entropy, axis=-1, kind="stable")
    sorted_h = np.take_along_axis(entropy, order, axis=-1)
    keep_sorted = (np.cumsum(sorted_h, axis=-1, dtype=np.float32) - sorted_h) <= np.float32(bound)
    accepted = np.zeros_like(keep_sorted)
    np.put_along_axis(accepted, order, keep_sorted, axis=-1)
    return accepted


@dataclass
class StepResult:
    canvas: np.ndarray  # the next canvas (accepted samples, fresh noise elsewhere)
    argmax: np.ndarray  # the current best guess, committed when the block stops
    accepted: np.ndarray  # bool [B, C]
    mean_entropy: np.ndarray  # [B]
    done: bool  # every row has stopped


class BlockSampler:
    """One canvas' denoising state: the entropy-bound acceptance, re-noising and the
    stable-and-confident stop. Feed it `step()` once per decoder pass."""

    def __init__(self, gen: GenerationConfig, noise: NoiseSource, block: int, canvas: np.ndarray):
        self.gen, self.noise, self.block = gen, noise, block
        self.canvas = canvas
        self.argmax = canvas.copy()
        B, C = canvas.shape
        self.finished = np.zeros(B, dtype=bool)
        self.history = np.full((gen.stability_threshold, B, C), -1, dtype=np.int64)
        self.steps = 0

    @property
    def remaining(self) -> int:
        """The reference's step counter n, counting down from N to 1."""
        return self.gen.max_denoising_steps - self.steps

    @property
    def exhausted(self) -> bool:
        return self.steps >= self.gen.max_denoising_steps

    def temperature(self) -> np.float32:
        return temperature(self.gen, self.remaining)

    def uniforms(self) -> np.ndarray:
        return self.noise.uniforms(self.block, self.steps, self.canvas.shape)

    def step(self, argmax: np.ndarray, sample: np.ndarray, entropy: np.ndarray,
             stop_entropy: np.ndarray | None = None) -> StepResult:
        """argmax / sample [B, C] int, entropy [B, C] float32 of the temperature-scaled logits.
        `stop_entropy`, when given, replaces `entropy` in the stop test only (the fast modes pass
        zeros for positions that are frozen and so can no longer change)."""
        gen = self.gen
        accepted = entropy_bound_accept(entropy, gen.entropy_bound)
        noise = self.noise.renoise(self.block, self.steps, self.canvas.shape)
        new_canvas = np.where(accepted, sample, noise)
        argmax = argmax.astype(np.int64)

        # rows that stopped earlier keep their result (batched canvases only)
        frozen = self.finished[:, None]
        argmax = np.where(frozen, self.argmax, argmax)
        new_canvas = np.where(frozen, self.canvas, new_canvas)

        mean_h = (entropy if stop_entropy is None else stop_entropy).mean(axis=-1, dtype=np.float32)
        if gen.stability_threshold == 0:
            stable = np.ones(len(argmax), dtype=bool)
        else:
            stable = (self.history == argmax[None]).all(axis=-1).all(axis=0)
            self.history = np.roll(self.history, -1, axis=0)
            self.history[-1] = argmax
        confident = mean_h < np.float32(gen.confidence_threshold)
        self.finished |= stable & confident

        self.canvas, self.argmax = new_canvas, argmax
        self.steps += 1
        return StepResult(new_canvas, argmax, accepted, mean_h, bool(self.finished.all()))


def finalize_block(block: np.ndarray, gen: GenerationConfig) -> tuple[np.ndarray, np.ndarray]:
    """EOS handling after a commit: rows holding an EOS anywhere are finished, and every token after
    their first EOS becomes pad (the EOS itself is kept). Returns (block, finished [B])."""
    is_eos = np.isin(block, np.asarray(gen.eos_token_id))
    seen = np.cumsum(is_eos, axis=-1)
    after_first = (seen > 0) & ~((seen == 1) & is_eos)
    return np.where(after_first, gen.pad_token_id, block), is_eos.any(axis=-1)
