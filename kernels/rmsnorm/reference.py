"""RMSNorm in PyTorch ops: the reference of the kernels (the tests differentiate it twice for the oracle of the
backward and double backward kernels), and the model's RMSNorm off CUDA or with model.fused_kernels off."""
from __future__ import annotations

import torch


def rms_norm_reference(x: torch.Tensor, w: torch.Tensor, eps: float) -> torch.Tensor:
    """y = x / sqrt(mean(x^2) + eps) * w over the last dim; statistics in at least fp32, y in x's dtype."""
    xf = x.float() if x.dtype in (torch.bfloat16, torch.float16) else x
    y = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    return (y * w.to(y.dtype)).to(x.dtype)

