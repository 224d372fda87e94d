"""The clip's scale of the inner SGD step in PyTorch ops: the PyTorch path of ttt/inner.py, and what the kernel of
function.clipped_scale computes in one launch (its test's oracle)."""
from __future__ import annotations

import torch


def clip_scale(sq: torch.Tensor, eta, max_norm: float) -> torch.Tensor:
    """scale = -eta min(1, max_norm / ||g||) from the squared norms sq (B,), differentiable (autograd gives
    d scale / d sq, which the kernel writes itself). eta: a float or a 0-d tensor. max_norm <= 0: no clip."""
    if max_norm <= 0:
        return torch.zeros_like(sq) - eta
    # + tiny: at an all-zero gradient (an all-masked mini-batch) sqrt's derivative is finite (0 through the clamp
    # below) instead of 0 * inf; below any sum of squares that rounding would not already absorb
    norm = (sq + torch.finfo(sq.dtype).tiny).sqrt()
    return -eta * (max_norm / norm.clamp(min=max_norm))  # 1 below the threshold (a where() would give NaN grads)
