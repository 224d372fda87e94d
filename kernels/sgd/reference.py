"""The clipped SGD update in plain PyTorch autograd: what the kernels compute, for their tests."""
from __future__ import annotations

import torch


def clipped_sgd_reference(phi: list[torch.Tensor], g: list[torch.Tensor], eta, max_norm: float):
    """phi_i + scale g_i, scale = -eta min(1, max_norm / ||g||) per sequence (the norm over every tensor, optax's
    clip_by_global_norm; max_norm <= 0: no clip). phi_i, g_i: (B, ...). Returns ([phi_{t+1} in phi's dtype],
    [the same in g's dtype], the norm (B,), detached)."""
    sq = sum(x.flatten(1).float().square().sum(1) for x in g)
    norm = (sq + torch.finfo(sq.dtype).tiny).sqrt()
    scale = -eta * (max_norm / norm.clamp(min=max_norm) if max_norm > 0 else torch.ones_like(norm))
    nxt = [p + scale.view(-1, *[1] * (p.dim() - 1)).to(p.dtype) * x.to(p.dtype) for p, x in zip(phi, g)]
    return nxt, [p.to(x.dtype) for p, x in zip(nxt, g)], sq.detach().sqrt()
