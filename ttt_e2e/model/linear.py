"""Linear maps of the meta step whose weight gradients are formed in one matmul per weight, not one per use.

The meta step uses every suffix matrix and the head 2 T / b times (the forward and the inner backward of each
mini-batch), and each inner state phi_t twice. Autograd gives each use its own weight-gradient matmul, whose
output, as large as the weight, it then adds to the others: at 1B the head alone makes 16 (vocab x d) outputs
and 15 full-size adds per step. Here each use leaves the two factors of its weight gradient, dW_i = a_i^T b_i,
in a `WeightGrad`; one node forms the sum once all uses are differentiated, as one matmul over the concatenated
factors (K = the uses' rows together) or as matmuls accumulating into one output, whichever moves fewer bytes.

    shared_weight(p, dtype)   p cast once per step; the uses of the copy defer their gradients to the cast's node
    shared_gain(g)            a norm gain likewise, its uses' gradients kept as the norm kernels' partial sums
    linear(x, w)              x w^T (w: (out, in)); deferred where w came from shared_weight
    seq_linear(w, x)          w x for per-sequence weights w (B, out, in), x (B, in, T): the inner weights phi_t,
                              whose two uses (forward, inner backward) are summed in one matmul by the forward's node.
                              Activations in these products are often transposed views of (B, T, features) tensors;
                              each product is written in the layout its consumer reads contiguously (the gradient of
                              x in x's, of y in y's: `_bmm`), so that no norm or gate kernel has to copy it first

The inner gradient itself (the backward run while the outer graph records it) is computed as usual: deferral
only happens in the last backward, where no graph is recorded (`torch.is_grad_enabled()` is off).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch.autograd.function import once_differentiable

from ttt_e2e.kernels.rmsnorm import GainGrad


class WeightGrad:
    """The factors (a_i, b_i) of a weight's gradient sum_i a_i^T b_i (shared weights, a (N, out), b (N, in)) or
    sum_i a_i b_i^T (per-sequence weights, a (B, out, T), b (B, in, T)). Formed once; a factor arriving after
    that would be lost, so it is an error (it would mean a use was differentiated after the node that sums)."""

    def __init__(self, per_sequence: bool):
        self.per_sequence = per_sequence
        self.pairs: list[tuple[torch.Tensor, torch.Tensor]] = []
        self.done = False

    def add(self, a: torch.Tensor, b: torch.Tensor) -> None:
        if self.done:
            raise RuntimeError("a weight-gradient factor arrived after the weight's gradient was formed: a use of the "
                               "weight was differentiated after the node that sums its uses")
        self.pairs.append((a, b))

    def total(self) -> torch.Tensor | None:
        self.done = True
        pairs, self.pairs = self.pairs, []
        if not pairs:
            return None
        mm = (lambda a, b: torch.bmm(a, b.mT)) if self.per_sequence else (lambda a, b: a.T @ b)
        if len(pairs) == 1:
            return mm(*pairs[0])
        out = mm(*pairs[0])
        # Bytes either way: concatenating reads and writes every factor once; accumulating reads and writes the
        # output once per further use. The head (a_i as wide as the vocabulary) concatenates at d >= ~1K,
        # accumulates below; a 2-use inner state accumulates.
        cat = 2 * sum(a.numel() + b.numel() for a, b in pairs)
        chain = 2 * out.numel() * (len(pairs) - 1)
        if cat < chain:
            k = 2 if self.per_sequence else 0
            return mm(torch.cat([a for a, _ in pairs], k), torch.cat([b for _, b in pairs], k))
        for a, b in pairs[1:]:
            if self.per_sequence:
                out.baddbmm_(a, b.mT)
            else:
                out.addmm_(a.T, b)
        return out


def _rows(t: torch.Tensor) -> torch.Tensor:
    return t.reshape(-1, t.shape[-1])


def _transposed(t: torch.Tensor) -> bool:
    """Whether t (B, m, n) is the transposed view of a contiguous (B, n, m) tensor (as x.mT of activations)."""
    return t.stride(-2) == 1 and t.stride(-1) != 1


def _bmm(a: torch.Tensor, b: torch.Tensor, transposed: bool) -> torch.Tensor:
    """a @ b, batched; transposed: computed as (b^T a^T)^T, the result a transposed view of a contiguous tensor."""
    return torch.bmm(b.mT, a.mT).mT if transposed else torch.bmm(a, b)


def _dx(w: torch.Tensor, gy: torch.Tensor, seq: bool, x: torch.Tensor) -> torch.Tensor:
    return _bmm(w.mT, gy, _transposed(x)) if seq else gy @ w


class _Linear(torch.autograd.Function):
    """y = x w^T (shared w) or w x (per-sequence w)."""

    @staticmethod
    def forward(x, w, acc, transposed_out):
        return _bmm(w, x, transposed_out) if acc.per_sequence else F.linear(x, w)

    @staticmethod
    def setup_context(ctx, inputs, output):
        x, w, acc, _ = inputs
        ctx.save_for_backward(x, w)
        ctx.acc = acc

    @staticmethod
    def backward(ctx, gy):
        x, w = ctx.saved_tensors
        acc, seq = ctx.acc, ctx.acc.per_sequence
        need_x, need_w = ctx.needs_input_grad[:2]
        if torch.is_grad_enabled():  # the inner gradient: differentiable, computed now
            if seq and acc.pairs:
                raise RuntimeError("seq_linear: a third derivative is not supported")
            dx, dw = _LinearBackward.apply(x, w, gy, acc, need_x, need_w)
            return dx, dw, None, None
        dx = _dx(w, gy, seq, x) if need_x else None
        dw = None
        if need_w:
            acc.add(gy, x) if seq else acc.add(_rows(gy), _rows(x))
            if seq:  # this node is the inner state's last use in the backward: sum its two uses now
                dw = acc.total()
        return dx, dw, None, None


class _LinearBackward(torch.autograd.Function):
    """(x, w, gy) -> (dx, dw) of `_Linear`, differentiable once: its w-cotangent goes to w's WeightGrad."""

    @staticmethod
    def forward(x, w, gy, acc, need_x, need_w):
        seq = acc.per_sequence
        dx = _dx(w, gy, seq, x) if need_x else None
        dw = ((gy @ x.mT) if seq else _rows(gy).T @ _rows(x)) if need_w else None
        return dx, dw

    @staticmethod
    def setup_context(ctx, inputs, output):
        x, w, gy, acc, _, _ = inputs
        ctx.save_for_backward(x, w, gy)
        ctx.acc = acc
        ctx.set_materialize_grads(False)

    @staticmethod
    @once_differentiable
    def backward(ctx, g_dx, g_dw):
        x, w, gy = ctx.saved_tensors
        acc, seq = ctx.acc, ctx.acc.per_sequence
        need_x, need_w, need_gy = ctx.needs_input_grad[:3]
        gx = ggy = None
        if g_dw is not None and need_x:
            gx = _bmm(g_dw.mT, gy, _transposed(x)) if seq else gy @ g_dw
        if need_gy:
            if g_dx is not None:
                ggy = _bmm(w, g_dx, _transposed(gy)) if seq else g_dx @ w.T
            if g_dw is not None:
                term = _bmm(g_dw, x, _transposed(gy)) if seq else x @ g_dw.T
                ggy = term if ggy is None else ggy + term
        if g_dx is not None and need_w:
            acc.add(gy, g_dx) if seq else acc.add(_rows(gy), _rows(g_dx))
        return gx, None, ggy, None, None, None


class _SharedCast(torch.autograd.Function):
    """p -> p in dtype; the backward forms the gradient of every deferred use of the copy (and adds any other). acc:
    a WeightGrad, or a GainGrad for a norm gain (shared_gain)."""

    @staticmethod
    def forward(p, dtype, acc):
        return p.to(dtype) if p.dtype != dtype else p.view_as(p)

    @staticmethod
    def setup_context(ctx, inputs, output):
        ctx.acc, ctx.dtype = inputs[2], inputs[0].dtype
        ctx.set_materialize_grads(False)

    @staticmethod
    @once_differentiable
    def backward(ctx, grad):
        total = ctx.acc.total()
        if grad is not None:
            total = grad if total is None else total + grad
        return (None if total is None else total.to(ctx.dtype)), None, None


def shared_weight(p: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """p (out, in) cast to dtype, for a step that uses it many times through `linear`: their weight gradients
    are formed together in the cast's backward."""
    acc = WeightGrad(per_sequence=False)
    w = _SharedCast.apply(p, dtype, acc)
    w._weight_grad = acc
    return w


def shared_gain(g: torch.Tensor) -> torch.Tensor:
    """A norm gain g (D,) for a step that uses it in many norms: the norm kernels leave the partial sums of its
    gradient in a GainGrad (kernels/rmsnorm), added up in one reduction by the backward of this view."""
    acc = GainGrad()
    v = _SharedCast.apply(g, g.dtype, acc)
    v._gain_grad = acc
    return v


def linear(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """x (..., in) w^T, w (out, in): F.linear, with the weight gradient deferred where w is a shared_weight."""
    acc = getattr(w, "_weight_grad", None)
    if acc is None or not torch.is_grad_enabled():
        return F.linear(x, w)
    return _Linear.apply(x.to(w.dtype), w, acc, False)  # w is in the compute dtype: the cast autocast would make


def seq_linear(w: torch.Tensor, x: torch.Tensor, transposed_out: bool = False) -> torch.Tensor:
    """w (B, out, in) @ x (B, in, T): one weight per sequence. Differentiated twice (the meta step), the
    gradients of its two uses (this product and the inner backward's w^T gy) come out of one node.
    transposed_out: the result (B, out, T) as the transposed view of a contiguous (B, T, out) tensor (for a caller
    that reads it back in (B, T, out))."""
    if not torch.is_grad_enabled():
        return _bmm(w, x.to(w.dtype), transposed_out)
    return _Linear.apply(x.to(w.dtype), w, WeightGrad(per_sequence=True), transposed_out)
