"""Autograd for the cross-entropy kernels: the backward is itself a Function, so that a gradient taken with
create_graph can be differentiated again; the double backward is once_differentiable.

TTT's inner loss does not come through here: its head, cross-entropy and inner gradient form one node
(ttt_e2e/kernels/cross_entropy/head.py), which calls the kernels and the PyTorch forms below (`_fwd_grad_torch`, `_bwd_torch`)
directly."""
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


def _probs(z, y, lse):
    """p = softmax(z) and q = p - e_y in at least fp32, rows with a negative target included (masked later)."""
    p = torch.exp(z.to(lse.dtype) - lse[:, None])
    q = p.clone()
    q[torch.arange(len(y), device=y.device), y.clamp(min=0)] -= 1
    return p, q


def _fwd_grad_torch(z, y, g):
    zf = z.to(torch.promote_types(z.dtype, torch.float32))
    lse = torch.logsumexp(zf, -1)
    valid = y >= 0
    loss = torch.where(valid, lse - zf.gather(1, y.clamp(min=0)[:, None]).squeeze(1), 0.0)
    _, q = _probs(z, y, lse)
    return loss, (q * torch.where(valid, g, 0.0)[:, None]).to(z.dtype), lse


def _bwd_torch(z, y, lse, g, u, dl):
    """(gz, gg): the gradients w.r.t. z and g of <u, dz> + <dl, loss> (u or dl None: that term left out)."""
    valid = y >= 0
    p, q = _probs(z, y, lse)
    gz, gg = torch.zeros_like(p), None
    if u is not None:
        uf = u.to(p.dtype)
        gz += torch.where(valid, g, 0.0)[:, None] * p * (uf - (uf * p).sum(1, keepdim=True))
        gg = torch.where(valid, (uf * q).sum(1), 0.0).to(g.dtype)
    if dl is not None:
        gz += torch.where(valid, dl, 0.0)[:, None] * q
    return gz.to(z.dtype), gg
