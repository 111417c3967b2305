"""The block loop's array operations on torch (`model.ops`), including the sampler's head statistics.

`head_statistics` has exactly the semantics of `mlx_diffgemma/kernels/reference.py`: temperature
scaling, entropy in nats of softmax(z), argmax, and an inverse-CDF sample driven by the shared
uniforms. It walks the rows in chunks, so beyond the temperature-scaled logits it must return, only
small [chunk, V] temporaries exist (never another [C, V] fp32 tensor).
"""

from __future__ import annotations

import numpy as np
import torch

# rows of [.., V] processed at once by head_statistics (64 x 262144 x 4 B = 64 MiB per temporary)
HEAD_CHUNK_ROWS = 64


def head_statistics(logits: torch.Tensor, temperature, uniforms: torch.Tensor, chunk_rows: int = HEAD_CHUNK_ROWS):
    """logits [B, C, V] fp32 (soft-capped), temperature a scalar, uniforms [B, C] in [0, 1).

    Returns (z, argmax, entropy, sample): the temperature-scaled logits (the next step's
    self-conditioning input), their argmax, their entropy in nats, and an inverse-CDF sample of
    softmax(z) driven by `uniforms` (same distribution as a multinomial draw)."""
    t = torch.tensor(float(np.float32(temperature)), dtype=torch.float32, device=logits.device)
    z = logits.float() / t
    *lead, V = z.shape
    rows = z.reshape(-1, V)
    u = uniforms.to(device=z.device, dtype=torch.float32).reshape(-1)
    n = rows.shape[0]
    entropy = torch.empty(n, dtype=torch.float32, device=z.device)
    sample = torch.empty(n, dtype=torch.int64, device=z.device)
    for a in range(0, n, chunk_rows):
        zc = rows[a : a + chunk_rows]
        logp = zc - torch.logsumexp(zc, dim=-1, keepdim=True)
        p = logp.exp()
        entropy[a : a + chunk_rows] = -(p * logp).sum(dim=-1)
        del logp
        cdf = p.cumsum_(dim=-1)
        # scale u by the total so fp32 round-off in the cumsum cannot push past the last token
        target = u[a : a + chunk_rows] * cdf[:, -1]
        sample[a : a + chunk_rows] = (cdf <= target[:, None]).sum(dim=-1).clamp_(max=V - 1)
    argmax = z.argmax(dim=-1)
    return z, argmax, entropy.reshape(lead), sample.reshape(lead).to(torch.int32)


class TorchOps:
    """What `mlx_diffgemma.generate`'s block loop needs from a backend, on one torch device."""

    head_statistics = staticmethod(head_statistics)

    def __init__(self, device: torch.device):
        self.device = torch.device(device)

    def asarray(self, x) -> torch.Tensor:
        """numpy arrays, lists and scalars to a tensor on the model's device (ints stay int64)."""
        if isinstance(x, torch.Tensor):
            return x.to(self.device)
        return torch.as_tensor(np.asarray(x), device=self.device)

    @staticmethod
    def cast(x: torch.Tensor, dtype) -> torch.Tensor:
        return x.to(dtype)

    @staticmethod
    def to_numpy(x: torch.Tensor) -> np.ndarray:
        return x.detach().cpu().numpy()

    def sync(self, *arrays) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def reset_peak_memory(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)

    def peak_memory(self) -> int:
        """Peak allocated device memory in bytes (CUDA); 0 on the CPU, where torch does not track it."""
        if self.device.type == "cuda":
            return int(torch.cuda.max_memory_allocated(self.device))
        return 0
