"""Rotary embedding in PyTorch ops: the kernel's test oracle and the path off CUDA (float64, CPU)."""
from __future__ import annotations

import torch


def rope_reference(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate interleaved pairs (x0, x1), (x2, x3), ... of x (B, T, H, D) by the angles of each position;
    cos and sin are (T, D/2), the same for every head.

    (x0, x1) -> (x0 cos - x1 sin, x1 cos + x0 sin), written as x * (cos, cos) + swap(x) * (-sin, sin) so that
    every op runs on contiguous tensors (the strided x[..., 0::2] form costs twice the kernels, unvectorized)."""
    pairs = x.unflatten(-1, (-1, 2))
    cos, sin = cos.to(x.dtype)[:, None, :, None], sin.to(x.dtype)[:, None, :, None]  # (T, 1, D/2, 1)
    cos2, sin2 = torch.cat((cos, cos), -1), torch.cat((-sin, sin), -1)
    return (pairs * cos2 + pairs.flip(-1) * sin2).flatten(-2)
