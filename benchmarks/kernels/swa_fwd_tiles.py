"""SWA forward: the tile table's config vs the wide-tile rule of kernels/swa/common.py:forward_tile (GPU).

    python -m benchmarks.kernels.swa_fwd_tiles
    python -m benchmarks.kernels.swa_fwd_tiles --tiny     # toy shapes: a smoke run (CPU: Triton's interpreter)

For head dims 64 and 128 at 12 and 32 heads, at the shapes the forward runs (the meta step's suffix: 1K queries
against 8K / 4K keys; a full causal 8K prefix; a 32K sliding-window prefix): the median time with the table's
tiles forced, and with what forward_tile picks. Where the rule keeps the table's tiles, the two columns time the
same config: their difference is the run-to-run spread.
"""
from __future__ import annotations

import torch

from ttt_e2e.kernels.swa import common
from ttt_e2e.kernels.swa.forward import swa_forward

from benchmarks.core.cli import parser, start_run
from benchmarks.kernels.attention import time_step

SHAPES = {"suffix 1024/8192": (1024, 8192, 8192, 7168, 0), "suffix 1024/4096": (1024, 4096, 8192, 3072, 0),
          "causal 8K": (8192, 8192, 8192, 0, 0), "swa 32K W8K": (32768, 32768, 8192, 0, 0)}
TINY_SHAPES = {"suffix 16/48": (16, 48, 32, 32, 0)}


def main(argv=None):
    args = parser(__doc__, "toy shapes, one timing each (a smoke run)").parse_args(argv)
    dev, dtype, _ = start_run()
    dims, heads, shapes = ((16,), (2,), TINY_SHAPES) if args.tiny else ((64, 128), (12, 32), SHAPES)
    repeats, target_s, min_reps = (1, 0.0, 1) if args.tiny else (3, 0.2, 5)
    for D in dims:
        for H in heads:
            for name, (tq, tk, w, q0, k0) in shapes.items():
                g = torch.Generator(device=dev).manual_seed(1)
                q, k, v = (torch.randn(1, H, T, D, device=dev, generator=g, dtype=dtype) for T in (tq, tk, tk))
                res = {}
                for label, forced in (("table", common.tile_config("fwd", D, q.device)), ("rule", None)):
                    common.CONFIG_OVERRIDES.clear()
                    if forced is not None:
                        common.CONFIG_OVERRIDES["fwd"] = forced
                    ms = sorted(time_step(lambda: swa_forward(q, k, v, w, q0, k0, D ** -0.5), target_s, min_reps)[0]
                                for _ in range(repeats))
                    res[label] = ms[len(ms) // 2]
                common.CONFIG_OVERRIDES.clear()
                cfg = common.forward_tile(tq, H, D, q.device, q.dtype)
                print(f"D={D} H={H} {name}: table {res['table']:.3f} ms, rule ({cfg.block_m}x{cfg.block_n}) "
                      f"{res['rule']:.3f} ms, ratio {res['table'] / res['rule']:.2f}", flush=True)


if __name__ == "__main__":
    main()
