"""Autograd for the RMSNorm kernels: forward, backward and double backward (the meta-gradient differentiates the
inner gradient, so the backward must be differentiable once more); the double backward is marked
once_differentiable (no third derivative).

A gain used many times in one step (a suffix norm's: the forward and inner backward of every mini-batch) can
defer its gradient: given a `GainGrad` (model/linear.py: shared_gain makes a view of the gain that carries one),
its uses, in the last backward (grad mode off), leave the kernels' fp32 partial sums there instead of reducing them
and handing autograd one (D,) gradient per use to add; the view's own node adds up all of them in one reduction
once every use is differentiated. At 125M that is ~650 small reductions and adds per step fewer.
"""
from __future__ import annotations

import torch

from torch.autograd.function import once_differentiable

from .kernel import rms_norm_bwd, rms_norm_double_bwd, rms_norm_fwd, rms_norm_residual_fwd


class GainGrad:
    """The fp32 partial sums (P_i, D) of a gain's gradient from each deferred use. Formed once; a part arriving
    after that would be lost, so it is an error."""

    def __init__(self):
        self.parts: list[torch.Tensor] = []
        self.done = False

    def add(self, part: torch.Tensor) -> None:
        if self.done:
            raise RuntimeError("a gain-gradient part arrived after the gain's gradient was formed: a use of the gain "
                               "was differentiated after the node that sums its uses")
        self.parts.append(part)

    def total(self) -> torch.Tensor | None:
        self.done = True
        parts, self.parts = self.parts, []
        if not parts:
            return None
        return (torch.cat(parts) if len(parts) > 1 else parts[0]).sum(0)


def _deferred(acc: GainGrad | None, need_w: bool) -> bool:
    # Only in the last backward: an inner gradient (grad mode on) must stay differentiable
    return need_w and acc is not None and not torch.is_grad_enabled()


class _RMSNorm(torch.autograd.Function):
    """acc: w's GainGrad where w came from shared_gain (passed in, not read off w here: inside torch.func, w
    arrives wrapped, without the attribute). out_dtype: y's dtype (None: x's); dy then arrives in it, and dx
    leaves in x's."""

    @staticmethod
    def forward(x, w, eps, acc, out_dtype):
        return rms_norm_fwd(x, w, eps, out_dtype)

    @staticmethod
    def setup_context(ctx, inputs, output):
        x, w, eps, acc, _ = inputs
        ctx.save_for_backward(x, w, output[1])
        ctx.eps = eps
        ctx.acc = acc
        ctx.mark_non_differentiable(output[1])
        ctx.set_materialize_grads(False)  # rstd never has a cotangent: no zero-filled one per call

    @staticmethod
    def backward(ctx, dy, _drstd):
        if dy is None:
            return None, None, None, None, None
        x, w, rstd = ctx.saved_tensors
        # The gain's gradient only where it is asked for: TTT's inner gradient (w.r.t. the inner weights) runs this
        # backward for every norm of the suffix and mini-batch, and needs dx alone
        need_w = ctx.needs_input_grad[1]
        if _deferred(ctx.acc, need_w):
            dx, part = rms_norm_bwd(x, w, rstd, dy.contiguous(), True, reduce=False)
            ctx.acc.add(part)
            return dx, None, None, None, None
        dx, dw = _RMSNormBackward.apply(x, w, rstd, dy.contiguous(), ctx.eps, need_w, ctx.acc)
        return dx, dw, None, None, None


class _RMSNormBackward(torch.autograd.Function):
    @staticmethod
    def forward(x, w, rstd, dy, eps, need_w, acc):
        return rms_norm_bwd(x, w, rstd, dy, need_w)

    @staticmethod
    def setup_context(ctx, inputs, output):
        x, w, rstd, dy, _eps, _need_w, acc = inputs
        ctx.save_for_backward(x, w, rstd, dy)
        ctx.acc = acc
        ctx.set_materialize_grads(False)

    @staticmethod
    @once_differentiable
    def backward(ctx, g_dx, g_dw):
        if g_dx is None and g_dw is None:
            return None, None, None, None, None, None, None
        x, w, rstd, dy = ctx.saved_tensors
        defer = _deferred(ctx.acc, ctx.needs_input_grad[1])
        gx, gw, gdy = rms_norm_double_bwd(x, w, rstd, dy, g_dx, g_dw, reduce=not defer)
        if defer:
            ctx.acc.add(gw)
            gw = None
        return gx, gw, None, gdy, None, None, None


class _RMSNormResidual(torch.autograd.Function):
    """(s, norm2(s)) with s = res + norm(x) by one kernel, differentiable once (the inference inner step's, which
    nothing differentiates twice): a sandwich block's residual add and, given w2, the next sublayer's pre-norm
    (result in out_dtype2; without w2 norm2(s) is an empty tensor). The backward adds s's two cotangents (the
    residual stream's and the pre-norm's dx) in the pre-norm's dx kernel, then runs the post-norm's dx kernel (dw
    where asked for): the same kernels, roundings and sum as autograd's over the separate ops."""

    @staticmethod
    def forward(res, x, w, eps, w2, eps2, out_dtype2):
        return rms_norm_residual_fwd(res, x, w, eps, w2, eps2, out_dtype2)

    @staticmethod
    def setup_context(ctx, inputs, output):
        _res, x, w, _eps, w2, _eps2, _ = inputs
        s, rstd, _y2, rstd2 = output
        ctx.save_for_backward(x, w, rstd, s, w2, rstd2)
        ctx.mark_non_differentiable(rstd, rstd2)
        ctx.set_materialize_grads(False)

    @staticmethod
    def backward(ctx, ds, _drstd, dy2, _drstd2):
        x, w, rstd, s, w2, rstd2 = ctx.saved_tensors
        need_w, need_w2 = ctx.needs_input_grad[2], ctx.needs_input_grad[4]
        dw2 = None
        if dy2 is not None:
            add = None if ds is None else ds.contiguous()
            ds, dw2 = _FirstOrderNormBackward.apply(s, w2, rstd2, dy2.contiguous(), need_w2, add)
        if ds is None:
            return None, None, None, None, dw2 if need_w2 else None, None, None
        # the separate norm's output, in x's dtype, gets ds rounded to that dtype (the add's backward casts it)
        dx, dw = _FirstOrderNormBackward.apply(x, w, rstd, ds.to(x.dtype).contiguous(), need_w)
        return ds, dx, (dw if need_w else None), None, (dw2 if need_w2 else None), None, None


class _FirstOrderNormBackward(torch.autograd.Function):
    """The norm's backward of a first-order node, as a node of its own: inside torch.func (the inner step's
    pullback, create_graph on) a backward sees wrapped tensors, a Function's forward plain ones, which the kernels
    need. dw is an empty tensor unless need_w. add: dx + add (another use's cotangent of x). No second
    derivative."""

    @staticmethod
    def forward(x, w, rstd, dy, need_w, add=None):
        dx, dw = rms_norm_bwd(x, w, rstd, dy, need_w, add=add)
        return dx, (dw if need_w else dx.new_empty(0))

    @staticmethod
    def setup_context(ctx, inputs, output):
        pass

    @staticmethod
    def backward(ctx, *grads):
        raise NotImplementedError("a first-order fused norm (rms_norm_residual / qk_norm_rope with first_order=True) "
                                  "has no second derivative: use first_order=False where one is needed")
