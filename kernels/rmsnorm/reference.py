"""RMSNorm in PyTorch ops: the reference of the kernels, and their double backward (which autograd derives from
`rms_norm_backward_reference`)."""
from __future__ import annotations

import torch


def rms_norm_reference(x: torch.Tensor, w: torch.Tensor, eps: float) -> torch.Tensor:
    """y = x / sqrt(mean(x^2) + eps) * w over the last dim; statistics in at least fp32, y in x's dtype."""
    xf = x.float() if x.dtype in (torch.bfloat16, torch.float16) else x
    y = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    return (y * w.to(y.dtype)).to(x.dtype)


def rms_norm_backward_reference(x: torch.Tensor, w: torch.Tensor, dy: torch.Tensor, eps: float):
    """(dx, dw) of rms_norm_reference for the cotangent dy, written out (differentiable: autograd takes it from
    here to the double backward). dx = r (w dy - xhat mean(w dy xhat)), dw = sum over rows of dy xhat."""
    acc = torch.promote_types(x.dtype, torch.float32)
    xf, dyf, wf = x.to(acc), dy.to(acc), w.to(acc)
    r = torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    xhat, wdy = xf * r, dyf * wf
    dx = r * (wdy - xhat * (wdy * xhat).mean(-1, keepdim=True))
    dw = (dyf * xhat).reshape(-1, x.shape[-1]).sum(0)
    return dx.to(x.dtype), dw.to(w.dtype)
