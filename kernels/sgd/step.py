"""The inner loop's SGD step as autograd nodes: phi - eta * clip(g), clipped by each sequence's global norm.

    nxt, nxt_c, norm = sgd_step(phi, g, eta, max_norm)                # dicts of (B, ...) tensors
    sgd_step(phi, g, eta, max_norm, out=(phi, phi_c), kernel=True)     # in place, no autograd: inference

With `kernel`, the Triton kernels of this folder where they apply (fp32 phi, bf16/fp16 g, CUDA); else PyTorch
ops, arranged as the two nodes below so that the meta step's backward makes as few passes over the inner state
(the loop's largest tensor) as the math needs. `reference.py` states the same step plainly.
"""
from __future__ import annotations

import torch

from . import clipped_scale, clipped_sgd, sgd_update_
from .clip import clip_scale

Tensors = dict[str, torch.Tensor]


class _SumOfSquares(torch.autograd.Function):
    """Per-sequence sum of squares of g (B, ...) -> (B,), accumulated in fp32 at least, with a one-pass backward.
    (linalg.vector_norm's backward makes three full passes over g: divide, mask the zero norms, multiply; the
    inner state is the largest tensor of the loop, and its clip runs once per mini-batch.)"""

    @staticmethod
    def forward(g):
        acc = torch.promote_types(g.dtype, torch.float32)
        return torch.linalg.vector_norm(g.flatten(1), dim=1, dtype=acc).square()

    @staticmethod
    def setup_context(ctx, inputs, output):
        ctx.save_for_backward(inputs[0])

    @staticmethod
    def backward(ctx, grad):
        (g,) = ctx.saved_tensors
        # 2 grad g, computed in fp32 and rounded once into g's dtype
        return torch.mul(g, (2 * grad).view(-1, *[1] * (g.dim() - 1)), out=torch.empty_like(g))


class _SGDStep(torch.autograd.Function):
    """phi + scale g, and the same rounded to g's dtype (the copy the next mini-batch computes with), as one node:
    its backward adds the two cotangents once and writes g's cotangent in g's dtype, three passes over the state
    where autograd of addcmul, a cast and their sum makes six. scale: (B, 1, ...)."""

    @staticmethod
    def forward(phi, g, scale):
        nxt = torch.addcmul(phi, scale, g)
        return nxt, nxt.to(g.dtype)

    @staticmethod
    def setup_context(ctx, inputs, output):
        _, g, scale = inputs
        ctx.save_for_backward(g, scale)

    @staticmethod
    def backward(ctx, d_next, d_copy):
        g, scale = ctx.saved_tensors
        d = d_next + d_copy  # in phi's dtype
        dg = torch.mul(d, scale, out=torch.empty_like(g)) if ctx.needs_input_grad[1] else None
        dscale = (d * g).flatten(1).sum(1).view_as(scale) if ctx.needs_input_grad[2] else None
        return d, dg, dscale


def _kernel_applies(phi: Tensors, grads: Tensors) -> bool:
    """The Triton SGD kernels take fp32 phi and bf16/fp16 g on a GPU (the meta step's and inference's case)."""
    return all(g.is_cuda and phi[n].dtype == torch.float32 and g.dtype in (torch.bfloat16, torch.float16)
               for n, g in grads.items())


def sgd_step(phi: Tensors, grads: Tensors, eta: float, max_norm: float,
             out: tuple[Tensors, Tensors] | None = None,
             kernel: bool = False) -> tuple[Tensors, Tensors, torch.Tensor]:
    """phi - eta * clip(g), the clip by each sequence's global norm over all inner tensors (optax's
    clip_by_global_norm). Returns phi_{t+1} in phi's dtype, phi_{t+1} in g's dtype (the same tensors when the
    dtypes agree) and the norm before clipping, (B,), detached, in at least fp32. One read of g for its norm and
    one fused multiply-add per tensor: phi is the loop's largest state.

    out: (phi_out, phi_out_c), buffers to write phi_{t+1} into and return instead of new tensors: phi_out in
    phi's dtype (it may be phi itself), phi_out_c its copy in the compute dtype (g's; it may be phi_out, then
    not written twice). Inference only: with no autograd graph through phi, the update can overwrite the state
    it reads, with no second full-size buffer nor copies into static ones (CUDA graphs).

    kernel: the Triton kernels where they apply (fp32 phi, bf16/fp16 g, CUDA): the update and its copy in one
    pass, and the backward of the update and of the clip in one node (ttt_e2e.kernels.sgd); else PyTorch ops."""
    if out is not None and any(t.requires_grad for t in (*phi.values(), *grads.values())):
        raise ValueError("sgd_step(out=...) updates phi in place, which would break the meta-gradient through "
                         "it: phi and its gradient must not require grad (out is for inference)")
    kernel = kernel and _kernel_applies(phi, grads)
    if kernel and out is None:
        names = list(grads)
        nxt, nxt_c, norm = clipped_sgd([phi[n] for n in names], [grads[n] for n in names], eta, max_norm)
        return dict(zip(names, nxt)), dict(zip(names, nxt_c)), norm
    if out is not None and kernel:  # no graph through the norm: the norms and the clip in two launches
        scale, _, gnorm = clipped_scale([g.flatten(1) for g in grads.values()], eta, max_norm)
    else:
        sq = torch.stack([_SumOfSquares.apply(g) for g in grads.values()]).sum(0)
        scale, gnorm = clip_scale(sq, eta, max_norm), sq.detach().sqrt()
    scale = scale.to(next(iter(phi.values())).dtype)
    nxt, nxt_c = ({}, {}) if out is None else out
    for n, g in grads.items():
        s = scale.view(-1, *[1] * (g.dim() - 1))
        if out is not None and kernel:
            sgd_update_(phi[n], g, scale, nxt[n], nxt_c[n])
        elif out is not None:
            torch.addcmul(phi[n], s, g, out=nxt[n])
            if nxt_c[n] is not nxt[n]:
                nxt_c[n].copy_(nxt[n])  # the rounding .to() gives: the copy the default returns
        elif g.dtype == phi[n].dtype:
            nxt[n] = nxt_c[n] = torch.addcmul(phi[n], s, g)
        else:
            nxt[n], nxt_c[n] = _SGDStep.apply(phi[n], g, s)
    return nxt, nxt_c, gnorm
