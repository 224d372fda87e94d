"""Separate vs fused projections (q, k, v; W1, W3) as CUDA-graph replays, at the suffix's 1K rows and the
prefix's 8K rows, 125M and 1B widths: forward products, x's gradient (the separate ones with their adds), the
per-sequence MLP' products, and the concatenation of three gradients for comparison (us per call, the median of 7
replays of 50 calls each).

    python -m benchmarks.kernels.fused_projections
    python -m benchmarks.kernels.fused_projections --tiny     # toy widths: a smoke run (the CPU's too)
"""
from __future__ import annotations

import torch

from benchmarks.core.cli import parser, start_run
from benchmarks.core.timing import graph_us

SHAPES = ((1024, 768, 1664), (8192, 768, 1664), (1024, 2048, 5504), (8192, 2048, 5504))  # rows, d_model, MLP width
TINY_SHAPES = ((32, 16, 24),)


def products(M: int, d: int, h: int, us, dev: str, dt: torch.dtype) -> dict:
    """us per call of each separate and fused product at M rows, width d, MLP width h."""
    x = torch.randn(M, d, device=dev, dtype=dt)
    Wq = [torch.randn(d, d, device=dev, dtype=dt) * 0.02 for _ in range(3)]
    Wqkv = torch.cat(Wq)
    g3 = [torch.randn(M, d, device=dev, dtype=dt) for _ in range(3)]
    gqkv = torch.cat(g3, 1)
    W13 = [torch.randn(h, d, device=dev, dtype=dt) * 0.02 for _ in range(2)]
    W13f = torch.cat(W13)
    g2 = [torch.randn(M, h, device=dev, dtype=dt) for _ in range(2)]
    g2f = torch.cat(g2, 1)
    xt = x.T.unsqueeze(0)
    r = {}
    r["qkv fwd sep"] = us(lambda: [x @ w.T for w in Wq])
    r["qkv fwd fused"] = us(lambda: x @ Wqkv.T)
    r["qkv dx sep"] = us(lambda: (g3[0] @ Wq[0]) + (g3[1] @ Wq[1]) + (g3[2] @ Wq[2]))
    r["qkv dx fused"] = us(lambda: gqkv @ Wqkv)
    r["w13 fwd sep"] = us(lambda: [x @ w.T for w in W13])
    r["w13 fwd fused"] = us(lambda: x @ W13f.T)
    r["w13 dx sep"] = us(lambda: (g2[0] @ W13[0]) + (g2[1] @ W13[1]))
    r["w13 dx fused"] = us(lambda: g2f @ W13f)
    r["prime bmm sep"] = us(lambda: [torch.bmm(w.unsqueeze(0), xt) for w in W13])
    r["prime bmm fused"] = us(lambda: torch.bmm(W13f.unsqueeze(0), xt))
    r["cat qkv grads"] = us(lambda: torch.cat(g3, 1))
    return r


def main(argv=None):
    args = parser(__doc__, "toy widths, one replay (a smoke run)").parse_args(argv)
    dev, dt, _ = start_run()
    inner, reps = (2, 1) if args.tiny else (50, 7)
    for M, d, h in TINY_SHAPES if args.tiny else SHAPES:
        r = products(M, d, h, lambda fn: graph_us(fn, inner=inner, reps=reps), dev, dt)
        print(f"M={M} d={d} h={h}: " + ", ".join(f"{k} {v:.1f}" for k, v in r.items()), flush=True)


if __name__ == "__main__":
    main()
