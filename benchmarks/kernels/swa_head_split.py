"""Sliding-window attention at the 3B model's head dim (32 heads x 80), forward and forward + backward, at the
shapes inference runs: full causal 8K (a prompt's first chunk), SWA 32K (later chunks), a TTT block of 1024
queries against a full 8K cache and against an early 2K one. Prints CUDA-event medians (triton.testing.do_bench).

    python -m benchmarks.kernels.swa_head_split                 # the forward tile rule of kernels/swa/common.py
    python -m benchmarks.kernels.swa_head_split --fwd-tile wide # or the 128 x 64 / 8-warp forward tiles everywhere
    python -m benchmarks.kernels.swa_head_split --fwd-tile table
    python -m benchmarks.kernels.swa_head_split --tiny   # toy shapes: a smoke run (CPU: Triton's interpreter)

Run against another commit's kernels by putting that checkout first on PYTHONPATH, with `python -P -m` (how the
head dim 80 split of the forward and backward kernels was compared with the 128-wide padded tile before it;
benchmarks/RESULTS.md).
"""
import argparse

import torch

from ttt_e2e.kernels.swa import common, swa_attention

from benchmarks.core.env import describe, environment
from benchmarks.core.timing import default_device, kernel_ms

SHAPES = {  # name: (queries, keys, q_pos0, k_pos0)
    "causal-8K": (8192, 8192, 0, 0),
    "swa-32K": (32768, 32768, 0, 0),
    "block-full-cache": (1024, 9216, 16384, 16384 - 8192),
    "block-early": (1024, 3072, 2048, 0),
}
TINY_SHAPES = {"block-tiny": (16, 48, 32, 0)}


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--fwd-tile", choices=["rule", "wide", "table"], default="rule")
    p.add_argument("--heads", type=int, default=32)
    p.add_argument("--head-dim", type=int, default=80)
    p.add_argument("--window", type=int, default=8192)
    p.add_argument("--tiny", action="store_true", help="toy shapes (a smoke run; sets heads 2, head dim 16, window 32)")
    args = p.parse_args(argv)
    dev = default_device()
    print(describe(environment(dev)))
    if args.fwd_tile == "wide":
        common.CONFIG_OVERRIDES["fwd"] = common.FWD_WIDE
    elif args.fwd_tile == "table":
        common.CONFIG_OVERRIDES["fwd"] = common.tile_config("fwd", 64, torch.device(dev))
    torch.manual_seed(0)
    H, D, W = (2, 16, 32) if args.tiny else (args.heads, args.head_dim, args.window)
    dtype = torch.bfloat16 if dev == "cuda" else torch.float32
    for name, (TQ, TK, QP, KP) in (TINY_SHAPES if args.tiny else SHAPES).items():
        q, k, v = (torch.randn(1, H, n, D, device=dev, dtype=dtype, requires_grad=True) for n in (TQ, TK, TK))
        do = torch.randn_like(q)

        def fwd():
            return swa_attention(q, k, v, W, QP, KP)

        def fwd_bwd():
            torch.autograd.grad(fwd(), (q, k, v), do)

        t_f = kernel_ms(fwd, warmup=25, rep=200, return_mode="median")
        t_fb = kernel_ms(fwd_bwd, warmup=25, rep=200, return_mode="median")
        print(f"{name:17s} fwd {t_f:7.3f} ms   fwd+bwd {t_fb:7.3f} ms", flush=True)


if __name__ == "__main__":
    main()
