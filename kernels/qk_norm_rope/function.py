"""First-order autograd of the fused QK-norm + RoPE forward: the backward is RoPE's (the inverse rotation) then the
norm's dx kernel, the same kernels and roundings as the backward of the two separate ops; not differentiable again
(the inference inner step's gradient is the only one taken through it)."""
from __future__ import annotations

import torch

from ttt_e2e.kernels.rmsnorm.kernel import rms_norm_bwd
from ttt_e2e.kernels.rope.kernel import rope_fwd

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
        dx, dw = _QKNormRopeBackward.apply(x, w, rstd, cos, sin, dy.contiguous(), need_w)
        return dx, (dw if need_w else None), None, None, None


class _QKNormRopeBackward(torch.autograd.Function):
    """The backward as a node of its own (inside torch.func's pullback the kernels get plain tensors only in a
    Function's forward); dw an empty tensor unless need_w. No second derivative."""

    @staticmethod
    def forward(x, w, rstd, cos, sin, dy, need_w):
        dn = rope_fwd(dy, cos, sin, -1)  # the normed rows' cotangent, in their dtype
        dx, dw = rms_norm_bwd(x, w, rstd, dn.view(-1, x.shape[-1]), need_w)
        return dx.view(x.shape), (dw if need_w else dx.new_empty(0))

    @staticmethod
    def setup_context(ctx, inputs, output):
        pass

    @staticmethod
    def backward(ctx, *grads):
        raise NotImplementedError("qk_norm_rope with first_order=True has no second derivative: use "
                                  "first_order=False where one is needed")
