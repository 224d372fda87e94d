"""Sliding-window attention at the 3B model's head dim (32 heads x 80), forward and forward + backward, at the
shapes inference runs: full causal 8K (a prompt's first chunk), SWA 32K (later chunks), a TTT block of 1024
queries against a full 8K cache and against an early 2K one. Prints CUDA-event medians (triton.testing.do_bench).

    python -m benchmarks.kernels.swa_head_split                 # the forward tile rule of kernels/swa/common.py
    python -m benchmarks.kernels.swa_head_split --fwd-tile wide # or the 128 x 64 / 8-warp forward tiles everywhere
    python -m benchmarks.kernels.swa_head_split --fwd-tile table

Run against another commit's kernels by putting that checkout first on PYTHONPATH (how the head dim 80 split of
the forward and backward kernels was compared with the 128-wide padded tile before it; benchmarks/RESULTS.md).
"""
import argparse

import torch
import triton

from ttt_e2e.kernels.swa import common, swa_attention

SHAPES = {  # name: (queries, keys, q_pos0, k_pos0)
    "causal-8K": (8192, 8192, 0, 0),
    "swa-32K": (32768, 32768, 0, 0),
    "block-full-cache": (1024, 9216, 16384, 16384 - 8192),
    "block-early": (1024, 3072, 2048, 0),
}


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--fwd-tile", choices=["rule", "wide", "table"], default="rule")
    p.add_argument("--heads", type=int, default=32)
    p.add_argument("--head-dim", type=int, default=80)
    p.add_argument("--window", type=int, default=8192)
    args = p.parse_args()
    if args.fwd_tile == "wide":
        common.CONFIG_OVERRIDES["fwd"] = common.FWD_WIDE
    elif args.fwd_tile == "table":
        common.CONFIG_OVERRIDES["fwd"] = common.tile_config("fwd", 64, torch.device("cuda"))
    torch.manual_seed(0)
    H, D, W = args.heads, args.head_dim, args.window
    for name, (TQ, TK, QP, KP) in SHAPES.items():
        q, k, v = (torch.randn(1, H, n, D, device="cuda", dtype=torch.bfloat16, requires_grad=True)
                   for n in (TQ, TK, TK))
        do = torch.randn_like(q)

        def fwd():
            return swa_attention(q, k, v, W, QP, KP)

        def fwd_bwd():
            torch.autograd.grad(fwd(), (q, k, v), do)

        t_f = triton.testing.do_bench(fwd, warmup=25, rep=200, return_mode="median")
        t_fb = triton.testing.do_bench(fwd_bwd, warmup=25, rep=200, return_mode="median")
        print(f"{name:17s} fwd {t_f:7.3f} ms   fwd+bwd {t_fb:7.3f} ms", flush=True)


if __name__ == "__main__":
    main()
