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
        dx, dw = _RMSNormBackward.apply(x, w, rstd, dy.contiguous(), ctx.eps)
        return dx, dw, None


class _RMSNormBackward(torch.autograd.Function):
    @staticmethod
    def forward(x, w, rstd, dy, eps):
        return rms_norm_bwd(x, w, rstd, dy)

    @staticmethod
    def setup_context(ctx, inputs, output):
        x, w, rstd, dy, _eps = inputs
        ctx.save_for_backward(x, w, rstd, dy)

    @staticmethod
    @once_differentiable
    def backward(ctx, g_dx, g_dw):
        x, w, rstd, dy = ctx.saved_tensors
        gx, gw, gdy = rms_norm_double_bwd(x, w, rstd, dy, g_dx, g_dw)
        return gx, gw, None, gdy, None
