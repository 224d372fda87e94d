"""The autograd node of the clipped SGD update: every inner tensor of one step in one node.

Forward: the norms of all g (one read, one multi-tensor launch), the clip's scale from them (one launch:
clipped_scale), then per tensor one kernel writing phi_{t+1} and its compute-dtype copy. Backward, per tensor: one
pass adding the two outputs' cotangents (phi_t's cotangent) and summing d * g (the scale's cotangent; every tensor's
partial sums in one buffer, reduced once), then, once that is known, one pass writing g's cotangent through both the
update and the norm. Autograd of the same update (addcmul, a cast, the norm's own node) made about twice the passes
over the inner state, the loop's largest tensors. Differentiable once: the meta-gradient needs the update's first
derivative only (the second derivatives are the inner loss's).
"""
from __future__ import annotations

import torch
import triton

from .kernel import _clip_kernel, _sgd_bwd_g_kernel, _sgd_bwd_sum_kernel, _sgd_fwd_kernel, _sumsq_kernel


def _block(t: torch.Tensor) -> tuple[int, int]:
    return (4096, 8) if t.is_cuda else (256, 4)  # (elements per program, warps)


def _rows(t: torch.Tensor) -> torch.Tensor:
    """(B, N), contiguous (a view when t is)."""
    return t.contiguous().view(t.shape[0], -1)


def _phi_rows(t: torch.Tensor) -> torch.Tensor:
    """(B, N) with contiguous rows and any batch stride, 0 included: phi_0 is the weights expanded."""
    flat = t.flatten(1)
    return flat if flat.stride(1) == 1 else _rows(t)


def update(phi: torch.Tensor, g: torch.Tensor, scale: torch.Tensor, out: torch.Tensor, out_c: torch.Tensor) -> None:
    """out = phi + scale g, out_c = the same in out_c's dtype; (B, N) rows, phi's row contiguous, g, out and out_c
    contiguous; scale (B,) fp32. out may be phi itself (each element is read before it is written)."""
    block, warps = _block(g)
    _sgd_fwd_kernel[(triton.cdiv(g.shape[1], block), g.shape[0])](
        phi, g, out, out_c, scale, g.shape[1], phi.stride(0), BLOCK=block, num_warps=warps)


# Rows at least this long get their norm from _sumsq_kernel, shorter ones from the multi-tensor launch
WIDE_ROWS = 1 << 22


def _norms(g: list[torch.Tensor]) -> torch.Tensor:
    """(len(g), B) fp32: the 2-norm of each tensor's row (each g (B, N), contiguous). Short rows by one multi-tensor
    launch (and its finishing one) for all of them, where a norm per tensor is a launch each, which costs more than
    the work for the 125M inner state's 1.3M-element tensors. Long rows (the 3B state's 14-29M) by a kernel each at
    HBM bandwidth, which that launch falls well short of (benchmarks/RESULTS.md)."""
    B = g[0].shape[0]
    wide = [i for i, x in enumerate(g) if x.shape[1] >= WIDE_ROWS]
    narrow = [i for i in range(len(g)) if i not in wide]
    norms = {}  # tensor index -> (B,); stacked in order below (no index tensor: this runs in CUDA graph captures)
    if narrow:
        rows = [r for i in narrow for r in g[i].unbind(0)]  # tensor-major
        each = torch.stack(torch._foreach_norm(rows, 2, dtype=torch.float32)).view(len(narrow), B)
        norms.update(zip(narrow, each.unbind(0)))
    if wide:
        block = 2048 if g[0].is_cuda else 256  # 2048 x 4 warps: the fastest of 24 geometries measured at 3B
        parts = [triton.cdiv(g[i].shape[1], block) for i in wide]
        part = torch.zeros((len(wide), B, max(parts)), dtype=torch.float32, device=g[0].device)
        for j, (i, n) in enumerate(zip(wide, parts)):
            _sumsq_kernel[(n, B)](g[i], part[j], g[i].shape[1], part.shape[2], BLOCK=block, num_warps=4)
        norms.update(zip(wide, part.sum(2).sqrt().unbind(0)))
    return torch.stack([norms[i] for i in range(len(g))])


def clipped_scale(g: list[torch.Tensor], eta, max_norm: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(scale, d scale / d sq, ||g||), each (B,) fp32, of the clip over all of g (each (B, N)): clip.clip_scale's
    values from the norms in one more launch, where its elementwise ops take a dozen per inner step. eta: a float
    or a 0-d tensor; max_norm <= 0: no clip."""
    norms = _norms(g)
    nt, B = norms.shape
    scale, coef, norm = torch.empty((3, B), dtype=torch.float32, device=norms.device).unbind(0)
    eta_t = eta.reshape(1) if isinstance(eta, torch.Tensor) else norms  # a pointer, read only if ETA_IS_PTR
    _clip_kernel[(1,)](norms, eta_t, scale, coef, norm, nt, B, 0.0 if isinstance(eta, torch.Tensor) else float(eta),
                       float(max_norm), torch.finfo(torch.float32).tiny, ETA_IS_PTR=isinstance(eta, torch.Tensor),
                       CLIP=max_norm > 0, BLOCK_T=max(2, triton.next_power_of_2(nt)),
                       BLOCK_B=max(2, triton.next_power_of_2(B)))
    return scale, coef, norm


class _ClippedSGD(torch.autograd.Function):
    @staticmethod
    def forward(ctx, eta, max_norm, n, *tensors):
        phi, g = tensors[:n], [_rows(x) for x in tensors[n:]]
        scale, coef, norm_out = clipped_scale(g, eta, max_norm)
        nxt, nxt_c = [], []
        for p, x, shape in zip(phi, g, (t.shape for t in tensors[n:])):
            out, out_c = torch.empty(x.shape, dtype=p.dtype, device=x.device), torch.empty_like(x)
            update(_phi_rows(p), x, scale, out, out_c)
            nxt.append(out.view(shape))
            nxt_c.append(out_c.view(shape))
        ctx.n, ctx.shapes = n, [t.shape for t in tensors[n:]]
        ctx.save_for_backward(*g, scale, coef)
        ctx.set_materialize_grads(False)
        ctx.mark_non_differentiable(norm_out)
        return (*nxt, *nxt_c, norm_out)

    @staticmethod
    def backward(ctx, *grads):
        n = ctx.n
        *g, scale, coef = ctx.saved_tensors
        d_next, d_copy = grads[:n], grads[n:2 * n]
        # Every tensor's partial sums of d * g go to its own columns of one buffer, added up by one reduction
        block, warps = _block(g[0])
        blocks = [triton.cdiv(x.shape[1], block) for x in g]
        part = torch.zeros(scale.shape[0], sum(blocks), dtype=torch.float32, device=scale.device)
        ds, start = [], 0
        for x, dn, dc, nb in zip(g, d_next, d_copy, blocks):
            start += nb
            if dn is None and dc is None:
                ds.append(None)
                continue
            d = torch.empty(x.shape, dtype=scale.dtype, device=x.device)
            dn, dc = (d if t is None else _rows(t) for t in (dn, dc))
            _sgd_bwd_sum_kernel[(nb, x.shape[0])](
                dn, dc, x, d, part[:, start - nb:], x.shape[1], part.stride(0), HAS_NEXT=dn is not d,
                HAS_COPY=dc is not d, BLOCK=block, num_warps=warps)
            ds.append(d)
        two_dsq = (2 * part.sum(1) * coef).contiguous()
        dg = []
        for x, d in zip(g, ds):
            if d is None:  # only the clip's norm reaches this g
                dg.append((two_dsq.view(-1, 1) * x.float()).to(x.dtype))
                continue
            out = torch.empty_like(x)
            block, warps = _block(x)
            _sgd_bwd_g_kernel[(triton.cdiv(x.shape[1], block), x.shape[0])](
                d, x, out, scale, two_dsq, x.shape[1], BLOCK=block, num_warps=warps)
            dg.append(out)
        d_phi = [None if d is None else d.view(s) for d, s in zip(ds, ctx.shapes)]
        return (None, None, None, *d_phi, *[x.view(s) for x, s in zip(dg, ctx.shapes)])
