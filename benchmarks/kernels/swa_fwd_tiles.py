"""SWA forward: the tile table's config vs the wide-tile rule of kernels/swa/common.py:forward_tile (GPU).

    python -m benchmarks.kernels.swa_fwd_tiles

For head dims 64 and 128 at 12 and 32 heads, at the shapes the forward runs (the meta step's suffix: 1K queries
against 8K / 4K keys; a full causal 8K prefix; a 32K sliding-window prefix): the median time with the table's
tiles forced, and with what forward_tile picks. Where the rule keeps the table's tiles, the two columns time the
same config: their difference is the run-to-run spread.
"""
from __future__ import annotations

import torch

from benchmarks.kernels.attention import time_step
from ttt_e2e.kernels.swa import common
from ttt_e2e.kernels.swa.forward import swa_forward

SHAPES = {"suffix 1024/8192": (1024, 8192, 8192, 7168, 0), "suffix 1024/4096": (1024, 4096, 8192, 3072, 0),
          "causal 8K": (8192, 8192, 8192, 0, 0), "swa 32K W8K": (32768, 32768, 8192, 0, 0)}


def main():
    for D in (64, 128):
        for H in (12, 32):
            for name, (tq, tk, w, q0, k0) in SHAPES.items():
                g = torch.Generator(device="cuda").manual_seed(1)
                q, k, v = (torch.randn(1, H, T, D, device="cuda", generator=g, dtype=torch.bfloat16)
                           for T in (tq, tk, tk))
                res = {}
                for label, forced in (("table", common.tile_config("fwd", D, q.device)), ("rule", None)):
                    common.CONFIG_OVERRIDES.clear()
                    if forced is not None:
                        common.CONFIG_OVERRIDES["fwd"] = forced
                    ms = sorted(time_step(lambda: swa_forward(q, k, v, w, q0, k0, D ** -0.5), target_s=0.2)[0]
                                for _ in range(3))
                    res[label] = ms[1]
                common.CONFIG_OVERRIDES.clear()
                cfg = common.forward_tile(tq, H, D, q.device, q.dtype)
                print(f"D={D} H={H} {name}: table {res['table']:.3f} ms, rule ({cfg.block_m}x{cfg.block_n}) "
                      f"{res['rule']:.3f} ms, ratio {res['table'] / res['rule']:.2f}", flush=True)


if __name__ == "__main__":
    if not torch.cuda.is_available():
        raise SystemExit("needs a CUDA GPU")
    main()
