"""Autograd for the RMSNorm kernels: forward, backward and double backward (the meta-gradient differentiates the
inner gradient, so the backward must be differentiable once more); the double backward is marked
once_differentiable (no third derivative)."""
from __future__ import annotations

import torch

from torch.autograd.function import once_differentiable

from .kernel import rms_norm_bwd, rms_norm_double_bwd, rms_norm_fwd


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
        # The gain's gradient only where it is asked for: TTT's inner gradient (w.r.t. the inner weights) runs this
        # backward for every norm of the suffix and mini-batch, and needs dx alone
        dx, dw = _RMSNormBackward.apply(x, w, rstd, dy.contiguous(), ctx.eps, ctx.needs_input_grad[1])
        return dx, dw, None


class _RMSNormBackward(torch.autograd.Function):
    @staticmethod
    def forward(x, w, rstd, dy, eps, need_w):
        return rms_norm_bwd(x, w, rstd, dy, need_w)

    @staticmethod
    def setup_context(ctx, inputs, output):
        x, w, rstd, dy, _eps, _need_w = inputs
        ctx.save_for_backward(x, w, rstd, dy)
        ctx.set_materialize_grads(False)

    @staticmethod
    @once_differentiable
    def backward(ctx, g_dx, g_dw):
        if g_dx is None and g_dw is None:
            return None, None, None, None, None, None
        x, w, rstd, dy = ctx.saved_tensors
        gx, gw, gdy = rms_norm_double_bwd(x, w, rstd, dy, g_dx, g_dw)
        return gx, gw, None, gdy, None, None
