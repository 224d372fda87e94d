"""Key parts (kernels/swa/common.py: key_parts) for the suffix's row-parallel kernels: the forward and dQ (and the
double backward, which takes no parts, for scale) at the TTT block shapes (1024 queries against a cache + block of TK keys, W = 8192), bf16, for 1..4 parts
and the automatic choice, each timed as 10 calls in one CUDA graph (median of 15 replays, us per call), and the
parts' results against one part's.

    python benchmarks/swa_key_parts.py      # H100 output: benchmarks/data/swa_key_parts_h100.txt
"""
import statistics

import torch

from ttt_e2e.kernels.swa import common
from ttt_e2e.kernels.swa.forward import swa_forward
from ttt_e2e.kernels.swa.backward import swa_backward_dq, swa_backward_delta
from ttt_e2e.kernels.swa.double_backward import swa_double_backward

def graph_us(fn, inner=10, reps=15):
    fn(); torch.cuda.synchronize()
    s = torch.cuda.Stream(); s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        fn()
    torch.cuda.current_stream().wait_stream(s); torch.cuda.synchronize()
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        for _ in range(inner):
            fn()
    g.replay(); torch.cuda.synchronize()
    ts = []
    for _ in range(reps):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record(); g.replay(); b.record(); b.synchronize()
        ts.append(a.elapsed_time(b) / inner)
    return statistics.median(ts) * 1e3

torch.manual_seed(0)
W = 8192
for H, D, tks in ((12, 64, (2048, 5120, 9216)), (32, 80, (9216,))):
    for TK in tks:
        TQ = 1024
        q = torch.randn(1, H, TQ, D, device="cuda", dtype=torch.bfloat16)
        k, v, = (torch.randn(1, H, TK, D, device="cuda", dtype=torch.bfloat16) for _ in range(2))
        do, gq = (torch.randn_like(q) for _ in range(2))
        gk, gv = (torch.randn(1, H, TQ, D, device="cuda", dtype=torch.bfloat16) for _ in range(2))
        qp, scale = TK - TQ, D ** -0.5
        common.KEY_PARTS_OVERRIDE = 1
        o, lse = swa_forward(q, k, v, W, qp, 0, scale)
        delta = swa_backward_delta(o, do)
        row = {}
        for n in (1, 2, 3, 4, None):
            common.KEY_PARTS_OVERRIDE = n
            f = graph_us(lambda: swa_forward(q, k, v, W, qp, 0, scale))
            dq = graph_us(lambda: swa_backward_dq(q, k, v, do, lse, delta, W, qp, 0, scale))
            dd = graph_us(lambda: swa_double_backward(q, k, v, do, lse, delta, gq, gk, gv, W, qp, 0, scale, TK - TQ))
            row[n] = (f, dq, dd)
            print(f"H{H} D{D} TK{TK} parts={n or 'auto'}: fwd {f:7.1f} us  dq {dq:7.1f} us  dbwd {dd:7.1f} us", flush=True)
        # correctness of the parts against one part at this shape
        common.KEY_PARTS_OVERRIDE = 1
        ref = (swa_forward(q, k, v, W, qp, 0, scale)[0], swa_backward_dq(q, k, v, do, lse, delta, W, qp, 0, scale),
               swa_double_backward(q, k, v, do, lse, delta, gq, gk, gv, W, qp, 0, scale, TK - TQ)[0])
        common.KEY_PARTS_OVERRIDE = 3
        got = (swa_forward(q, k, v, W, qp, 0, scale)[0], swa_backward_dq(q, k, v, do, lse, delta, W, qp, 0, scale),
               swa_double_backward(q, k, v, do, lse, delta, gq, gk, gv, W, qp, 0, scale, TK - TQ)[0])
        print("  rel diff 3 parts vs 1:", [f"{((a.float()-b.float()).norm()/b.float().norm()).item():.2e}" for a, b in zip(got, ref)])
