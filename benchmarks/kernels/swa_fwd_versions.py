"""The SWA forward kernel of this checkout at the 3B shapes (head dim 80 = 64 + 16, 32 heads), timed with
triton.testing.do_bench; run it from two checkouts in one GPU session to compare kernel versions.

    python -m benchmarks.kernels.swa_fwd_versions --label this
    PYTHONPATH=/path/to/other/checkout:. python -P -m benchmarks.kernels.swa_fwd_versions --label other
    python -m benchmarks.kernels.swa_fwd_versions --tiny     # toy shapes: a smoke run (CPU: Triton's interpreter)

(-P: the current directory does not come first on the path, so the other checkout's ttt_e2e is the one imported.)

Variants in one call: --tiles BMxBNxWARPSxSTAGES ... (common.CONFIG_OVERRIDES["fwd"]; none given: the table's
tiles) and --descriptors on off (forward.USE_DESCRIPTORS: key/value tiles through TMA descriptors or pointers).

Shapes, as inference runs them (q, k, v views of one fused (B, T, 3, H, D) projection output, the model's layout):
a prefill chunk of the prefix (8192 queries at position 8192 over a window-long cache then the chunk's own 8192
keys, two key sources) and an inner step's forward (1024 queries at 8192 over a cache of 8192 then 1024 keys);
key parts as the rule picks. --layout heads: contiguous (B, H, T, D) tensors and one key source instead (the
shapes of the figures in RESULTS.md before round 20).
"""
from __future__ import annotations

import argparse

import torch

from ttt_e2e.kernels.swa import common, forward
from ttt_e2e.kernels.swa.forward import swa_forward

from benchmarks.core.env import describe, environment
from benchmarks.core.timing import default_device, kernel_ms
from benchmarks.kernels.attention import visible_pairs

# name: (queries, cache keys, block keys, window, first query's position); the cache starts at position 0
SHAPES = {"prefix chunk 8K/16K": (8192, 8192, 8192, 8192, 8192), "inner step 1K/9K": (1024, 8192, 1024, 8192, 8192)}
TINY_SHAPES = {"inner step 16/48": (16, 32, 16, 32, 32)}


def inputs(tq, tc, tb, layout, H, D, g):
    """(q, k, v, k2, v2): the cache as k, v and the block's keys as k2, v2 (None for one key source)."""
    dev = g.device
    dtype = torch.bfloat16 if dev.type == "cuda" else torch.float32
    if layout == "heads":
        q, k, v = (torch.randn(1, H, t, D, device=dev, generator=g, dtype=dtype) for t in (tq, tc + tb, tc + tb))
        return q, k, v, None, None
    block = torch.randn(1, tb, 3, H, D, device=dev, generator=g, dtype=dtype)
    cache = torch.randn(1, tc, 3, H, D, device=dev, generator=g, dtype=dtype)
    q, k2, v2 = (block[:, :, i].transpose(1, 2) for i in range(3))
    k, v = (cache[:, :, i].transpose(1, 2) for i in (1, 2))
    return q[:, :, tb - tq:], k, v, k2, v2


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--label", default="this")
    p.add_argument("--reps", type=int, default=5, help="do_bench runs per shape (the median of their medians)")
    p.add_argument("--tiles", nargs="+", default=[None], help="BMxBNxWARPSxSTAGES, e.g. 128x64x4x3")
    p.add_argument("--descriptors", nargs="+", choices=["on", "off"], default=[None])
    p.add_argument("--layout", choices=["model", "heads"], default="model")
    p.add_argument("--tiny", action="store_true", help="toy shapes (a smoke run)")
    args = p.parse_args(argv)
    dev = default_device()
    print(describe(environment(dev)))
    (H, D), shapes = ((2, 16), TINY_SHAPES) if args.tiny else ((32, 80), SHAPES)
    for name, (tq, tc, tb, w, q0) in shapes.items():
        g = torch.Generator(device=dev).manual_seed(0)
        q, k, v, k2, v2 = inputs(tq, tc, tb, args.layout, H, D, g)
        flop = 4 * D * H * visible_pairs(tq, tc + tb, w, q0, 0)
        for tiles in args.tiles:
            if tiles:
                common.CONFIG_OVERRIDES["fwd"] = common.TileConfig(*map(int, tiles.split("x")))
            for desc in args.descriptors:
                if desc:
                    forward.USE_DESCRIPTORS = desc == "on"
                ms = sorted(kernel_ms(lambda: swa_forward(q, k, v, w, q0, 0, D ** -0.5, k2, v2), warmup=50, rep=300)
                            for _ in range(args.reps))[args.reps // 2]
                print(f"{args.label}: {name}: tiles {tiles or 'table'}, descriptors {desc or 'default'}: "
                      f"{1e3 * ms:.1f} us, {flop / ms / 1e9:.0f} TFLOP/s", flush=True)
            common.CONFIG_OVERRIDES.pop("fwd", None)


if __name__ == "__main__":
    main()
