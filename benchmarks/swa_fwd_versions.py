"""The SWA forward kernel of this checkout at the 3B shapes (head dim 80 = 64 + 16, 32 heads), timed with
triton.testing.do_bench; run it from two checkouts in one GPU session to compare kernel versions.

    python benchmarks/swa_fwd_versions.py --label this
    PYTHONPATH=/path/to/other/checkout python benchmarks/swa_fwd_versions.py --label other

Shapes: a prefill chunk of the prefix (8192 queries at position 8192 against 16384 keys, W 8192) and an inner
step's forward (1024 queries at 8192 against 9216 keys), each as one key source, key parts as the rule picks.
"""
from __future__ import annotations

import argparse

import torch
from triton.testing import do_bench

from attention import visible_pairs  # benchmarks/attention.py (the script's own folder is on sys.path)
from ttt_e2e.kernels.swa.forward import swa_forward

SHAPES = {"prefix chunk 8K/16K": (8192, 16384, 8192, 8192, 0), "inner step 1K/9K": (1024, 9216, 8192, 8192, 0)}


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--label", default="this")
    p.add_argument("--reps", type=int, default=5, help="do_bench runs per shape (the median of their medians)")
    args = p.parse_args()
    H, D = 32, 80
    for name, (tq, tk, w, q0, k0) in SHAPES.items():
        g = torch.Generator(device="cuda").manual_seed(0)
        q, k, v = (torch.randn(1, H, t, D, device="cuda", generator=g, dtype=torch.bfloat16) for t in (tq, tk, tk))
        flop = 4 * D * H * visible_pairs(tq, tk, w, q0, k0)
        ms = sorted(do_bench(lambda: swa_forward(q, k, v, w, q0, k0, D ** -0.5), warmup=50, rep=300)
                    for _ in range(args.reps))[args.reps // 2]
        print(f"{args.label}: {name}: {1e3 * ms:.1f} us, {flop / ms / 1e9:.0f} TFLOP/s", flush=True)


if __name__ == "__main__":
    main()
