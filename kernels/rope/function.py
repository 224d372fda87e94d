"""Autograd for the rotary-embedding kernel. The rotation is linear in x and its backward is the inverse rotation,
itself a _Rope: differentiable to any order (the meta-gradient needs the second)."""
from __future__ import annotations

import torch

from .kernel import rope_fwd


class _Rope(torch.autograd.Function):
    @staticmethod
    def forward(x, cos, sin, sign):
        return rope_fwd(x, cos, sin, sign)

    @staticmethod
    def setup_context(ctx, inputs, output):
        _x, cos, sin, sign = inputs
        ctx.save_for_backward(cos, sin)
        ctx.sign = sign

    @staticmethod
    def backward(ctx, dy):
        cos, sin = ctx.saved_tensors
        return _Rope.apply(dy.contiguous(), cos, sin, -ctx.sign), None, None, None
