"""The SWA forward against cuDNN's (SDPA's cuDNN backend) at the 3B heads (32 x 80), GPU time only: both through
triton.testing.do_bench, which launches back to back, so neither figure holds host time. Also each call's host
time (a small shape, no synchronization in the loop), and where `swa_forward`'s host time goes (cProfile).

benchmarks/kernels/attention.py synchronizes after every call, so its figures include the host time of each call: a
fair race for long kernels, not for the inner step's 0.2 ms ones.

    python -m benchmarks.kernels.swa_fwd_vs_cudnn [--profile-host]
    python -m benchmarks.kernels.swa_fwd_vs_cudnn --tiny     # toy shapes: a smoke run (CPU: default SDPA backend)
"""
from __future__ import annotations

import argparse
import contextlib
import cProfile
import pstats
import time

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel
from ttt_e2e.kernels.swa import swa_attention, swa_mask
from ttt_e2e.kernels.swa.forward import swa_forward

from benchmarks.core.env import describe, environment
from benchmarks.core.timing import default_device, kernel_ms
from benchmarks.kernels.attention import visible_pairs

HEADS = (32, 80)
# name: (queries, keys, window, first query's position); keys from position 0
SHAPES = {"causal 8K": (8192, 8192, 8192, 0), "inner step 1K/9K": (1024, 9216, 8192, 8192)}
TINY_HEADS, TINY_SHAPES = (2, 16), {"causal 64": (64, 64, 64, 0), "inner step 16/48": (16, 48, 32, 32)}


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--profile-host", action="store_true", help="print cProfile's top functions of swa_forward")
    p.add_argument("--tiny", action="store_true", help="toy shapes, few calls (a smoke run, the CPU's too)")
    args = p.parse_args(argv)
    device = default_device()
    cuda = device == "cuda"
    (H, D), shapes = (TINY_HEADS, TINY_SHAPES) if args.tiny else (HEADS, SHAPES)
    warm, n_calls = (1, 1) if args.tiny else (20, 200)
    g = torch.Generator(device=device).manual_seed(0)

    def mk(t):
        return torch.randn(1, H, t, D, device=device, generator=g, dtype=torch.bfloat16 if cuda else torch.float32)

    def sync():
        if cuda:
            torch.cuda.synchronize()

    scale = D ** -0.5
    print(f"{describe(environment(device))}; B 1, H {H}, D {D}")
    with torch.no_grad():
        for name, (tq, tk, w, q0) in shapes.items():
            q, k, v = mk(tq), mk(tk), mk(tk)
            flop = 4 * visible_pairs(tq, tk, w, q0, 0) * H * D
            if tq == tk and q0 == 0 and w >= tk:
                def cudnn():
                    return F.scaled_dot_product_attention(q, k, v, is_causal=True)
            else:
                mask = swa_mask(tq, tk, w, q0, 0, device=device)

                def cudnn():
                    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
            ms = {"swa_attention": kernel_ms(lambda: swa_attention(q, k, v, w, q0, 0)),
                  "swa_forward": kernel_ms(lambda: swa_forward(q, k, v, w, q0, 0, scale))}
            with sdpa_kernel([SDPBackend.CUDNN_ATTENTION]) if cuda else contextlib.nullcontext():
                ms["cuDNN"] = kernel_ms(cudnn)
            print(f"{name}: " + ", ".join(f"{k} {1e3 * t:.0f} us ({flop / (t * 1e-3) / 1e12:.0f} TFLOP/s)"
                                          for k, t in ms.items()))
        q, k, v = (mk(32 if args.tiny else 128) for _ in range(3))
        calls = {"swa_attention": lambda: swa_attention(q, k, v, 8192, 0, 0),
                 "swa_forward": lambda: swa_forward(q, k, v, 8192, 0, 0, scale),
                 "SDPA (default backend)": lambda: F.scaled_dot_product_attention(q, k, v, is_causal=True)}
        for name, fn in calls.items():
            for _ in range(warm):
                fn()
            sync()
            t0 = time.perf_counter()
            for _ in range(n_calls):
                fn()
            t1 = time.perf_counter()
            sync()
            print(f"host time per call (128 queries and keys), {name}: {(t1 - t0) / n_calls * 1e6:.0f} us")
        if args.profile_host:
            prof = cProfile.Profile()
            prof.enable()
            for _ in range(n_calls):
                swa_forward(q, k, v, 8192, 0, 0, scale)
            prof.disable()
            sync()
            pstats.Stats(prof).sort_stats("tottime").print_stats(15)


if __name__ == "__main__":
    main()
