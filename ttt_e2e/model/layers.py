"""The small pieces of a block: RMSNorm, SwiGLU, rotary embeddings (docs/METHOD.md section 1)."""
from __future__ import annotations

import contextlib

import torch
import torch.nn as nn

from ttt_e2e.kernels.rmsnorm import rms_norm, rms_norm_residual
from ttt_e2e.kernels.qk_norm_rope import qk_norm_rope
from ttt_e2e.kernels.rope import rope
from ttt_e2e.kernels.swiglu import swiglu_gate

from .linear import linear, seq_linear


def compute_dtype(t: torch.Tensor, dtype: torch.dtype | None = None) -> torch.dtype:
    """The dtype a matmul on t (or on a tensor of t's device and `dtype`) runs in: autocast's where it is on, else
    the tensor's own."""
    device, dtype = t.device.type, dtype or t.dtype
    if not torch.amp.is_autocast_available(device):  # the meta device (FLOP counting): no autocast there
        return dtype
    return torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else dtype


def for_matmuls(x: torch.Tensor) -> torch.Tensor:
    """x cast once to the dtype its matmuls run in. Autocast casts an activation at every matmul that reads it
    (3 for q, k, v), and in the backward widens each of their gradients and adds them in fp32: one cast here
    instead, and the gradients added in the compute dtype. Under double backward (the inner loop) that is a
    dozen elementwise passes fewer per block."""
    return x.to(compute_dtype(x)) if x.is_floating_point() else x


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))
        self.kernel = True  # the Triton kernels on CUDA tensors (Transformer.use_fused_kernels)
        # Whether the result goes straight into matmuls (a block's pre-norms): then it leaves in their compute
        # dtype, rounded as for_matmuls would cast it, but by the norm's own store (no cast pass, forward or back)
        self.feeds_matmuls = False

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Statistics in at least fp32 even under bf16 autocast; the result in the input's dtype (or the matmuls').
        # On a GPU one kernel each for forward and backward (the meta step runs thousands of norms and their
        # derivatives).
        out_dtype = compute_dtype(x) if self.feeds_matmuls else None
        return rms_norm(x, self.weight, self.eps, use_kernel=None if self.kernel else False, out_dtype=out_dtype)


_FIRST_ORDER = [0]  # how many first_order_only() are open


@contextlib.contextmanager
def first_order_only():
    """Within it nothing is differentiated twice (inference's inner step: one gradient, no meta-gradient): the
    norms fused with their neighbours (add_normed, norm_rope) then run as one kernel with a first-order backward
    even with grad mode on. Outside, with grad mode on, they stay the ops that the meta step differentiates twice."""
    _FIRST_ORDER[0] += 1
    try:
        yield
    finally:
        _FIRST_ORDER[0] -= 1


def _fused(norm: nn.Module) -> bool:
    return isinstance(norm, RMSNorm) and (not torch.is_grad_enabled() or _FIRST_ORDER[0] > 0)


def add_normed(x: torch.Tensor, norm: nn.Module, h: torch.Tensor, then: nn.Module | None = None):
    """x + norm(h), a sandwich block's residual add: one kernel for an RMSNorm where nothing differentiates it twice
    (kernels/rmsnorm: rms_norm_residual), the same values as the two ops. then: the next sublayer's pre-norm,
    returns (s, then(s)) for s = x + norm(h), in the same kernel where both norms are fused."""
    if _fused(norm) and (then is None or (_fused(then) and then.kernel == norm.kernel)):
        nxt = None
        if then is not None:
            out = compute_dtype(x, torch.promote_types(x.dtype, h.dtype)) if then.feeds_matmuls else None
            nxt = (then.weight, then.eps, out)
        return rms_norm_residual(x, h, norm.weight, norm.eps, use_kernel=None if norm.kernel else False,
                                 first_order=True, then=nxt)
    s = x + norm(h)
    return s if then is None else (s, then(s))


def swiglu(x: torch.Tensor, w13: torch.Tensor, w2: torch.Tensor, kernel: bool = True) -> torch.Tensor:
    """w2( silu(w1 x) * (w3 x) ) with w13 = cat(w1, w3): both products in one matmul, whose output the gate reads
    in halves (and its gradient comes back as one tensor, x's gradient from one matmul). Weights are (out, in) like
    nn.Linear, or carry a leading batch dimension (B, out, in) when each sequence has its own copy (the inner
    weights during TTT). kernel: the gate silu(a) * b through its Triton kernels on CUDA tensors (one kernel per
    derivative instead of a dozen), and the per-sequence products through seq_linear (their weight gradients in the
    meta step: one matmul per use pair)."""
    gate = lambda ab, dim: swiglu_gate(ab, dim, use_kernel=None if kernel else False)  # noqa: E731
    x = for_matmuls(x)
    if w13.dim() == 2:
        return linear(gate(linear(x, w13), -1), w2)
    # Per-sequence weights: computed transposed, (w @ x^T)^T, so that the gradient w.r.t. w comes out contiguous
    # like w (x @ w^T gives it transposed) and the elementwise work on it and on w together (clip, SGD step,
    # their derivatives) runs vectorized; the hidden activations stay in the (B, hidden, T) layout throughout,
    # contiguous for the gate's kernels (its halves along dim 1).
    xt = x.mT
    if not kernel:
        return torch.matmul(w2, gate(torch.matmul(w13, xt), 1)).mT
    # the output goes back to (B, T, d): written in that layout (the next norm reads it without a copy)
    return seq_linear(w2, gate(seq_linear(w13, xt), 1), transposed_out=True).mT


class SwiGLU(nn.Module):
    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.w13 = nn.Parameter(torch.empty(2 * hidden, dim))  # cat(w1, w3): the gate's and the value's rows
        self.w2 = nn.Parameter(torch.empty(dim, hidden))
        self.kernel = True  # the gate's Triton kernels on CUDA tensors (Transformer.use_fused_kernels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return swiglu(x, self.w13, self.w2, self.kernel)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, kernel: bool = True) -> torch.Tensor:
    """Rotate interleaved pairs (x0, x1), (x2, x3), ... of x (B, T, H, D) by the angles of each position, cos
    and sin (T, D/2) from rope_angles: (x0, x1) -> (x0 cos - x1 sin, x1 cos + x0 sin). kernel: one Triton kernel
    per derivative on CUDA tensors (kernels/rope), else the PyTorch form."""
    return rope(x, cos, sin, use_kernel=None if kernel else False)


def norm_rope(x: torch.Tensor, norm: nn.Module, cos: torch.Tensor, sin: torch.Tensor, kernel: bool = True):
    """apply_rope(norm(x), cos, sin): QK-norm then RoPE, as one kernel for an RMSNorm where nothing differentiates
    it twice (kernels/qk_norm_rope), the same values as the two ops."""
    if _fused(norm):
        return qk_norm_rope(x, norm.weight, cos, sin, norm.eps, use_kernel=None if kernel and norm.kernel else False,
                            first_order=True)
    return apply_rope(norm(x), cos, sin, kernel)
