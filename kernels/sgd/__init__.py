"""The inner loop's clipped SGD step with Triton kernels (fp32 phi, g in a narrower compute dtype).

    from ttt_e2e.kernels.sgd import clipped_sgd
    nxt, nxt_c, norm = clipped_sgd(phi, g, eta, max_norm)   # lists of (B, ...) tensors; norm (B,)
    sgd_update_(phi_i, g_i, scale, out, out_c)               # no autograd, out may be phi_i: inference

phi_{t+1} = phi_t + scale g with scale = -eta min(1, max_norm / ||g||), the norm per sequence over every
tensor; returns phi_{t+1} in phi's dtype and in g's (the copy the next mini-batch computes with). Differentiable
once w.r.t. phi and g; eta (a float or a 0-d tensor) and max_norm are constants.
"""
from __future__ import annotations

import torch

from .function import _ClippedSGD, _phi_rows, _rows, clipped_scale, update
from .reference import clipped_sgd_reference

__all__ = ["clipped_scale", "clipped_sgd", "clipped_sgd_reference", "sgd_update_"]


def clipped_sgd(phi: list[torch.Tensor], g: list[torch.Tensor], eta, max_norm: float):
    if len(phi) != len(g) or not phi:
        raise ValueError(f"clipped_sgd: as many phi as g tensors, at least one (got {len(phi)} and {len(g)})")
    for p, x in zip(phi, g):
        if p.shape != x.shape or p.dtype != torch.float32 or x.dtype not in (torch.bfloat16, torch.float16) \
                or p.device != x.device:
            raise ValueError(f"clipped_sgd: phi fp32 and g bf16/fp16 of one shape and device expected, got "
                             f"phi {tuple(p.shape)} {p.dtype} {p.device}, g {tuple(x.shape)} {x.dtype} {x.device}")
    *out, norm = _ClippedSGD.apply(eta, max_norm, len(phi), *phi, *g)
    return out[:len(phi)], out[len(phi):], norm


def sgd_update_(phi: torch.Tensor, g: torch.Tensor, scale: torch.Tensor, out: torch.Tensor,
                out_c: torch.Tensor) -> None:
    """out = phi + scale g (scale (B,), one per sequence) and out_c = the same in out_c's dtype, in one pass, with
    no autograd; out may be phi itself. phi, out fp32, g and out_c contiguous (B, ...) of one shape."""
    if not (phi.shape == g.shape == out.shape == out_c.shape) or scale.shape != g.shape[:1] \
            or not (out.is_contiguous() and out_c.is_contiguous()) or out.dtype != torch.float32:
        raise ValueError(f"sgd_update_: phi {tuple(phi.shape)}, g {tuple(g.shape)}, out {tuple(out.shape)} "
                         f"({out.dtype}, contiguous: {out.is_contiguous()}), out_c {tuple(out_c.shape)}, scale "
                         f"{tuple(scale.shape)}: expected one (B, ...) shape, contiguous fp32 out, scale (B,)")
    update(_phi_rows(phi), _rows(g), scale.float().contiguous(), out.view(out.shape[0], -1),
           out_c.view(out_c.shape[0], -1))
