"""Benchmark: Triton sliding-window attention (fwd, fwd+bwd, fwd+bwd+double bwd) vs the PyTorch rivals.

Rivals: SDPA FlashAttention-2 backend (full causal only: it takes no sliding-window mask), SDPA cuDNN backend
(is_causal for full causal; a boolean mask for SWA where it accepts one), FlexAttention with a sliding-window
BlockMask (torch.compile'd), and materialized PyTorch (`swa_reference` in bf16: the only rival with a double
backward). A rival that fails (no double backward, OOM, unsupported) is recorded with its reason.

TFLOP/s convention (docs/METHOD.md section 6): per unmasked (query, key) pair, per head dim, per head: forward 4,
backward 10, double backward 24 FLOPs (recomputation not counted); fwd+bwd counts 14, fwd+bwd+dbwd 38.
Times are CUDA-event medians; memory is torch.cuda.max_memory_allocated during one call minus what was allocated
before it (inputs excluded).

  python -m benchmarks.kernels.attention --heads 125M --json out.json        # measure (GPU)
  python -m benchmarks.kernels.attention --tune --json tune.json              # tile sweep of the Triton kernels (GPU)
  python -m benchmarks.kernels.attention --report a.json b.json --plot p.png  # markdown table + plot from saved runs

No hydra/omegaconf/wandb/datasets here: the GPU machine has none of them.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
import traceback

import torch

from benchmarks.core.env import describe, environment
from benchmarks.core.records import write_json
from benchmarks.core.timing import cuda_event_ms, default_device
from benchmarks.kernels.attention_report import FLOPS_PER_PAIR, MODES, PROVIDERS, report

DEVICE = default_device()
HEADS = {"125M": (12, 64), "1B": (32, 64), "3B": (32, 80)}
TINY_HEADS = {"tiny": (2, 16)}  # --tiny: the code paths on the CPU (Triton interpreter), not figures
# name: (Tq, Tk, window, q_pos0, k_pos0). Prefix SWA at 8K with W = 8K is full causal, so it is one row.
SHAPES = {
    "causal-8K": (8192, 8192, 8192, 0, 0),
    "swa-32K-W8K": (32768, 32768, 8192, 0, 0),
    "swa-128K-W8K": (131072, 131072, 8192, 0, 0),
    "suffix-b1024-W8K": (1024, 9216, 8192, 8192, 0),  # a mid-sequence TTT block: full 8192-key cache + the block
}
TINY_SHAPES = {"suffix-tiny": (16, 48, 32, 32, 0)}  # offsets and a window edge


class Unsupported(Exception):
    pass


def visible_pairs(tq, tk, window, q_pos0, k_pos0):
    """Exact number of unmasked (query, key) pairs."""
    qp = q_pos0 + torch.arange(tq, dtype=torch.int64)
    lo = torch.clamp(torch.maximum(qp - window + 1, torch.zeros_like(qp)), min=k_pos0)
    hi = torch.clamp(qp, max=k_pos0 + tk - 1)
    return int(torch.clamp(hi - lo + 1, min=0).sum())


def is_full_causal(shape):
    tq, tk, w, q0, k0 = shape
    return tq == tk and q0 == k0 == 0 and w >= tq


def make_attention(provider, shape, D):
    """A callable (q, k, v) -> o for this provider, or raise Unsupported(reason)."""
    import torch.nn.functional as F
    from torch.nn.attention import SDPBackend, sdpa_kernel

    tq, tk, w, q0, k0 = shape
    if provider == "triton":
        from ttt_e2e.kernels.swa import swa_attention
        return lambda q, k, v: swa_attention(q, k, v, w, q0, k0)
    if provider == "materialized":
        from ttt_e2e.kernels.swa import swa_reference
        return lambda q, k, v: swa_reference(q, k, v, w, q0, k0)
    if provider in ("sdpa_flash", "sdpa_cudnn"):
        backend = SDPBackend.FLASH_ATTENTION if provider == "sdpa_flash" else SDPBackend.CUDNN_ATTENTION
        if is_full_causal(shape):
            def run(q, k, v):
                with sdpa_kernel([backend]):
                    return F.scaled_dot_product_attention(q, k, v, is_causal=True)
            return run
        if provider == "sdpa_flash":
            raise Unsupported("no sliding-window / offset mask in the flash backend")
        if tq * tk > 2**31:
            raise Unsupported(f"dense bool mask would take {tq * tk / 2**30:.0f} GiB")
        from ttt_e2e.kernels.swa import swa_mask
        mask = swa_mask(tq, tk, w, q0, k0, device=DEVICE)

        def run(q, k, v):
            with sdpa_kernel([backend]):
                return F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        return run
    if provider == "flex":
        from torch.nn.attention.flex_attention import create_block_mask, flex_attention

        def mask_mod(b, h, qi, kj):
            qp = qi + q0
            kp = kj + k0
            return (kp <= qp) & (kp > qp - w) & (kp >= 0)

        try:  # _compile: build the block mask without materializing a Tq x Tk mask (OOM at 128K otherwise)
            block_mask = create_block_mask(mask_mod, B=None, H=None, Q_LEN=tq, KV_LEN=tk, device=DEVICE,
                                           _compile=True)
        except TypeError:
            block_mask = create_block_mask(mask_mod, B=None, H=None, Q_LEN=tq, KV_LEN=tk, device=DEVICE)
        compiled = torch.compile(flex_attention, dynamic=False)
        return lambda q, k, v: compiled(q, k, v, block_mask=block_mask)
    raise ValueError(provider)


def make_step(attn, mode, q, k, v, do, cot):
    if mode == "fwd":
        def step():
            with torch.no_grad():
                return attn(q, k, v)
    elif mode == "fwd_bwd":
        def step():
            o = attn(q, k, v)
            return torch.autograd.grad(o, (q, k, v), do)
    else:
        def step():
            o = attn(q, k, v)
            grads = torch.autograd.grad(o, (q, k, v), do, create_graph=True)
            return torch.autograd.grad(grads, (q, k, v, do), cot)
    return step


def sync():
    if DEVICE == "cuda":
        torch.cuda.synchronize()


def time_step(step, target_s=1.0, min_reps=5, max_reps=100):
    """Median of per-call CUDA-event times, after warm-up (compilation) calls."""
    step()
    sync()
    t0 = time.perf_counter()
    step()
    sync()
    est = time.perf_counter() - t0
    reps = int(min(max_reps, max(min_reps, target_s / max(est, 1e-6))))
    return statistics.median(cuda_event_ms(step, reps)), reps


def peak_memory(step):
    if DEVICE != "cuda":
        return None
    torch.cuda.synchronize()
    torch.cuda.empty_cache()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    out = step()
    torch.cuda.synchronize()
    peak = torch.cuda.max_memory_allocated() - base
    del out
    return peak


def empty_cache():
    if DEVICE == "cuda":
        torch.cuda.empty_cache()


def describe_error(e):
    if isinstance(e, torch.cuda.OutOfMemoryError):
        return "OOM"
    msg = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
    return f"{type(e).__name__}: {msg[:160]}"


def bench(heads, shapes, providers, modes, dtype=torch.bfloat16, target_s=1.0, min_reps=5):
    rows = []
    for hname in heads:
        H, D = heads[hname]
        for sname in shapes:
            shape = shapes[sname]
            tq, tk, w, q0, k0 = shape
            pairs = visible_pairs(*shape) * H
            g = torch.Generator(device=DEVICE).manual_seed(0)
            mk = lambda T: torch.randn(1, H, T, D, device=DEVICE, generator=g, dtype=dtype)  # noqa: E731
            q, k, v = (t.requires_grad_() for t in (mk(tq), mk(tk), mk(tk)))
            do = mk(tq).requires_grad_()
            cot = (mk(tq), mk(tk), mk(tk))
            for prov in providers:
                for mode in modes:
                    row = dict(heads=hname, H=H, D=D, shape=sname, provider=prov, mode=mode, pairs=pairs)
                    t0 = time.perf_counter()
                    try:
                        attn = make_attention(prov, shape, D)
                        step = make_step(attn, mode, q, k, v, do, cot)
                        ms, reps = time_step(step, target_s, min_reps)
                        row.update(ms=ms, reps=reps, peak_bytes=peak_memory(step),
                                   tflops=FLOPS_PER_PAIR[mode] * pairs * D / (ms * 1e-3) / 1e12)
                    except Unsupported as e:
                        row.update(error=f"n/a: {e}")
                    except Exception as e:  # noqa: BLE001 - a failing rival is a result, not a crash
                        row.update(error=describe_error(e))
                        if not isinstance(e, torch.cuda.OutOfMemoryError):
                            traceback.print_exc(limit=2, file=sys.stderr)
                    row["wall_s"] = time.perf_counter() - t0
                    empty_cache()
                    print(fmt_row(row), flush=True)
                    rows.append(row)
            del q, k, v, do, cot
            empty_cache()
    return rows


def fmt_row(r):
    head = f"{r['heads']:>5} {r['shape']:<17} {r['provider']:<13} {r['mode']:<13}"
    if "error" in r:
        return f"{head} {r['error']}"
    return (f"{head} {r['ms']:9.3f} ms {r['tflops']:7.1f} TFLOP/s {(r['peak_bytes'] or 0) / 2**30:8.3f} GiB "
            f"({r['reps']} reps, {r['wall_s']:.0f}s)")


def profile(heads, shapes, providers, modes, dtype=torch.bfloat16):
    """Warm-up (compile) every selected step first, then mark the region with an NVTX range and run each 3 times:
    `ncu --nvtx --nvtx-include "profile/"` then sees only the steady-state launches."""
    steps = []
    for hname in heads:
        H, D = heads[hname]
        for sname in shapes:
            tq, tk, w, q0, k0 = shapes[sname]
            mk = lambda T: torch.randn(1, H, T, D, device=DEVICE, dtype=dtype)  # noqa: E731
            q, k, v, do = mk(tq).requires_grad_(), mk(tk).requires_grad_(), mk(tk).requires_grad_(), mk(tq)
            do.requires_grad_()
            cot = (mk(tq), mk(tk), mk(tk))
            for prov in providers:
                for mode in modes:
                    step = make_step(make_attention(prov, shapes[sname], D), mode, q, k, v, do, cot)
                    step()
                    steps.append((f"{hname}/{sname}/{prov}/{mode}", step))
    torch.cuda.synchronize()
    for name, step in steps:
        torch.cuda.nvtx.range_push(f"profile/{name}")
        for _ in range(3):
            step()
        torch.cuda.synchronize()
        torch.cuda.nvtx.range_pop()
        print("profiled", name, flush=True)


# --- tile sweep of the Triton kernels ---------------------------------------------------------------------------

TUNE_CANDIDATES = {
    "fwd": [(128, 64, 4, 3), (128, 64, 8, 3), (128, 128, 8, 3), (64, 64, 4, 3), (64, 128, 4, 3), (128, 32, 4, 4)],
    "bwd_dq": [(64, 64, 4, 3), (128, 64, 8, 3), (64, 32, 4, 3), (128, 32, 8, 3), (64, 128, 8, 2), (32, 64, 4, 3)],
    "bwd_dkdv": [(64, 64, 4, 3), (64, 128, 8, 3), (128, 64, 8, 2), (32, 64, 4, 3), (64, 64, 8, 2), (32, 128, 8, 3)],
    "dbwd_ru": [(64, 64, 4, 3), (64, 64, 8, 2), (32, 64, 4, 3), (64, 32, 4, 3), (16, 64, 4, 3), (128, 64, 8, 2)],
    "dbwd_row": [(64, 64, 4, 2), (64, 64, 8, 2), (32, 64, 4, 2), (64, 32, 4, 2), (16, 64, 4, 2), (32, 32, 4, 2)],
    "dbwd_col": [(64, 64, 4, 2), (64, 64, 8, 2), (32, 64, 4, 2), (64, 32, 4, 2), (64, 128, 8, 2), (32, 128, 8, 2)],
}


def tune(head_dims=(64, 128), H=12):
    """Time each kernel's candidates (others at defaults) on the shape that matters for it."""
    from ttt_e2e.kernels.swa import common
    from ttt_e2e.kernels.swa.backward import swa_backward, swa_backward_delta
    from ttt_e2e.kernels.swa.double_backward import swa_double_backward
    from ttt_e2e.kernels.swa.forward import swa_forward

    results = []
    for D in head_dims:
        for kernel, cands in TUNE_CANDIDATES.items():
            sname = "swa-32K-W8K" if kernel.startswith(("fwd", "bwd")) else "suffix-b1024-W8K"
            tq, tk, w, q0, k0 = SHAPES[sname]
            g = torch.Generator(device="cuda").manual_seed(1)
            mk = lambda T: torch.randn(1, H, T, D, device="cuda", generator=g, dtype=torch.bfloat16)  # noqa
            q, k, v, do = mk(tq), mk(tk), mk(tk), mk(tq)
            gq, gk, gv = mk(tq), mk(tk), mk(tk)
            scale = D ** -0.5
            common.CONFIG_OVERRIDES.clear()
            o, lse = swa_forward(q, k, v, w, q0, k0, scale)
            delta = swa_backward_delta(o, do)
            ops = {
                "fwd": lambda: swa_forward(q, k, v, w, q0, k0, scale),
                "bwd": lambda: swa_backward(q, k, v, do, lse, delta, w, q0, k0, scale),
                "dbwd": lambda: swa_double_backward(q, k, v, do, lse, delta, gq, gk, gv, w, q0, k0, scale),
            }
            op = ops[kernel.split("_")[0]]
            for cand in cands:
                common.CONFIG_OVERRIDES.clear()
                common.CONFIG_OVERRIDES[kernel] = common.TileConfig(*cand)
                row = dict(D=D, kernel=kernel, shape=sname, config=cand)
                try:
                    ms, _ = time_step(op, target_s=0.3)
                    row["ms"] = ms
                except Exception as e:  # noqa: BLE001 - out of shared memory etc.
                    row["error"] = describe_error(e)
                print(row, flush=True)
                results.append(row)
            common.CONFIG_OVERRIDES.clear()
    return results


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--heads", nargs="+", default=list(HEADS), choices=list(HEADS))
    ap.add_argument("--shapes", nargs="+", default=list(SHAPES), choices=list(SHAPES))
    ap.add_argument("--providers", nargs="+", default=PROVIDERS, choices=PROVIDERS)
    ap.add_argument("--modes", nargs="+", default=MODES, choices=MODES)
    ap.add_argument("--tune", action="store_true", help="sweep Triton tile configs instead of benchmarking")
    ap.add_argument("--profile", action="store_true",
                    help="run each selected step 3 times after a warm-up, untimed (for ncu --launch-skip)")
    ap.add_argument("--json", help="write raw results here")
    ap.add_argument("--report", nargs="+", help="saved --json files to turn into a markdown table (no GPU needed)")
    ap.add_argument("--plot", help="with --report: write a bar chart here")
    ap.add_argument("--tiny", action="store_true", help="toy shapes, fp32, Triton and materialized only (a smoke run; "
                    "on a CPU under TRITON_INTERPRET=1)")
    args = ap.parse_args(argv)

    if args.report:
        rows, meta = [], {}
        for path in args.report:
            with open(path) as f:
                data = json.load(f)
            rows += data["rows"]
            meta = data["meta"]
        print(describe(data.get("environment", meta)))
        print(report(rows, meta, args.plot))
        return

    env = environment(DEVICE)
    meta = dict(env, argv=sys.argv[1:] if argv is None else argv)
    print(meta, flush=True)
    if args.tiny:
        heads, shapes = TINY_HEADS, TINY_SHAPES
        providers = [p for p in args.providers if p in ("triton", "materialized")]
        settings = dict(dtype=torch.float32, target_s=0.0, min_reps=1)
    else:
        heads, shapes = {h: HEADS[h] for h in args.heads}, {s: SHAPES[s] for s in args.shapes}
        providers, settings = args.providers, {}
    if args.profile:
        profile(heads, shapes, providers, args.modes)
        return
    rows = tune() if args.tune else bench(heads, shapes, providers, args.modes, **settings)
    if args.json:
        write_json(args.json, dict(meta=meta, rows=rows), env)
    if not args.tune:
        print(report(rows, meta))
    if args.tiny and any("error" in r and not r["error"].startswith("n/a") for r in rows):
        return 1  # a smoke run fails on any failed row


if __name__ == "__main__":
    main()
