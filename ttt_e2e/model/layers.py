"""The small pieces of a block: RMSNorm, SwiGLU, rotary embeddings (METHOD.md section 1)."""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from ttt_e2e.kernels.rmsnorm import rms_norm


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))
        self.kernel = True  # the Triton kernels on CUDA tensors (Transformer.use_norm_kernels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Statistics in at least fp32 even under bf16 autocast; the result in the input's dtype. On a GPU one
        # kernel each for forward and backward (the meta step runs thousands of norms and their derivatives).
        return rms_norm(x, self.weight, self.eps, use_kernel=None if self.kernel else False)


def swiglu(x: torch.Tensor, w1: torch.Tensor, w2: torch.Tensor, w3: torch.Tensor) -> torch.Tensor:
    """w2( silu(w1 x) * (w3 x) ). Weights are (out, in) like nn.Linear, or carry a leading batch dimension
    (B, out, in) when each sequence has its own copy (the inner weights during TTT)."""
    if w1.dim() == 2:
        return F.linear(F.silu(F.linear(x, w1)) * F.linear(x, w3), w2)
    return _per_sequence_linear(F.silu(_per_sequence_linear(x, w1)) * _per_sequence_linear(x, w3), w2)


def _per_sequence_linear(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """x (B, T, in) @ w^T for w (B, out, in), computed as (w @ x^T)^T: then the gradient w.r.t. w comes out
    contiguous like w (x @ w^T gives it transposed), and the elementwise work on it and on w together (clip,
    SGD step, their derivatives) runs on matching layouts, vectorized, instead of strided."""
    return torch.matmul(w, x.mT).mT


class SwiGLU(nn.Module):
    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.w1 = nn.Parameter(torch.empty(hidden, dim))
        self.w2 = nn.Parameter(torch.empty(dim, hidden))
        self.w3 = nn.Parameter(torch.empty(hidden, dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return swiglu(x, self.w1, self.w2, self.w3)


def rope_angles(positions: torch.Tensor, head_dim: int, theta: float) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sin of shape (T, head_dim/2) for absolute positions (computed in fp64 then cast: positions reach
    millions, where fp32 angles lose digits)."""
    inv_freq = theta ** (-torch.arange(0, head_dim, 2, dtype=torch.float64, device=positions.device) / head_dim)
    angles = positions.to(torch.float64)[:, None] * inv_freq[None, :]
    return angles.cos().float(), angles.sin().float()


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate interleaved pairs (x0, x1), (x2, x3), ... of x (..., head_dim) by the angles of each position;
    cos and sin (..., head_dim/2) broadcast against x's pairs.

    (x0, x1) -> (x0 cos - x1 sin, x1 cos + x0 sin), written as x * (cos, cos) + swap(x) * (-sin, sin) so that
    every op runs on contiguous tensors (the strided x[..., 0::2] form costs twice the kernels, unvectorized,
    in the forward and in each backward); the values are the same to the bit."""
    pairs = x.unflatten(-1, (-1, 2))
    cos, sin = cos.to(x.dtype).unsqueeze(-1), sin.to(x.dtype).unsqueeze(-1)
    cos2, sin2 = torch.cat((cos, cos), -1), torch.cat((-sin, sin), -1)
    return (pairs * cos2 + pairs.flip(-1) * sin2).flatten(-2)
