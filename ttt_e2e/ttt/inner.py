"""One inner step of TTT (METHOD.md section 2): loss before update, gradient w.r.t. phi, clip, SGD.

Everything is a function of tensors passed in: the suffix runs through `functional_call` with the inner
weights phi substituted, so phi_{t+1} stays a differentiable function of phi_t and of every parameter.
Each sequence of the batch has its own phi (a leading batch dimension): TTT trains on each context separately.
"""
from __future__ import annotations

import torch
from torch.func import functional_call, grad

from ttt_e2e.model.transformer import Suffix

from .loss import masked_mean, token_losses

Tensors = dict[str, torch.Tensor]


def clip_per_sequence(grads: Tensors, max_norm: float) -> tuple[Tensors, torch.Tensor]:
    """Clip each sequence's gradient by its global norm over all inner tensors (optax's clip_by_global_norm)."""
    norm = torch.stack([g.pow(2).flatten(1).sum(1) for g in grads.values()]).sum(0).sqrt()  # (B,)
    if max_norm <= 0:
        return grads, norm
    factor = max_norm / norm.clamp(min=max_norm)  # 1 below the threshold (a where() would give NaN grads at 0)
    return {n: g * factor.view(-1, *[1] * (g.dim() - 1)).to(g.dtype) for n, g in grads.items()}, norm


def inner_step(suffix: Suffix, theta: Tensors, head: torch.Tensor, phi: Tensors, caches, h: torch.Tensor,
               targets: torch.Tensor, mask: torch.Tensor, pos0: int, eta: float, clip: float, window: int,
               recompute_logits: bool = False, ce_kernel: bool = True):
    """Mini-batch t at absolute position pos0: h (B, b, d) is the prefix's output for it.

    Returns l_t (B,) computed with phi_t, the per-token losses (B, b), phi_{t+1}, the next KV caches and the
    inner gradient's norm (B,). The caches from earlier mini-batches are inputs, not functions of phi_t, so the
    inner gradient treats them as constants while the outer gradient flows through them.
    """

    def loss(phi: Tensors):
        out, kvs = functional_call(suffix, {**theta, **phi}, (h, pos0, caches))
        tok = token_losses(out, head, targets, recompute_logits, ce_kernel)
        l_t = masked_mean(tok, mask)
        return l_t.sum(), (l_t, tok, kvs)  # the sum over sequences: each phi[i] sees only its own l_t[i]

    g, (l_t, tok, kvs) = grad(loss, has_aux=True)(phi)
    g, gnorm = clip_per_sequence(g, clip)
    phi_next = {n: phi[n] - eta * g[n] for n in phi}
    caches_next = [(k[:, :, -window:], v[:, :, -window:]) for k, v in kvs]
    return l_t, tok.detach(), phi_next, caches_next, gnorm.detach()
