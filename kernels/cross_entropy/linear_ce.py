"""Cross-entropy of a linear head, l_t = lse(h_t W^T) - (h_t W^T)[y_t], differentiable twice, without keeping logits.

With a 128K vocabulary the logits dwarf everything else a token has: (b, V) in fp32 is 0.5 GB per 1K-token
mini-batch. Autograd through `h @ W.T -> float -> cross_entropy` keeps them (and their softmax) for the backward
and, in meta mode, builds the double backward out of a dozen full-size elementwise passes. Here the logits live
one chunk of rows at a time and are recomputed where needed; only lse (one float per token) is kept.

Math (z = h W^T, p = softmax(z), Y = onehot(y), gl the cotangent of l):
  backward          dz = gl (p - Y);  dh = dz W;  dW = dz^T h
  double backward   given (g_dh, g_dW):  G = g_dh W^T + h g_dW^T        (the cotangent of dz)
                    grad gl = rowsum(G (p - Y));  grad z = gl p (G - rowsum(G p))
                    grad h = grad_z W + dz g_dW;  grad W = grad_z^T h + dz^T g_dh
Matmuls run in h's dtype (the compute dtype: the caller casts W), softmax algebra in at least fp32, as
`(h @ W.T).float()` followed by F.cross_entropy computes it. A third derivative is refused.
"""
from __future__ import annotations

import torch
from torch.autograd.function import once_differentiable

CHUNK = 2048  # rows of logits alive at once: (2048, 128256) fp32 is 1 GiB


def _chunks(n: int):
    return [slice(i, min(n, i + CHUNK)) for i in range(0, n, CHUNK)]


def _acc(dtype: torch.dtype) -> torch.dtype:
    return torch.promote_types(dtype, torch.float32)


def _logits(h: torch.Tensor, W: torch.Tensor) -> torch.Tensor:
    return (h @ W.T).to(_acc(h.dtype))


def _probs_minus_onehot(z: torch.Tensor, lse: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    p = torch.exp(z - lse[:, None])
    q = p.clone()
    q[torch.arange(len(y), device=y.device), y] -= 1
    return p, q


class _LinearCE(torch.autograd.Function):
    @staticmethod
    def forward(h, W, y):
        loss = torch.empty(len(y), dtype=_acc(h.dtype), device=h.device)
        lse = torch.empty_like(loss)
        for s in _chunks(len(y)):
            z = _logits(h[s], W)
            lse[s] = torch.logsumexp(z, -1)
            loss[s] = lse[s] - z.gather(1, y[s, None]).squeeze(1)
        return loss, lse

    @staticmethod
    def setup_context(ctx, inputs, output):
        h, W, y = inputs
        ctx.save_for_backward(h, W, y, output[1])
        ctx.mark_non_differentiable(output[1])

    @staticmethod
    def backward(ctx, gl, _glse):
        h, W, y, lse = ctx.saved_tensors
        dh, dW = _LinearCEGrad.apply(h, W, y, lse, gl)
        return dh, dW, None


class _LinearCEGrad(torch.autograd.Function):
    """(h, W, y, lse, gl) -> (dh, dW): the first derivative, itself differentiable once more."""

    @staticmethod
    def forward(h, W, y, lse, gl):
        dh, dW = torch.empty_like(h), torch.zeros_like(W, dtype=_acc(W.dtype))
        for s in _chunks(len(y)):
            _, q = _probs_minus_onehot(_logits(h[s], W), lse[s], y[s])
            dz = (q * gl[s, None]).to(h.dtype)
            dh[s] = dz @ W
            dW += (dz.T @ h[s]).to(dW.dtype)
        return dh, dW.to(W.dtype)

    @staticmethod
    def setup_context(ctx, inputs, output):
        h, W, y, lse, gl = inputs
        ctx.save_for_backward(h, W, y, lse, gl)

    @staticmethod
    @once_differentiable
    def backward(ctx, g_dh, g_dW):
        h, W, y, lse, gl = ctx.saved_tensors
        acc = _acc(h.dtype)
        grad_h, grad_W = torch.zeros_like(h, dtype=acc), torch.zeros_like(W, dtype=acc)
        grad_gl = torch.zeros_like(gl)
        for s in _chunks(len(y)):
            p, q = _probs_minus_onehot(_logits(h[s], W), lse[s], y[s])
            G = torch.zeros_like(p)
            if g_dh is not None:
                G += (g_dh[s].to(h.dtype) @ W.T).to(acc)
            if g_dW is not None:
                G += (h[s] @ g_dW.to(h.dtype).T).to(acc)
            dz = (q * gl[s, None]).to(h.dtype)
            grad_gl[s] = (G * q).sum(1).to(gl.dtype)
            grad_z = (p * (G - (G * p).sum(1, keepdim=True)) * gl[s, None]).to(h.dtype)
            grad_h[s] += (grad_z @ W).to(acc)
            grad_W += (grad_z.T @ h[s]).to(acc)
            if g_dh is not None:
                grad_W += (dz.T @ g_dh[s].to(h.dtype)).to(acc)
            if g_dW is not None:
                grad_h[s] += (dz @ g_dW.to(h.dtype)).to(acc)
        return grad_h.to(h.dtype), grad_W.to(W.dtype), None, None, grad_gl


def linear_cross_entropy(h: torch.Tensor, W: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """h (N, d), W (V, d) of the same dtype, y (N,) -> per-row cross-entropy (N,) in at least fp32."""
    if h.dim() != 2 or W.dim() != 2 or h.shape[1] != W.shape[1] or y.shape != h.shape[:1]:
        raise ValueError(f"linear_cross_entropy: h {tuple(h.shape)}, W {tuple(W.shape)}, y {tuple(y.shape)}: "
                         "expected (N, d), (V, d), (N,)")
    if h.dtype != W.dtype:
        raise ValueError(f"linear_cross_entropy: h is {h.dtype}, W {W.dtype}: cast W to the compute dtype first")
    return _LinearCE.apply(h, W, y)[0]
