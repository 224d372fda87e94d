"""The SWA forward against cuDNN's (SDPA's cuDNN backend) at the 3B heads (32 x 80), GPU time only: both through
triton.testing.do_bench, which launches back to back, so neither figure holds host time. Also each call's host
time (a small shape, no synchronization in the loop), and where `swa_forward`'s host time goes (cProfile).

benchmarks/kernels/attention.py synchronizes after every call, so its figures include the host time of each call: a
fair race for long kernels, not for the inner step's 0.2 ms ones.

    python -m benchmarks.kernels.swa_fwd_vs_cudnn [--profile-host]
"""
from __future__ import annotations

import argparse
import cProfile
import pstats
import time

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel
from triton.testing import do_bench

from benchmarks.kernels.attention import visible_pairs
from ttt_e2e.kernels.swa import swa_attention, swa_mask
from ttt_e2e.kernels.swa.forward import swa_forward

H, D = 32, 80
# name: (queries, keys, window, first query's position); keys from position 0
SHAPES = {"causal 8K": (8192, 8192, 8192, 0), "inner step 1K/9K": (1024, 9216, 8192, 8192)}


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--profile-host", action="store_true", help="print cProfile's top functions of swa_forward")
    args = p.parse_args()
    g = torch.Generator(device="cuda").manual_seed(0)

    def mk(t):
        return torch.randn(1, H, t, D, device="cuda", generator=g, dtype=torch.bfloat16)

    scale = D ** -0.5
    print(f"{torch.cuda.get_device_name()}, {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}; B 1, H {H}, D {D}")
    with torch.no_grad():
        for name, (tq, tk, w, q0) in SHAPES.items():
            q, k, v = mk(tq), mk(tk), mk(tk)
            flop = 4 * visible_pairs(tq, tk, w, q0, 0) * H * D
            if tq == tk and q0 == 0 and w >= tk:
                def cudnn():
                    return F.scaled_dot_product_attention(q, k, v, is_causal=True)
            else:
                mask = swa_mask(tq, tk, w, q0, 0, device="cuda")

                def cudnn():
                    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
            ms = {"swa_attention": do_bench(lambda: swa_attention(q, k, v, w, q0, 0), warmup=100, rep=500),
                  "swa_forward": do_bench(lambda: swa_forward(q, k, v, w, q0, 0, scale), warmup=100, rep=500)}
            with sdpa_kernel([SDPBackend.CUDNN_ATTENTION]):
                ms["cuDNN"] = do_bench(cudnn, warmup=100, rep=500)
            print(f"{name}: " + ", ".join(f"{k} {1e3 * t:.0f} us ({flop / (t * 1e-3) / 1e12:.0f} TFLOP/s)"
                                          for k, t in ms.items()))
        q, k, v = mk(128), mk(128), mk(128)
        calls = {"swa_attention": lambda: swa_attention(q, k, v, 8192, 0, 0),
                 "swa_forward": lambda: swa_forward(q, k, v, 8192, 0, 0, scale),
                 "SDPA (default backend)": lambda: F.scaled_dot_product_attention(q, k, v, is_causal=True)}
        for name, fn in calls.items():
            for _ in range(20):
                fn()
            torch.cuda.synchronize()
            t0 = time.perf_counter()
            for _ in range(200):
                fn()
            t1 = time.perf_counter()
            torch.cuda.synchronize()
            print(f"host time per call (128 queries and keys), {name}: {(t1 - t0) / 200 * 1e6:.0f} us")
        if args.profile_host:
            prof = cProfile.Profile()
            prof.enable()
            for _ in range(200):
                swa_forward(q, k, v, 8192, 0, 0, scale)
            prof.disable()
            torch.cuda.synchronize()
            pstats.Stats(prof).sort_stats("tottime").print_stats(15)


if __name__ == "__main__":
    main()
