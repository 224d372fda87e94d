"""Separate vs fused projections (q, k, v; W1, W3) as CUDA-graph replays, at the suffix's 1K rows and the
prefix's 8K rows, 125M and 1B widths: forward products, x's gradient (the separate ones with their adds), the
per-sequence MLP' products, and the concatenation of three gradients for comparison (us per call, the median of 7
replays of 50 calls each).

    python -m benchmarks.kernels.fused_projections
"""
import torch

from benchmarks.core.timing import graph_us

dev, bf = "cuda", torch.bfloat16


def us(fn):
    return graph_us(fn, inner=50, reps=7)


for M, d, h in ((1024, 768, 1664), (8192, 768, 1664), (1024, 2048, 5504), (8192, 2048, 5504)):
    x = torch.randn(M, d, device=dev, dtype=bf)
    Wq = [torch.randn(d, d, device=dev, dtype=bf) * 0.02 for _ in range(3)]
    Wqkv = torch.cat(Wq)
    g3 = [torch.randn(M, d, device=dev, dtype=bf) for _ in range(3)]
    gqkv = torch.cat(g3, 1)
    W13 = [torch.randn(h, d, device=dev, dtype=bf) * 0.02 for _ in range(2)]
    W13f = torch.cat(W13)
    g2 = [torch.randn(M, h, device=dev, dtype=bf) for _ in range(2)]
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
    print(f"M={M} d={d} h={h}: " + ", ".join(f"{k} {v:.1f}" for k, v in r.items()), flush=True)
