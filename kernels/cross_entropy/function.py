"""Autograd for the cross-entropy kernels: the backward is itself a Function, so the inner gradient of TTT
(taken with create_graph) can be differentiated by the outer loss; the double backward is once_differentiable."""
from __future__ import annotations

import torch
from torch.autograd.function import once_differentiable

from .kernel import ce_bwd, ce_double_bwd, ce_fwd


class _CrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(z, y):
        return ce_fwd(z, y)

    @staticmethod
    def setup_context(ctx, inputs, output):
        z, y = inputs
        ctx.save_for_backward(z, y, output[1])
        ctx.mark_non_differentiable(output[1])

    @staticmethod
    def backward(ctx, g, _dlse):
        z, y, lse = ctx.saved_tensors
        return _CrossEntropyBackward.apply(z, y, lse, g.float().contiguous()), None


class _CrossEntropyBackward(torch.autograd.Function):
    # lse enters as a constant: the derivative through it is in the double-backward formula (the softmax Jacobian).
    @staticmethod
    def forward(z, y, lse, g):
        return ce_bwd(z, y, lse, g)

    @staticmethod
    def setup_context(ctx, inputs, output):
        z, y, lse, g = inputs
        ctx.save_for_backward(z, y, lse, g)

    @staticmethod
    @once_differentiable
    def backward(ctx, u):
        z, y, lse, g = ctx.saved_tensors
        gz, gg = ce_double_bwd(z, y, lse, g, u.contiguous())
        return gz, None, None, gg
