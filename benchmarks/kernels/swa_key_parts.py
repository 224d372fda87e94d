"""Key parts (kernels/swa/common.py: key_parts) for the suffix's row-parallel kernels: the forward and dQ at the TTT
block shapes (1024 queries against a cache + block of TK keys, W = 8192), bf16, for 1..4 parts and the automatic
choice, each timed as 10 calls in one CUDA graph (median of 15 replays, us per call), with the double backward (no
parts) for scale, and the results with 3 parts against one part's.

    python -m benchmarks.kernels.swa_key_parts      # H100 output: docs/results-history/data/swa_key_parts_h100.txt
    python -m benchmarks.kernels.swa_key_parts --tiny   # toy shapes: a smoke run (CPU: Triton's interpreter)
"""
import torch

from ttt_e2e.kernels.swa import common
from ttt_e2e.kernels.swa.backward import swa_backward_delta, swa_backward_dq
from ttt_e2e.kernels.swa.double_backward import swa_double_backward
from ttt_e2e.kernels.swa.forward import swa_forward

from benchmarks.core.cli import parser, start_run
from benchmarks.core.timing import graph_us

SHAPES = (8192, 1024, ((12, 64, (2048, 5120, 9216)), (32, 80, (9216,))))  # W, TQ, (heads, head dim, key counts)
TINY_SHAPES = (32, 16, ((2, 16, (48,)),))


def main(argv=None):
    args = parser(__doc__, "toy shapes, parts 1 and auto only (a smoke run)").parse_args(argv)
    dev, dtype, _ = start_run()
    W, TQ, heads = TINY_SHAPES if args.tiny else SHAPES
    torch.manual_seed(0)
    for H, D, tks in heads:
        for TK in tks:
            q = torch.randn(1, H, TQ, D, device=dev, dtype=dtype)
            k, v = (torch.randn(1, H, TK, D, device=dev, dtype=dtype) for _ in range(2))
            do, gq, gk, gv = (torch.randn_like(q) for _ in range(4))
            qp, scale = TK - TQ, D ** -0.5
            common.KEY_PARTS_OVERRIDE = 1
            o, lse = swa_forward(q, k, v, W, qp, 0, scale)
            delta = swa_backward_delta(o, do)
            fwd = lambda: swa_forward(q, k, v, W, qp, 0, scale)[0]  # noqa: E731
            dq = lambda: swa_backward_dq(q, k, v, do, lse, delta, W, qp, 0, scale)  # noqa: E731
            dbwd = graph_us(lambda: swa_double_backward(q, k, v, do, lse, delta, gq, gk, gv, W, qp, 0, scale, qp))
            print(f"H{H} D{D} TK{TK}: double backward {dbwd:7.1f} us (no parts)", flush=True)
            for n in (1, None) if args.tiny else (1, 2, 3, 4, None):
                common.KEY_PARTS_OVERRIDE = n
                print(f"H{H} D{D} TK{TK} parts={n or 'auto'}: fwd {graph_us(fwd):7.1f} us  dq {graph_us(dq):7.1f} us",
                      flush=True)
            common.KEY_PARTS_OVERRIDE = 1
            ref = (fwd(), dq())
            common.KEY_PARTS_OVERRIDE = 3
            got = (fwd(), dq())
            print("  rel diff 3 parts vs 1 (o, dq):",
                  [f"{((a.float() - b.float()).norm() / b.float().norm()).item():.2e}" for a, b in zip(got, ref)])
            common.KEY_PARTS_OVERRIDE = None


if __name__ == "__main__":
    main()
