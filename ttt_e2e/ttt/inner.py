"""One inner step of TTT (docs/METHOD.md section 2): loss before update, gradient w.r.t. phi, clip, SGD.

Everything is a function of tensors passed in: the suffix runs through `functional_call` with the inner
weights phi substituted, so phi_{t+1} stays a differentiable function of phi_t and of every parameter.
Each sequence of the batch has its own phi (a leading batch dimension): TTT trains on each context separately.
"""
from __future__ import annotations

import torch
from torch.func import functional_call, grad, vjp

from ttt_e2e.kernels.cross_entropy.head import head_loss_and_grad
from ttt_e2e.kernels.sgd.step import sgd_step
from ttt_e2e.model.layers import compute_dtype
from ttt_e2e.model.transformer import Suffix

from .loss import masked_mean, token_losses
from .settings import PLAIN, InnerSettings

Tensors = dict[str, torch.Tensor]


def minibatch_loss(suffix: Suffix, theta: Tensors, head: torch.Tensor, phi_c: Tensors, caches, h: torch.Tensor,
                   targets: torch.Tensor, mask: torch.Tensor, pos0: int, settings: InnerSettings = PLAIN):
    """l_t (B,) and the per-token losses (B, b) of the suffix with inner weights phi_c (in the compute dtype) on
    the mini-batch at pos0, and the KV caches it leaves ((keys, values) per block, the earlier ones included).
    settings: the head's (recompute_logits, ce_kernel) and first_attended (h is already the first block's
    attention_half output, Suffix.forward)."""
    out, kvs = functional_call(suffix, {**theta, **phi_c}, (h, pos0, caches),
                               {"first_attended": settings.first_attended})
    tok = token_losses(out, head, targets, settings.recompute_logits, settings.ce_kernel)
    return masked_mean(tok, mask), tok, kvs


def loss_and_grad(suffix: Suffix, theta: Tensors, head: torch.Tensor, phi_c: Tensors, caches, h: torch.Tensor,
                  targets: torch.Tensor, mask: torch.Tensor, pos0: int, settings: InnerSettings = PLAIN):
    """`minibatch_loss` and the gradient g of sum_i l_t[i] w.r.t. phi_c: (l_t, tok, g, kvs).

    The same function as torch.func.grad of the loss, taken in two parts: the loss and its gradient w.r.t. the
    suffix's output come from one node (kernels/cross_entropy/head.py: the head, the cross-entropy and the head's
    backward), the rest is the suffix's vector-Jacobian product with that gradient. The outer backward hands that
    node both cotangents at once, and it writes the logits' gradient in one pass (autograd of the loss would take
    a backward pass, a double-backward pass and their sum, each over the (b, vocab) logits)."""
    def run(phi_c: Tensors):
        return functional_call(suffix, {**theta, **phi_c}, (h, pos0, caches),
                               {"first_attended": settings.first_attended})

    out, pullback, kvs = vjp(run, phi_c, has_aux=True)
    m = mask.to(torch.promote_types(out.dtype, torch.float32))
    w = m / m.sum(-1, keepdim=True).clamp(min=1)  # d l_t / d tok: each sequence's masked mean
    dtype = compute_dtype(out)  # the casts autocast makes for the head's matmuls (the meta step's head is cast)
    tok, dx = head_loss_and_grad(out.flatten(0, 1).to(dtype), head.to(dtype), targets.flatten(), w.flatten(),
                                 kernel=None if settings.ce_kernel else False)
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
               targets: torch.Tensor, mask: torch.Tensor, pos0: int, settings: InnerSettings,
               phi_c: Tensors | None = None, out: tuple[Tensors, Tensors] | None = None):
    """Mini-batch t at absolute position pos0: h (B, b, d) is the prefix's output for it. phi_c: phi_t in the
    compute dtype, as the previous step returned it (None: cast here). out: buffers for phi_{t+1} and its
    compute-dtype copy, updated in place (inference only: see sgd_step); they may be phi and phi_c themselves.
    settings: eta, clip, window and the kernels (ttt/settings.py). With settings.first_attended h is already the
    first suffix block's attention_half output (Suffix.forward); that block's cache entry is then unused, and ()
    in the next caches.

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
    if settings.recompute_logits:  # the head and the loss as one node that keeps no logits (linear_ce.py)
        def loss(phi_c: Tensors):
            l_t, tok, kvs = minibatch_loss(suffix, theta, head, phi_c, caches, h, targets, mask, pos0, settings)
            return l_t.sum(), (l_t, tok, kvs)  # the sum over sequences: each phi[i] sees only its own l_t[i]

        g, (l_t, tok, kvs) = grad(loss, has_aux=True)(phi_c)
    else:
        l_t, tok, g, kvs = loss_and_grad(suffix, theta, head, phi_c, caches, h, targets, mask, pos0, settings)
    # out may hold phi_c itself: the gradient is done with it
    phi_next, phi_next_c, gnorm = sgd_step(phi, g, settings.eta, settings.clip, out, settings.sgd_kernel)
    # The last W keys; a cache that holds no more is passed on as it is (a full-length slice would still cost, in
    # the outer backward, a zero-filled copy of its whole gradient)
    W = settings.window
    caches_next = [kv if not kv or kv[0].shape[2] <= W else (kv[0][:, :, -W:], kv[1][:, :, -W:]) for kv in kvs]
    return l_t, tok.detach(), phi_next, caches_next, gnorm.detach(), phi_next_c
