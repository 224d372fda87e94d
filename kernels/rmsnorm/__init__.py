"""RMSNorm with forward and backward Triton kernels, differentiable twice.

    from ttt_e2e.kernels.rmsnorm import rms_norm
    y = rms_norm(x, w, eps)          # over the last dim; statistics in fp32; y in x's dtype
    y = rms_norm_residual(r, x, w, eps)   # r + rms_norm(x, w, eps), one pass where nothing is differentiated
    y, z = rms_norm_residual(r, x, w, eps, then=(w2, eps2, dtype))   # and z = rms_norm(y, w2, eps2) in the pass

A gain that carries a `GainGrad` (`w._gain_grad`, set by model/linear.py: shared_gain) gets its gradient as the
kernels' partial sums, for the caller to add up once over all its uses (function.py).

One kernel each for the forward, the backward and the double backward instead of the eight, twelve and about
thirty elementwise/reduction kernels of the PyTorch form (`rms_norm_reference`), which the meta step runs
thousands of times.
"""
from __future__ import annotations

import torch

from .function import GainGrad, _RMSNorm, _RMSNormResidual
from .kernel import row_layout
from .reference import rms_norm_reference

__all__ = ["GainGrad", "rms_norm", "rms_norm_reference", "rms_norm_residual"]

_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def rms_norm(x: torch.Tensor, w: torch.Tensor, eps: float, use_kernel: bool | None = None,
             out_dtype: torch.dtype | None = None) -> torch.Tensor:
    """use_kernel None: the kernels for CUDA tensors of fp32/bf16/fp16, the reference otherwise (float64, CPU).
    out_dtype: the result's dtype (default x's): the kernels round to it as they store, the same values as a cast
    after the norm, without the cast's passes over memory (or its backward's)."""
    if use_kernel is None:
        use_kernel = x.is_cuda and x.dtype in _DTYPES and w.dtype in _DTYPES
    if not use_kernel:
        y = rms_norm_reference(x, w, eps)
        return y if out_dtype is None else y.to(out_dtype)
    if w.shape != x.shape[-1:]:
        raise ValueError(f"rms_norm: weight {tuple(w.shape)} does not match the last dim of x {tuple(x.shape)}")
    if out_dtype == x.dtype:
        out_dtype = None
    if row_layout(x) is None:
        x = x.contiguous()
    # a strided view of heads (a fused QKV projection's q or k) is read where it lies: kernel.py
    rows = x.view(-1, x.shape[-1]) if x.is_contiguous() else x
    y, _ = _RMSNorm.apply(rows, w.contiguous(), eps, getattr(w, "_gain_grad", None), out_dtype)
    return y.view(x.shape)


def rms_norm_residual(res: torch.Tensor, x: torch.Tensor, w: torch.Tensor, eps: float,
                      use_kernel: bool | None = None, first_order: bool = False, then=None):
    """res + rms_norm(x, w, eps): a sandwich block's residual add after its post-norm. Where grad mode is off
    (inference), or first_order promises that nothing differentiates the result twice, one kernel reads x and res
    and writes the sum: the norm's output never goes to memory (benchmarks/RESULTS.md). Otherwise the two ops,
    differentiable twice.
    then = (w2, eps2, out_dtype2): the next sublayer's pre-norm too; returns (s, rms_norm(s, w2, eps2) in out_dtype2,
    None: s's dtype), in the same kernel where that runs (s is then read once, and in the backward the pre-norm's
    dx kernel adds s's other cotangent: no separate add)."""
    if use_kernel is None:
        use_kernel = x.is_cuda and x.dtype in _DTYPES and w.dtype in _DTYPES and res.dtype in _DTYPES
    if not use_kernel or (torch.is_grad_enabled() and not first_order):
        s = res + rms_norm(x, w, eps, use_kernel=use_kernel)
        return s if then is None else (s, rms_norm(s, then[0], then[1], use_kernel=use_kernel, out_dtype=then[2]))
    if w.shape != x.shape[-1:] or res.shape != x.shape or (then is not None and then[0].shape != w.shape):
        raise ValueError(f"rms_norm_residual: weight {tuple(w.shape)}, residual {tuple(res.shape)} or next weight "
                         f"{None if then is None else tuple(then[0].shape)} do not match x {tuple(x.shape)}")
    if row_layout(x) is None:
        x = x.contiguous()
    rows = x.view(-1, x.shape[-1]) if x.is_contiguous() else x
    w2, eps2, out_dtype2 = (None, 0.0, None) if then is None else (then[0].contiguous(), *then[1:])
    s, _, y2, _ = _RMSNormResidual.apply(res.contiguous().view(-1, x.shape[-1]), rows, w.contiguous(), eps, w2, eps2,
                                         out_dtype2)
    return s.view(x.shape) if then is None else (s.view(x.shape), y2.view(x.shape))
