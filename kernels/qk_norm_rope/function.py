"""First-order autograd of the fused QK-norm + RoPE forward: the backward is RoPE's (the inverse rotation, kernels/rope)
then the norm's dx kernel (kernels/rmsnorm: _FirstOrderNormBackward), the same kernels and roundings as the backward
of the two separate ops; not differentiable again (the inference inner step's gradient is the only one taken
through it)."""
from __future__ import annotations

import torch

from ttt_e2e.kernels.rmsnorm.function import _FirstOrderNormBackward
from ttt_e2e.kernels.rope.function import _Rope

from .kernel import qk_norm_rope_fwd


class _QKNormRope(torch.autograd.Function):
    @staticmethod
    def forward(x, w, cos, sin, eps):
        return qk_norm_rope_fwd(x, w, cos, sin, eps)

    @staticmethod
    def setup_context(ctx, inputs, output):
        x, w, cos, sin, _eps = inputs
        ctx.save_for_backward(x, w, output[1], cos, sin)
        ctx.mark_non_differentiable(output[1])
        ctx.set_materialize_grads(False)

    @staticmethod
    def backward(ctx, dy, _drstd):
        if dy is None:
            return None, None, None, None, None
        x, w, rstd, cos, sin = ctx.saved_tensors
        need_w = ctx.needs_input_grad[1]
        dn = _Rope.apply(dy.contiguous(), cos, sin, -1)  # the normed rows' cotangent, in their dtype
        dx, dw = _FirstOrderNormBackward.apply(x, w, rstd, dn.view(-1, x.shape[-1]), need_w)
        return dx.view(x.shape), (dw if need_w else None), None, None, None
