"""Calling transformers' reference model the way the parity tests need it."""

import torch


def hf_step(hf, cache, canvas, position, input_ids=None, self_cond=None):
    """Encode `input_ids` (if any) into `cache`, then one canvas pass at `position`: fp32 logits."""
    C = canvas.shape[1]
    with torch.no_grad():
        out = hf(
            input_ids=None if input_ids is None else torch.tensor(input_ids),
            decoder_input_ids=torch.tensor(canvas),
            cache=cache,
            self_conditioning_logits=None if self_cond is None else torch.tensor(self_cond),
            decoder_position_ids=torch.arange(position, position + C)[None],
        )
    return out.logits.numpy()
