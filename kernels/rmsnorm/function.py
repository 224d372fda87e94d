"""Autograd for the RMSNorm kernels: forward and backward are kernels; the double backward (needed by the meta
gradient, which differentiates the inner gradient) comes from autograd on the PyTorch form of the backward."""
from __future__ import annotations

import torch

from .kernel import rms_norm_bwd, rms_norm_fwd
from .reference import rms_norm_backward_reference


class _RMSNorm(torch.autograd.Function):
    @staticmethod
    def forward(x, w, eps):
        return rms_norm_fwd(x, w, eps)

    @staticmethod
    def setup_context(ctx, inputs, output):
        x, w, eps = inputs
        ctx.save_for_backward(x, w, output[1])
        ctx.eps = eps
        ctx.mark_non_differentiable(output[1])

    @staticmethod
    def backward(ctx, dy, _drstd):
        x, w, rstd = ctx.saved_tensors
        dx, dw = _RMSNormBackward.apply(x, w, rstd, dy.contiguous(), ctx.eps)
        return dx, dw, None


class _RMSNormBackward(torch.autograd.Function):
    @staticmethod
    def forward(x, w, rstd, dy, eps):
        return rms_norm_bwd(x, w, rstd, dy)

    @staticmethod
    def setup_context(ctx, inputs, output):
        x, w, _rstd, dy, eps = inputs
        ctx.save_for_backward(x, w, dy)
        ctx.eps = eps

    @staticmethod
    def backward(ctx, g_dx, g_dw):
        # rstd is recomputed from x inside the reference, so its dependence on x is in these gradients: the
        # rstd input itself gets none.
        x, w, dy = ctx.saved_tensors
        with torch.enable_grad():
            xr, wr, dyr = (t.detach().requires_grad_() for t in (x, w, dy))
            dx, dw = rms_norm_backward_reference(xr, wr, dyr, ctx.eps)
            outs = [(o, g) for o, g in ((dx, g_dx), (dw, g_dw)) if g is not None]
            gx, gw, gdy = torch.autograd.grad([o for o, _ in outs], (xr, wr, dyr), [g for _, g in outs],
                                              allow_unused=True)
        return gx, gw, None, gdy, None
