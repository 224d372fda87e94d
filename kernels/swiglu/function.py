"""Autograd for the SwiGLU gate kernels: forward, backward and double backward (the meta-gradient differentiates the
inner gradient, so the backward must be differentiable once more); the double backward is marked
once_differentiable (no third derivative)."""
from __future__ import annotations

import torch

from torch.autograd.function import once_differentiable

from .kernel import gate_bwd, gate_double_bwd, gate_fwd


class _Gate(torch.autograd.Function):
    @staticmethod
    def forward(a, b):
        return gate_fwd(a, b)

    @staticmethod
    def setup_context(ctx, inputs, output):
        a, b = inputs
        ctx.save_for_backward(a, b)

    @staticmethod
    def backward(ctx, dy):
        a, b = ctx.saved_tensors
        return _GateBackward.apply(a, b, dy.contiguous())


class _GateBackward(torch.autograd.Function):
    @staticmethod
    def forward(a, b, dy):
        return gate_bwd(a, b, dy)

    @staticmethod
    def setup_context(ctx, inputs, output):
        a, b, dy = inputs
        ctx.save_for_backward(a, b, dy)
        ctx.set_materialize_grads(False)  # an unused da or db (None) skips its load in the kernel

    @staticmethod
    @once_differentiable
    def backward(ctx, ua, ub):
        if ua is None and ub is None:
            return None, None, None
        a, b, dy = ctx.saved_tensors
        return gate_double_bwd(a, b, dy, ua, ub)
