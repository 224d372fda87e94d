"""The clip's scale of the inner SGD step in PyTorch ops: the PyTorch path of ttt/inner.py, and what the kernel of
function.clipped_scale computes in one launch (its test's oracle)."""
from __future__ import annotations

import torch


def clip_scale(sq: torch.Tensor, eta, max_norm: float) -> tuple[torch.Tensor, torch.Tensor]:
    """scale = -eta min(1, max_norm / ||g||) from the squared norms sq (B,), and d scale / d sq (the kernels'
    backward; PyTorch's autograd differentiates scale itself). eta: a float or a 0-d tensor. max_norm <= 0: no
    clip."""
    if max_norm <= 0:
        return torch.zeros_like(sq) - eta, torch.zeros_like(sq)
    # + tiny: at an all-zero gradient (an all-masked mini-batch) sqrt's derivative is finite (0 through the clamp
    # below) instead of 0 * inf; below any sum of squares that rounding would not already absorb
    norm = (sq + torch.finfo(sq.dtype).tiny).sqrt()
    scale = -eta * (max_norm / norm.clamp(min=max_norm))  # 1 below the threshold (a where() would give NaN grads)
    # where the clip acts (clamp passes its gradient at equality, as torch's does)
    coef = torch.where(norm >= max_norm, eta * max_norm / (2 * norm.detach() ** 3), 0.0)
    return scale, coef
