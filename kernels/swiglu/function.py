"""Autograd for the SwiGLU gate kernels: forward, backward and double backward (the meta-gradient differentiates the
inner gradient, so the backward must be differentiable once more); the double backward is marked
once_differentiable (no third derivative)."""
from __future__ import annotations

import torch

from torch.autograd.function import once_differentiable

from .kernel import gate_bwd, gate_double_bwd, gate_fwd


class _Gate(torch.autograd.Function):
    @staticmethod
    def forward(ab, dim):
        return gate_fwd(ab, dim)

    @staticmethod
    def setup_context(ctx, inputs, output):
        ab, dim = inputs
        ctx.save_for_backward(ab)
        ctx.dim = dim

    @staticmethod
    def backward(ctx, dy):
        (ab,) = ctx.saved_tensors
        return _GateBackward.apply(ab, dy.contiguous(), ctx.dim), None


class _GateBackward(torch.autograd.Function):
    @staticmethod
    def forward(ab, dy, dim):
        return gate_bwd(ab, dy, dim)

    @staticmethod
    def setup_context(ctx, inputs, output):
        ab, dy, dim = inputs
        ctx.save_for_backward(ab, dy)
        ctx.dim = dim
        ctx.set_materialize_grads(False)

    @staticmethod
    @once_differentiable
    def backward(ctx, u):
        if u is None:
            return None, None, None
        ab, dy = ctx.saved_tensors
        gab, gdy = gate_double_bwd(ab, dy, u.contiguous(), ctx.dim)
        return gab, gdy, None
