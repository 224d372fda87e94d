"""The loss of a batch of sequences, in either train mode (docs/METHOD.md sections 2-3).

meta:     tokens -> embed -> prefix blocks, then the first suffix block's attention half (once, whole sequence:
                    no phi in them)
                 -> for each mini-batch t: suffix with phi_t and the KV caches -> l_t; phi_{t+1} = phi_t - eta clip(g_t)
                    (no update after the last mini-batch: nothing would read it)
                 -> outer loss = mean_t l_t, differentiated through every g_t
pretrain: the same network with phi fixed at phi_0; SWA over the whole sequence in one pass equals the
          mini-batch-by-mini-batch suffix with KV caches, so it runs in one pass. Its loss is averaged the same way
          (per mini-batch, then over mini-batches), so meta with eta = 0 gives the same number.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch

from ttt_e2e.config import Kernels, TTTConfig
from ttt_e2e.model.layers import compute_dtype
from ttt_e2e.model.linear import shared_gain, shared_weight
from ttt_e2e.model.transformer import Transformer

from .inner import compute_copy, inner_step, minibatch_loss
from .loss import masked_mean, token_losses
from .remat import remat
from .settings import InnerSettings


@dataclass
class LossOutput:
    loss: torch.Tensor  # scalar, differentiable: mean over sequences and mini-batches
    minibatch_losses: torch.Tensor  # (T / b,) detached, mean over sequences
    token_losses: torch.Tensor  # (B, T) detached cross-entropy of every position (0 where masked)
    # (T / b - 1,) detached, before clipping, mean over sequences: every inner step taken (the last mini-batch
    # takes none: its update would reach no loss)
    inner_grad_norm: Optional[torch.Tensor] = None


def sequence_loss(model: Transformer, input_ids: torch.Tensor, targets: torch.Tensor,
                  mask: Optional[torch.Tensor], ttt: TTTConfig, ilr_mult: float = 1.0,
                  kernels: Optional[Kernels] = None) -> LossOutput:
    """input_ids, targets, mask: (B, T); mask marks the targets that count (docs/METHOD.md: not BOS). kernels:
    the cross-entropy's, the inner SGD update's and the weight gradients' (config.py: Kernels), which the model's
    own modules must share; default Kernels.of(model.cfg), the model's own default."""
    B, T = input_ids.shape
    b = ttt.mini_batch_size
    if T % b:
        raise ValueError(f"sequence length {T} is not divisible by ttt.mini_batch_size={b}")
    if targets.shape != input_ids.shape or (mask is not None and mask.shape != input_ids.shape):
        raise ValueError(f"input_ids {tuple(input_ids.shape)}, targets {tuple(targets.shape)} and mask "
                         f"{None if mask is None else tuple(mask.shape)} must have the same (B, T) shape")
    if mask is None:
        mask = torch.ones_like(targets, dtype=torch.bool)
    kernels = Kernels.of(model.cfg) if kernels is None else kernels
    if ttt.train_mode == "meta":
        return _meta_loss(model, input_ids, targets, mask, ttt, ilr_mult, kernels)
    if ttt.train_mode == "pretrain":
        return _pretrain_loss(model, input_ids, targets, mask, b, ttt.prefix_remat_blocks(model.cfg),
                              ttt.recompute_logits, kernels.cross_entropy)
    raise ValueError(f"ttt.train_mode must be pretrain or meta, got {ttt.train_mode!r}")


def _pretrain_loss(model, input_ids, targets, mask, b, remat_blocks, recompute_logits, ce_kernel) -> LossOutput:
    B, T = input_ids.shape
    h = model.run_prefix(model.wte(input_ids), remat_blocks)
    h, _ = model.suffix(h)
    tok = token_losses(h, model.head_weight(), targets, recompute_logits, ce_kernel)
    per_mb = masked_mean(tok.view(B, T // b, b), mask.view(B, T // b, b))  # (B, T / b)
    return LossOutput(per_mb.mean(), per_mb.detach().mean(0), tok.detach())


def _meta_loss(model, input_ids, targets, mask, ttt, ilr_mult, kernels) -> LossOutput:
    B, T = input_ids.shape
    b = ttt.mini_batch_size
    h = model.run_prefix(model.wte(input_ids), ttt.prefix_remat_blocks(model.cfg))
    # The first suffix block's attention half comes before every MLP', so it never depends on phi: it runs once
    # over the whole sequence like a prefix block (first derivatives only, the full-causal window through cuDNN),
    # not once per mini-batch inside the loop, where each call is a dozen small kernels and three times that in
    # the backward. The same function: the per-mini-batch form attends over the same cached keys.
    h, _ = model.suffix.blocks[0].attention_half(h, first_order=True)
    hoisted = set(model.suffix.hoisted_names())
    inner = model.suffix.inner_names()  # a list: the order fixes the summation order of the inner grad norm
    params = dict(model.suffix.named_parameters())
    # The matrices every mini-batch uses (the head, and the suffix's outside MLP') are cast to the compute dtype
    # once, not at each of their 2 x T / b uses as autocast would: the same values, one cast and one widening of
    # the gradient per step. Their gradients are formed in the cast's backward, one matmul over all uses
    # (model/linear.py), or, with the elementwise kernels off, add up over the uses in the compute dtype. Vectors
    # (norm gains) stay in their dtype, as autocast leaves them; their gradients too are added up once, from the
    # norm kernels' partial sums (model/linear.py: shared_gain).
    dtype = compute_dtype(h)
    once = kernels.elementwise  # the weight gradients formed once per weight
    cast = shared_weight if once else (lambda p, dtype: p.to(dtype))
    gain = shared_gain if once else (lambda p: p)
    theta = {n: cast(p, dtype) if p.dim() >= 2 else gain(p) for n, p in params.items()
             if n not in inner and n not in hoisted}
    phi = {n: params[n].expand(B, *params[n].shape) for n in inner}  # phi_0, one copy per sequence
    settings = InnerSettings.build(model, ttt, kernels, ilr_mult, first_attended=True)

    def step(theta, head, phi, phi_c, caches, h, y, m, pos0):
        return inner_step(model.suffix, theta, head, phi, caches, h, y, m, pos0, settings, phi_c=phi_c)

    def last(theta, head, phi, phi_c, caches, h, y, m, pos0):
        # The last mini-batch's update would reach no loss: its loss only, no inner gradient
        phi_c = compute_copy(phi, h) if phi_c is None else phi_c
        l_t, tok, _ = minibatch_loss(model.suffix, theta, head, phi_c, caches, h, y, m, pos0, settings)
        return l_t, tok.detach()

    head, caches, phi_c = cast(model.head_weight(), dtype), None, None
    losses, toks, norms = [], [], []
    # split, not slices: the gradient of h is then one concatenation of the mini-batches' gradients, where each
    # slice's would be a zero-filled (B, T, d) tensor, all of them then added up
    hs, ys, ms = h.split(b, 1), targets.split(b, 1), mask.split(b, 1)
    for t in range(T // b):
        args = (theta, head, phi, phi_c, caches, hs[t], ys[t], ms[t], t * b)
        fn = last if t == T // b - 1 else step
        out = remat(fn, *args) if ttt.remat_inner else fn(*args)
        if fn is last:
            l_t, tok = out
        else:
            l_t, tok, phi, caches, gnorm, phi_c = out
            norms.append(gnorm)
        losses.append(l_t)
        toks.append(tok)
    per_mb = torch.stack(losses, 1)  # (B, T / b)
    norm = torch.stack(norms, 1).mean(0).detach() if norms else per_mb.new_zeros(0).detach()
    return LossOutput(per_mb.mean(), per_mb.detach().mean(0), torch.cat(toks, 1), norm)

