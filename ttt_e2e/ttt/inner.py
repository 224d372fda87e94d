"""One inner step of TTT (METHOD.md section 2): loss before update, gradient w.r.t. phi, clip, SGD.

Everything is a function of tensors passed in: the suffix runs through `functional_call` with the inner
weights phi substituted, so phi_{t+1} stays a differentiable function of phi_t and of every parameter.
Each sequence of the batch has its own phi (a leading batch dimension): TTT trains on each context separately.
"""
from __future__ import annotations

import torch
from torch.func import functional_call, grad, vjp

from ttt_e2e.kernels.sgd import clipped_scale, clipped_sgd, sgd_update_
from ttt_e2e.kernels.sgd.clip import clip_scale
from ttt_e2e.model.layers import compute_dtype
from ttt_e2e.model.transformer import Suffix

from .head import head_loss_and_grad
from .loss import masked_mean, token_losses

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


def minibatch_loss(suffix: Suffix, theta: Tensors, head: torch.Tensor, phi_c: Tensors, caches, h: torch.Tensor,
                   targets: torch.Tensor, mask: torch.Tensor, pos0: int, recompute_logits: bool = False,
                   ce_kernel: bool = True, first_attended: bool = False):
    """l_t (B,) and the per-token losses (B, b) of the suffix with inner weights phi_c (in the compute dtype) on
    the mini-batch at pos0, and the KV caches it leaves ((keys, values) per block, the earlier ones included).
    first_attended: h is already the first block's attention_half output (Suffix.forward)."""
    out, kvs = functional_call(suffix, {**theta, **phi_c}, (h, pos0, caches), {"first_attended": first_attended})
    tok = token_losses(out, head, targets, recompute_logits, ce_kernel)
    return masked_mean(tok, mask), tok, kvs


def loss_and_grad(suffix: Suffix, theta: Tensors, head: torch.Tensor, phi_c: Tensors, caches, h: torch.Tensor,
                  targets: torch.Tensor, mask: torch.Tensor, pos0: int, ce_kernel: bool = True,
                  first_attended: bool = False):
    """`minibatch_loss` and the gradient g of sum_i l_t[i] w.r.t. phi_c: (l_t, tok, g, kvs).

    The same function as torch.func.grad of the loss, taken in two parts: the loss and its gradient w.r.t. the
    suffix's output come from one node (ttt/head.py: the head, the cross-entropy and the head's backward), the
    rest is the suffix's vector-Jacobian product with that gradient. The outer backward hands that node both
    cotangents at once, and it writes the logits' gradient in one pass (autograd of the loss would take a
    backward pass, a double-backward pass and their sum, each over the (b, vocab) logits)."""
    def run(phi_c: Tensors):
        return functional_call(suffix, {**theta, **phi_c}, (h, pos0, caches), {"first_attended": first_attended})

    out, pullback, kvs = vjp(run, phi_c, has_aux=True)
    m = mask.to(torch.promote_types(out.dtype, torch.float32))
    w = m / m.sum(-1, keepdim=True).clamp(min=1)  # d l_t / d tok: each sequence's masked mean
    dtype = compute_dtype(out)  # the casts autocast makes for the head's matmuls (the meta step's head is cast)
    tok, dx = head_loss_and_grad(out.flatten(0, 1).to(dtype), head.to(dtype), targets.flatten(), w.flatten(),
                                 kernel=None if ce_kernel else False)
    # create_graph always, as torch.func.grad does, so that a step computes the same numbers whether or not
    # autograd records it (remat's forward and inference run under no_grad; the two modes round differently
    # under autocast); without grad mode nothing outside may keep that graph
    recording = torch.is_grad_enabled()
    (g,) = pullback(dx.view(out.shape).to(out.dtype), create_graph=True)
    if not recording:
        g = {n: t.detach() for n, t in g.items()}
    tok = tok.view(targets.shape)
    return masked_mean(tok, mask), tok, g, kvs


def compute_copy(phi: Tensors, like: torch.Tensor) -> Tensors:
    """phi cast to the dtype the matmuls on `like` run in (autocast's, or its own)."""
    dtype = compute_dtype(like)
    return {n: p.to(dtype) if p.is_floating_point() else p for n, p in phi.items()}


def inner_step(suffix: Suffix, theta: Tensors, head: torch.Tensor, phi: Tensors, caches, h: torch.Tensor,
               targets: torch.Tensor, mask: torch.Tensor, pos0: int, eta: float, clip: float, window: int,
               recompute_logits: bool = False, ce_kernel: bool = True, phi_c: Tensors | None = None,
               out: tuple[Tensors, Tensors] | None = None, sgd_kernel: bool = False, first_attended: bool = False):
    """Mini-batch t at absolute position pos0: h (B, b, d) is the prefix's output for it. phi_c: phi_t in the
    compute dtype, as the previous step returned it (None: cast here). out: buffers for phi_{t+1} and its
    compute-dtype copy, updated in place (inference only: see sgd_step); they may be phi and phi_c themselves.
    sgd_kernel: the update through its Triton kernels where they apply (see sgd_step). first_attended: h is
    already the first suffix block's attention_half output (Suffix.forward); that block's cache entry is then
    unused, and () in the next caches.

    Returns l_t (B,) computed with phi_t, the per-token losses (B, b), phi_{t+1}, the next KV caches, the
    inner gradient's norm (B,) and phi_{t+1} in the compute dtype. The caches from earlier mini-batches are
    inputs, not functions of phi_t, so the inner gradient treats them as constants while the outer gradient
    flows through them. A cache may also be an object that holds the keys itself (inference's `StepRing`): its
    entry of the next caches is then the block's own (k, v), for the object's owner to store.
    """

    # The gradient is taken w.r.t. phi cast once to the compute dtype: the values autocast would use at every
    # use, so the same function, with one cast per step, and g in the compute dtype (what its matmuls give)
    # rather than widened; phi itself stays in its own dtype (fp32: the inner state accumulates small steps).
    if phi_c is None:
        phi_c = compute_copy(phi, h)
    if recompute_logits:  # the head and the loss as one node that keeps no logits (linear_ce.py)
        def loss(phi_c: Tensors):
            l_t, tok, kvs = minibatch_loss(suffix, theta, head, phi_c, caches, h, targets, mask, pos0, True,
                                           ce_kernel, first_attended)
            return l_t.sum(), (l_t, tok, kvs)  # the sum over sequences: each phi[i] sees only its own l_t[i]

        g, (l_t, tok, kvs) = grad(loss, has_aux=True)(phi_c)
    else:
        l_t, tok, g, kvs = loss_and_grad(suffix, theta, head, phi_c, caches, h, targets, mask, pos0, ce_kernel,
                                         first_attended)
    # out may hold phi_c itself: the gradient is done with it
    phi_next, phi_next_c, gnorm = sgd_step(phi, g, eta, clip, out, sgd_kernel)
    # The last W keys; a cache that holds no more is passed on as it is (a full-length slice would still cost, in
    # the outer backward, a zero-filled copy of its whole gradient)
    caches_next = [kv if not kv or kv[0].shape[2] <= window else (kv[0][:, :, -window:], kv[1][:, :, -window:])
                   for kv in kvs]
    return l_t, tok.detach(), phi_next, caches_next, gnorm.detach(), phi_next_c
