"""Token-identical generation against transformers' `generate`, with the random draws shared.

Only the source of randomness is patched in the reference (same distributions): the canvas and
re-noise draws of `EntropyBoundSampler.initialize_canvas`, and `torch.multinomial` becomes an
inverse-CDF draw from our noise source's uniforms. The algorithm itself runs untouched.
"""

import contextlib

import pytest
import torch
from transformers import DiffusionGemmaForBlockDiffusion
from transformers.models.diffusion_gemma import generation_diffusion_gemma as hf_gen

from mlx_diffgemma import load, stream_generate
from mlx_diffgemma.sampler import NoiseSource


@contextlib.contextmanager
def shared_draws(noise: NoiseSource):
    """Route transformers' draws through `noise`, addressed by (block, step) as our sampler does."""
    state = {"block": -1, "step": 0, "sampled": False}
    original_multinomial = torch.multinomial

    def initialize_canvas(self, batch_size, device):
        shape = (batch_size, self.canvas_length)
        if state["sampled"]:  # called by renoise_canvas, after this step's multinomial
            ids = noise.renoise(state["block"], state["step"], shape)
            state["step"] += 1
            state["sampled"] = False
        else:  # the first canvas of a block
            state["block"] += 1
            state["step"] = 0
            ids = noise.initial_canvas(state["block"], shape)
        return torch.from_numpy(ids).to(device)

    def multinomial(probs, num_samples, **kw):
        assert num_samples == 1
        B = probs.shape[0]
        u = torch.from_numpy(noise.uniforms(state["block"], state["step"], (1, B))).reshape(B, 1)
        cdf = probs.cumsum(-1)
        target = u * cdf[:, -1:]
        state["sampled"] = True
        return (cdf <= target).sum(-1, keepdim=True).clamp(max=probs.shape[-1] - 1)

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(hf_gen.EntropyBoundSampler, "initialize_canvas", initialize_canvas)
        mp.setattr(torch, "multinomial", multinomial)
        yield state
    assert torch.multinomial is original_multinomial


def reference_generate(path, prompt_ids, seed, **gen_kwargs):
    hf = DiffusionGemmaForBlockDiffusion.from_pretrained(path, dtype=torch.float32).eval()
    noise = NoiseSource(seed, hf.config.text_config.vocab_size)
    with shared_draws(noise):
        out = hf.generate(torch.tensor([prompt_ids]), **gen_kwargs)
    return out.sequences[0, len(prompt_ids):].tolist(), float(out.tokens_per_forward[0])


def ours(model, tokenizer, prompt_ids, seed, **kw):
    events = list(stream_generate(model, tokenizer, prompt_ids, seed=seed, **kw))
    done = events[-1]
    assert done.kind == "done"
    return done, events


SETTINGS = [
    # fixed length, no early stop: 3 canvases, the whole temperature schedule of 12 steps
    dict(max_new_tokens=24, max_denoising_steps=12, confidence_threshold=1e-9),
    # stable-and-confident stop, stability over the last step (some canvases stop, some run to 48)
    dict(max_new_tokens=40, max_denoising_steps=48, stability_threshold=1, confidence_threshold=2.0),
    # confidence-only stop
    dict(max_new_tokens=32, max_denoising_steps=20, stability_threshold=0, confidence_threshold=0.3),
]


@pytest.mark.parametrize("settings", SETTINGS, ids=["fixed-steps", "stable-and-confident", "confident"])
def test_token_identical_to_transformers(sharp_checkpoint, settings):
    path, _ = sharp_checkpoint
    model, tokenizer = load(path)
    prompt = [2, 4, 40, 41, 42, 43, 5, 4, 44]
    kw = dict(settings, eos_token_id=[10**6])  # no EOS here: every canvas is generated
    ref_tokens, ref_tpf = reference_generate(path, prompt, seed=11, **kw)

    max_tokens = kw.pop("max_new_tokens")
    done, events = ours(model, tokenizer, prompt, seed=11, max_tokens=max_tokens, **kw)
    assert done.token_ids == ref_tokens
    assert done.stats.canvases == len(ref_tokens) // model.config.canvas_length >= 3
    assert done.stats.tokens_per_forward == pytest.approx(ref_tpf, rel=1e-6)
    steps = done.stats.steps_per_canvas
    if settings["confidence_threshold"] > 1e-6:
        assert min(steps) < settings["max_denoising_steps"], "no canvas stopped early"
    else:
        assert steps == [settings["max_denoising_steps"]] * len(steps)
    assert sum(e.kind == "step" for e in events) == sum(steps)


def test_eos_pads_and_stops_like_transformers(sharp_checkpoint):
    path, _ = sharp_checkpoint
    model, tokenizer = load(path)
    prompt = [2, 4, 50, 51, 52, 5, 4, 44]
    base = dict(max_denoising_steps=10, confidence_threshold=1e-9)
    free, _ = ours(model, tokenizer, prompt, seed=5, max_tokens=32, eos_token_id=[10**6], **base)
    C = model.config.canvas_length
    # pick an EOS that first appears mid-way through the third canvas of the free run
    tokens = free.token_ids
    eos = next(t for i, t in enumerate(tokens[2 * C + 2 :], 2 * C + 2) if t not in tokens[:i])

    done, _ = ours(model, tokenizer, prompt, seed=5, max_tokens=64, eos_token_id=[eos], **base)
    ref_tokens, _ = reference_generate(path, prompt, seed=5, max_new_tokens=64, eos_token_id=[eos], **base)
    assert done.token_ids == ref_tokens
    assert done.stats.canvases == 3  # stopped at the canvas holding the EOS
    first = ref_tokens.index(eos)
    assert all(t == 0 for t in ref_tokens[first + 1 :])


def test_same_seed_same_tokens_different_seed_differs(sharp_checkpoint):
    path, _ = sharp_checkpoint
    model, tokenizer = load(path)
    kw = dict(max_tokens=16, max_denoising_steps=6, eos_token_id=[10**6])
    a, _ = ours(model, tokenizer, "Why is the sky blue?", seed=1, **kw)
    b, _ = ours(model, tokenizer, "Why is the sky blue?", seed=1, **kw)
    c, _ = ours(model, tokenizer, "Why is the sky blue?", seed=2, **kw)
    assert a.token_ids == b.token_ids
    assert a.token_ids != c.token_ids
