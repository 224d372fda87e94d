"""The inner loss's head as one node: hidden states -> (per-token losses, their gradient w.r.t. the hidden states).

TTT's inner gradient starts at the suffix's output x (N, d): with z = x W^T, p = softmax(z) and the row weights g
of the inner loss (its masked mean),
    loss = lse(z) - z_y,    dz = g (p - e_y),    dx = dz W.
The outer backward hands this node a cotangent dl of the loss and v (N, d) of dx, and needs
    u = v W^T,    gz = g p (u - <u, p>) + dl (p - e_y),    grad x = gz W,    grad W = gz^T x + dz^T v.
<u, p> is a reduction over the 128K-wide row; taken from u it costs the double backward a second pass over the
logits and u. But <u, p> = v . (p W), and p W is what dx already holds: g p W = dx + g W_y. So
    c := g <u, p> = <v, dx> + g <v, W_y>,      gz = p (g u - c) + dl (p - e_y),
two row dots of width d, and gz in one pass (kernels/cross_entropy: ce_double_bwd_given). dx is the bf16 product
the inner step itself used, so c is the derivative of the function computed, up to dx's rounding (a d-long dot,
where the two-pass form sums bf16 u over the vocabulary).

The mask's row weights g are constants (no gradient). W's gradient goes to its WeightGrad where W is a
shared_weight (model/linear.py), as `linear` does, else it is returned.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch.autograd.function import once_differentiable

from . import kernels_apply
from .function import _bwd_torch, _fwd_grad_torch, _probs
from .kernel import ce_bwd, ce_double_bwd_given, ce_fwd_grad, ce_given_c


def _row_dot(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    acc = torch.promote_types(a.dtype, torch.float32)
    return torch.linalg.vecdot(a.to(acc), b.to(acc))


class _HeadLossAndGrad(torch.autograd.Function):
    @staticmethod
    def forward(x, W, y, g, kernel, paired):
        z = F.linear(x, W)
        N = len(y)
        # paired: dz in the first half of a (2N, V) buffer whose second half will take gz, so that W's gradient
        # from this node, dz^T v + gz^T x, is one matmul over K = 2N (in place of two, each writing W's size)
        both = z.new_empty((2 * N if paired else N, z.shape[1]))
        dz = both[:N]
        if kernel:
            loss, _, lse = ce_fwd_grad(z, y, g, out=dz)
        else:
            loss, dz_, lse = _fwd_grad_torch(z, y, g)
            dz.copy_(dz_)
        return loss, dz @ W, z, both, lse

    @staticmethod
    def setup_context(ctx, inputs, output):
        x, W, y, g, kernel, _ = inputs
        _, dx, z, both, lse = output
        ctx.save_for_backward(x, W, y, g, z, both, lse, dx)
        ctx.mark_non_differentiable(z, both, lse)
        ctx.set_materialize_grads(False)
        ctx.kernel = kernel

    @staticmethod
    @once_differentiable
    def backward(ctx, dl, v, *_):
        x, W, y, g, z, both, lse, dx = ctx.saved_tensors
        N = len(y)
        dz, paired = both[:N], len(both) == 2 * N
        if dl is None and v is None:
            return None, None, None, None, None, None
        dl = None if dl is None else dl.to(lse.dtype).contiguous()
        if v is None:
            gz = _plain_bwd(z, y, lse, dl, ctx.kernel)
            pairs = [(gz, x)]
        else:
            v = v.contiguous()
            u = torch.matmul(v, W.T, out=both[N:]) if paired else v @ W.T
            if ctx.kernel:
                c = ce_given_c(v, dx, W, y, g.to(lse.dtype).contiguous())
                gz = ce_double_bwd_given(z, y, lse, g, u, c, dl, out=u)
            else:
                W_y = W.index_select(0, y.clamp(min=0))
                c = torch.where(y >= 0, _row_dot(v, dx) + g * _row_dot(v, W_y), 0.0).to(lse.dtype)
                gz = u.copy_(_given_torch(z, y, lse, g, u, c, dl))
            pairs = [(both, torch.cat((v, x)))] if paired else [(dz, v), (gz, x)]
        gx = gz @ W if ctx.needs_input_grad[0] else None
        gW = None
        if ctx.needs_input_grad[1]:
            acc = getattr(W, "_weight_grad", None)
            if acc is not None:  # formed with W's other uses, once (model/linear.py)
                for a, b in pairs:
                    acc.add(a, b)
            else:
                gW = sum(a.T @ b for a, b in pairs)
        return gx, gW, None, None, None, None


def _plain_bwd(z, y, lse, dl, kernel):
    return ce_bwd(z, y, lse, dl) if kernel else _bwd_torch(z, y, lse, None, None, dl)[0]


def _given_torch(z, y, lse, g, u, c, dl):
    """The kernel's formula in PyTorch ops: p (g u - c) + dl (p - e_y), rows with a negative target 0."""
    p, q = _probs(z, y, lse)
    gz = p * (g[:, None] * u.to(p.dtype) - c[:, None])
    if dl is not None:
        gz += dl[:, None] * q
    return torch.where((y >= 0)[:, None], gz, 0.0).to(z.dtype)


def head_loss_and_grad(x: torch.Tensor, W: torch.Tensor, targets: torch.Tensor, weights: torch.Tensor,
                       kernel: bool | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """x (N, d) in the compute dtype, W (V, d) the head in the same dtype, targets (N,) (negative: ignored),
    weights (N,) the inner loss's row weights (constants) -> (loss (N,) in at least fp32, dx (N, d) =
    d <weights, loss> / dx in x's dtype), both differentiable once more (the outer loss). kernel: through the
    cross-entropy kernels (None: for CUDA tensors of fp32/bf16/fp16; True: also elsewhere, i.e. Triton's
    interpreter), False: the same formulas in PyTorch ops."""
    if x.dim() != 2 or W.dim() != 2 or x.shape[1] != W.shape[1] or targets.shape != x.shape[:1] \
            or weights.shape != targets.shape:
        raise ValueError(f"head_loss_and_grad: x {tuple(x.shape)}, W {tuple(W.shape)}, targets "
                         f"{tuple(targets.shape)}, weights {tuple(weights.shape)}: expected (N, d), (V, d), (N,), (N,)")
    if x.dtype != W.dtype:
        raise ValueError(f"head_loss_and_grad: x is {x.dtype}, W {W.dtype}: cast both to the compute dtype")
    if weights.requires_grad:
        raise ValueError("head_loss_and_grad: the row weights must be constants (they do not require grad)")
    if kernel is None:
        kernel = kernels_apply(x)
    kernel = kernel and x.shape[0] > 0  # an empty batch launches nothing
    acc = torch.promote_types(x.dtype, torch.float32)
    paired = torch.is_grad_enabled() and (x.requires_grad or W.requires_grad)  # a backward will come
    loss, dx, *_ = _HeadLossAndGrad.apply(x, W, targets.contiguous(), weights.to(acc).contiguous(), kernel, paired)
    return loss, dx
