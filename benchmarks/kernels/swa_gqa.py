"""Grouped-query attention in the SWA kernels on the GPU: correctness at real head layouts, and speed against the
same shapes with K/V repeated to full heads.

  python -m benchmarks.kernels.swa_gqa check --layout llama --dtype bf16 --kv-heads 8,32
  python -m benchmarks.kernels.swa_gqa time --layouts llama,qwen3 --json out.json
  python benchmarks/kernels/swa_gqa.py ...        (the same)

Layouts: Llama-3.2-1B's attention (32 query heads, 8 kv heads, head dim 64) and Qwen3's (32/8, head dim 128); the
shapes a prefix (T x T, window W) and a suffix block (T/4 queries after a cache of W keys).

check: forward, backward and double backward (the gradients of <cot, (dq, dk, dv)> w.r.t. q, k, v, dO) against the
materialized reference (`swa_reference`, which repeats K/V): bf16 against the fp32 reference (TF32 off) on the same
bf16 inputs, under 1e-2 relative and no worse than 2x the materialized bf16 autograd's error (the rule of
tests/kernels/test_swa_gpu.py); fp32 against float64 under 2e-5 (tests/kernels/test_swa.py's). Two runs must give
the same bits (each kv head's gradient is one program's sum over its group, no atomics). With --baseline PKG (a
copy of kernels/swa from before GQA, importable as a package, e.g. `git archive 6cc5823 kernels/swa | tar -x -C /tmp
&& cp -r /tmp/kernels/swa benchmarks/kernels/main_swa`, then `--baseline benchmarks.kernels.main_swa`) multi-head
attention (kv heads = heads) must equal the old kernels bit for bit: the same kernels for MHA. --group-parts: the
column kernels' group parts to check (common.group_parts: "rule", or a number forced). Exit status 1 on any failure.

time: the median over interleaved rounds of each round's median time of a CUDA graph's replays (benchmarks/timing.py
graph_us: no launch overhead, which at 2K would outlast the kernels; plain calls where capture fails), of fwd,
fwd+bwd, fwd+bwd+dbwd (autograd, as benchmarks/attention.py) and of the double backward's kernels alone ("dbwd"),
at the shape sets of SETS, for
  gqa     the kernels on k, v with Hkv heads (gqa-pN: N group parts forced in the column kernels; gqa: the rule's;
          a -head or -tile suffix on any variant forces the column kernels' grid order: common.column_grid)
  repeat  expand_kv(k), expand_kv(v) then the kernels, autograd summing each group's gradients: what a model
          without GQA kernels runs (in "dbwd": the cotangents of dk, dv expanded, grad k, grad v summed)
  mha     the kernels on k, v that already have H heads (no copy, no sum): the kernels' own time at full heads
  main    with --baseline: the old kernels on the mha inputs (the MHA regression check)
and each one's peak memory over its inputs (one call).
"""

from __future__ import annotations

import argparse
import importlib
import os
import statistics
import sys
import time

import torch

from benchmarks.core.records import write_json
from benchmarks.core.timing import cuda_event_ms, graph_us
from ttt_e2e.kernels import swa
from ttt_e2e.kernels.swa.reference import expand_kv

# The GPU; on a CPU, `check` runs the Triton interpreter (TRITON_INTERPRET=1; small --T only)
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
LAYOUTS = {"llama": (32, 8, 64), "qwen3": (32, 8, 128)}  # (query heads, kv heads, head dim)
DTYPES = {"bf16": torch.bfloat16, "fp32": torch.float32}
NAMES = ("o", "dq", "dk", "dv", "ggq", "ggk", "ggv", "ggdo")
MODES = ("fwd", "fwd_bwd", "fwd_bwd_dbwd", "dbwd")


def shapes(T: int, W: int) -> dict:
    """name: (Tq, Tk, window, q_pos0, k_pos0)."""
    b = T // 4
    return {f"prefix-T{T}-W{W}": (T, T, W, 0, 0), f"suffix-b{b}-W{W}": (b, W + b, W, W, 0)}


# The timed shapes: moderate ones, and the TTT recipe's (benchmarks/attention.py's causal-8K and suffix-b1024-W8K:
# full causal attention over 8K tokens, a 1K mini-batch after a full 8K-key window)
SETS = {"2k": shapes(2048, 1024),
        "8k": {"causal-T8192": (8192, 8192, 8192, 0, 0), "suffix-b1024-W8192": (1024, 9216, 8192, 8192, 0)},
        # where common.LONG_ROWS's split starts: a key tile's query rows from 2K to 16K
        "long": {"causal-T4096": (4096, 4096, 4096, 0, 0), "prefix-T16384-W2048": (16384, 16384, 2048, 0, 0),
                 "prefix-T16384-W4096": (16384, 16384, 4096, 0, 0), "causal-T16384": (16384, 16384, 16384, 0, 0)}}


def inputs(B, H, HKV, D, shape, dtype, seed):
    tq, tk = shape[:2]
    g = torch.Generator(device=DEVICE).manual_seed(seed)
    mk = lambda h, t: torch.randn(B, h, t, D, device=DEVICE, generator=g).to(dtype)  # noqa: E731
    q, k, v, do = mk(H, tq), mk(HKV, tk), mk(HKV, tk), mk(H, tq)
    return q, k, v, do, (mk(H, tq), mk(HKV, tk), mk(HKV, tk))


def all_outputs(attn, shape, q, k, v, do, cot, dtype):
    """o, (dq, dk, dv) = vjp(o, dO), then the gradients of <cot, (dq, dk, dv)> w.r.t. q, k, v, dO: in `dtype`."""
    _, _, w, q0, k0 = shape
    q, k, v, do = (t.detach().to(dtype).requires_grad_() for t in (q, k, v, do))
    o = attn(q, k, v, w, q0, k0)
    first = torch.autograd.grad(o, (q, k, v), do, create_graph=True)
    second = torch.autograd.grad(first, (q, k, v, do), [c.to(dtype) for c in cot])
    return [t.detach() for t in (o, *first, *second)]


def rel(a, b):
    if not torch.isfinite(a).all():
        return float("inf")
    a, b = a.double(), b.double()
    return ((a - b).norm() / b.norm().clamp_min(1e-30)).item()


def forced_parts(fn, parts, order=None):
    """fn with the column kernels' group parts forced to `parts` ("rule": common.group_parts decides) and their grid
    order to `order` ("tile", "head"; None: as it is)."""
    if parts == "rule" and order is None:
        return fn

    def run(*args):
        before = swa.common.GROUP_PARTS_OVERRIDE, swa.common.COLUMN_ORDER
        if parts != "rule":
            swa.common.GROUP_PARTS_OVERRIDE = int(parts)
        swa.common.COLUMN_ORDER = order or before[1]
        try:
            return fn(*args)
        finally:
            swa.common.GROUP_PARTS_OVERRIDE, swa.common.COLUMN_ORDER = before
    return run


def rule_parts(H, HKV, D, shape, B=1):
    """The group parts common.group_parts picks for dK/dV and grad K/V at this shape (bf16; dK/dV's of all keys)."""
    tq, tk, w = shape[:3]
    out = {}
    for kernel in ("bwd_dkdv", "dbwd_col"):
        cfg = swa.common.tile_config(kernel, D, torch.device(DEVICE), torch.bfloat16)
        programs = -(-tk // cfg.block_n) * B * HKV
        rows = swa.common.key_tile_rows(tq, w, cfg.block_n) if kernel == "bwd_dkdv" else 0  # dK/dV's alone
        out[kernel] = swa.common.group_parts(programs, H // HKV, torch.device(DEVICE), cfg.num_warps, rows)
    return out


def check(layout, dtype_name, kv_heads, T, W, baseline, group_parts):
    """Print one line per (kv heads, shape, group parts) and return whether everything passed."""
    H, _, D = LAYOUTS[layout]
    dtype = DTYPES[dtype_name]
    torch.backends.cuda.matmul.allow_tf32 = False
    old = importlib.import_module(baseline) if baseline else None
    ok, rows = True, []
    cases = [(hkv, sname, shape, parts) for hkv in kv_heads for sname, shape in shapes(T, W).items()
             for parts in (group_parts if hkv < H else ["rule"])]
    for hkv, sname, shape, parts in cases:
        t0 = time.perf_counter()
        q, k, v, do, cot = inputs(1, H, hkv, D, shape, dtype, seed=hkv * 1000 + shape[0])
        attn = forced_parts(swa.swa_attention, parts)
        got = all_outputs(attn, shape, q, k, v, do, cot, dtype)
        again = all_outputs(attn, shape, q, k, v, do, cot, dtype)
        same_bits = all(torch.equal(a, b) for a, b in zip(got, again))
        ref_dtype = torch.float64 if dtype == torch.float32 else torch.float32
        ref = all_outputs(swa.swa_reference, shape, q, k, v, do, cot, ref_dtype)
        errs = [rel(a, b) for a, b in zip(got, ref)]
        row = dict(layout=layout, dtype=dtype_name, H=H, Hkv=hkv, D=D, shape=sname, group_parts=parts,
                   errs=dict(zip(NAMES, errs)), same_bits_twice=same_bits)
        if dtype == torch.float32:
            passed = all(e < 2e-5 for e in errs)
        else:
            mat = [rel(a, b) for a, b in zip(all_outputs(swa.swa_reference, shape, q, k, v, do, cot, dtype), ref)]
            row["materialized_bf16_errs"] = dict(zip(NAMES, mat))
            passed = all(e < 1e-2 and e < 2 * m + 1e-3 for e, m in zip(errs, mat))
        shapes_ok = [a.shape for a in got] == [a.shape for a in ref] and got[2].shape[1] == hkv
        passed = passed and same_bits and shapes_ok
        if old is not None and hkv == H:
            main = all_outputs(old.swa_attention, shape, q, k, v, do, cot, dtype)
            row["equals_main_bitwise"] = all(torch.equal(a, b) for a, b in zip(got, main))
            passed = passed and row["equals_main_bitwise"]
        row.update(passed=passed, wall_s=round(time.perf_counter() - t0, 1))
        ok &= passed
        rows.append(row)
        extra = f" main-bitwise={row['equals_main_bitwise']}" if "equals_main_bitwise" in row else ""
        print(f"{'PASS' if passed else 'FAIL'} {layout} {dtype_name} H{H}/Hkv{hkv} D{D} {sname} parts={parts}: "
              + " ".join(f"{n}={e:.1e}" for n, e in zip(NAMES, errs))
              + (" | mat-bf16 " + " ".join(f"{e:.1e}" for e in mat) if dtype != torch.float32 else "")
              + f" | bits-twice={same_bits}{extra} ({row['wall_s']}s)", flush=True)
        del q, k, v, do, cot, got, again, ref
        if DEVICE == "cuda":
            torch.cuda.empty_cache()
    return ok, rows


# --- timing ------------------------------------------------------------------------------------------------------

def attention_of(variant, pkg):
    """(q, k, v, window, q_pos0, k_pos0) -> o for a variant; `repeat` expands k, v inside (autograd sums back)."""
    if variant_knobs(variant)[0] == "repeat":
        return lambda q, k, v, *a: pkg.swa_attention(q, expand_kv(k, q.shape[1]), expand_kv(v, q.shape[1]), *a)
    return pkg.swa_attention


def variant_knobs(variant):
    """(base, group parts, column order) of a variant name: base[-pN][-head|-tile], e.g. gqa-p2, gqa-head (the
    column kernels' grid with key tiles fastest: common.column_grid), mha-head; no suffix: the defaults."""
    base, *knobs = variant.split("-")
    parts = next((x[1:] for x in knobs if x.startswith("p")), "rule")
    order = next((x for x in knobs if x in ("head", "tile")), None)
    return base, parts, order


def dbwd_alone(pkg, variant, shape, q, k, v, do, cot):
    """The double backward's kernels alone (lse and delta computed once, outside the timed call)."""
    _, _, w, q0, k0 = shape
    scale = q.shape[-1] ** -0.5
    H = q.shape[1]
    repeat = variant_knobs(variant)[0] == "repeat"
    kx, vx = (expand_kv(t, H) for t in (k, v)) if repeat else (k, v)
    o, lse = pkg.forward.swa_forward(q, kx, vx, w, q0, k0, scale)
    delta = pkg.backward.swa_backward_delta(o, do)
    gq, gk, gv = cot
    dbwd = pkg.double_backward.swa_double_backward
    if not repeat:
        return lambda: dbwd(q, k, v, do, lse, delta, gq, gk, gv, w, q0, k0, scale)

    def run():  # what autograd does around the MHA kernels: expand the inputs, sum grad k, grad v over the group
        gk_x, gv_x = expand_kv(gk, H), expand_kv(gv, H)
        out_q, out_k, out_v, out_do = dbwd(q, expand_kv(k, H), expand_kv(v, H), do, lse, delta, gq, gk_x, gv_x,
                                           w, q0, k0, scale)
        hkv = k.shape[1]
        return out_q, out_k.unflatten(1, (hkv, -1)).sum(2), out_v.unflatten(1, (hkv, -1)).sum(2), out_do
    return run


def step_of(mode, variant, pkg, shape, q, k, v, do, cot):
    if mode == "dbwd":
        return dbwd_alone(pkg, variant, shape, q, k, v, do, cot)
    attn = attention_of(variant, pkg)
    args = shape[2:]
    if mode == "fwd":
        def step():
            with torch.no_grad():
                return attn(q, k, v, *args)
    elif mode == "fwd_bwd":
        def step():
            return torch.autograd.grad(attn(q, k, v, *args), (q, k, v), do)
    else:
        def step():
            first = torch.autograd.grad(attn(q, k, v, *args), (q, k, v), do, create_graph=True)
            return torch.autograd.grad(first, (q, k, v, do), cot)
    return step


def peak_bytes(step):
    torch.cuda.synchronize()
    before = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    out = step()
    torch.cuda.synchronize()
    del out
    return torch.cuda.max_memory_allocated() - before


def per_call_ms(step, inner, reps):
    """(ms per call: the median over reps replays of a CUDA graph of `inner` calls, whether a graph was used):
    plain calls (CUDA events) where capture fails."""
    try:
        return graph_us(step, inner, reps) / 1e3, True
    except Exception as e:  # noqa: BLE001 - then time plain calls, and say so
        print(f"(CUDA graph capture failed: {type(e).__name__}: {str(e)[:120]}; plain calls)", flush=True)
        torch.cuda.synchronize()
        return statistics.median(cuda_event_ms(step, reps * inner)), False


def time_layout(layout, sets, modes, variants, old, rounds, per_round_s, warm_only=False, B=1, rows=None, save=None):
    """Append a row per (shape, mode) to rows, calling save() after each (a run cut short keeps what it timed)."""
    H, HKV, D = LAYOUTS[layout]
    rows = [] if rows is None else rows
    for sname, shape in ((n, s) for name in sets for n, s in SETS[name].items()):
        q, k, v, do, cot = inputs(B, H, HKV, D, shape, torch.bfloat16, seed=7)
        kf, vf = expand_kv(k, H).contiguous(), expand_kv(v, H).contiguous()
        cot_f = (cot[0], expand_kv(cot[1], H).contiguous(), expand_kv(cot[2], H).contiguous())
        for t in (q, k, v, do, kf, vf):
            t.requires_grad_()
        for mode in modes:
            steps = {}
            for var in variants:
                base, parts, order = variant_knobs(var)
                full = base in ("mha", "main")
                pkg = old if base == "main" else swa
                steps[var] = forced_parts(step_of(mode, var, pkg, shape, q, kf if full else k, vf if full else v,
                                                  do, cot_f if full else cot), parts, order)
            for var, step in steps.items():  # warm-up: compilation, allocator
                step(), step()
            torch.cuda.synchronize()
            if warm_only:
                print(f"warm {layout} {sname} {mode} {' '.join(steps)}", flush=True)
                continue
            t0 = time.perf_counter()
            steps[variants[0]]()
            torch.cuda.synchronize()
            call_s = max(time.perf_counter() - t0, 1e-6)
            inner = max(1, min(10, int(0.01 / call_s)))  # replays of about 10 ms at least
            reps = max(2, min(20, int(per_round_s / (inner * call_s))))
            times, graphs = {var: [] for var in steps}, {}
            for _ in range(rounds):  # interleaved, so that a clock drop under sustained load hits every variant
                for var, step in steps.items():
                    ms, graphs[var] = per_call_ms(step, inner, reps)
                    times[var].append(ms)
            row = dict(layout=layout, H=H, Hkv=HKV, D=D, B=B, shape=sname, mode=mode, rounds=rounds, inner=inner,
                       reps=reps, graphs=graphs,
                       rule_parts=rule_parts(H, HKV, D, shape, B),
                       ms={var: statistics.median(ts) for var, ts in times.items()},
                       peak_gib={var: peak_bytes(step) / 2**30 for var, step in steps.items()})
            rows.append(row)
            print(fmt(row), flush=True)
            if save:
                save()
            del steps
            torch.cuda.empty_cache()
    return rows


def fmt(r):
    ms = r["ms"]
    cells = " ".join(f"{v}={t:8.3f}ms" for v, t in ms.items())
    ratios = " ".join(f"gqa/{v}={ms['gqa'] / t:.2f}" for v, t in ms.items() if v != "gqa")
    mem = " ".join(f"{v}={g:.2f}" for v, g in r["peak_gib"].items())
    parts = "/".join(str(p) for p in r["rule_parts"].values())
    return f"{r['layout']:<5} {r['shape']:<18} {r['mode']:<12} {cells} | {ratios} | rule parts {parts} | peak GiB {mem}"


def table(rows):
    variants = list(rows[0]["ms"])
    lines = ["| layout | shape | mode | " + " | ".join(f"{v} ms" for v in variants)
             + " | " + " | ".join(f"gqa/{v}" for v in variants if v != "gqa")
             + " | rule's parts dK,dV / gK,gV | peak GiB gqa/repeat |",
             "|---" * (5 + 2 * len(variants)) + "|"]
    for r in rows:
        ms, mem = r["ms"], r["peak_gib"]
        lines.append(f"| {r['layout']} {r['H']}/{r['Hkv']}x{r['D']} | {r['shape']} | {r['mode']} | "
                     + " | ".join(f"{ms[v]:.3f}" for v in variants) + " | "
                     + " | ".join(f"{ms['gqa'] / ms[v]:.2f}" for v in variants if v != "gqa")
                     + " | " + "/".join(str(p) for p in r["rule_parts"].values())
                     + f" | {mem['gqa']:.2f}/{mem.get('repeat', float('nan')):.2f} |")
    return "\n".join(lines)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="cmd", required=True)
    c = sub.add_parser("check", help="GQA kernels vs the reference (forward, backward, double backward)")
    c.add_argument("--layout", choices=LAYOUTS, default="llama")
    c.add_argument("--dtype", choices=DTYPES, default="bf16")
    c.add_argument("--kv-heads", default="8", help="comma-separated kv head counts (each dividing 32)")
    c.add_argument("--group-parts", default="rule", help='comma-separated: "rule" or a number of parts to force')
    t = sub.add_parser("time", help="speed of GQA vs K/V repeated to full heads")
    t.add_argument("--layouts", default="llama,qwen3")
    t.add_argument("--sets", default="2k,8k", help=f"shape sets, of {', '.join(SETS)}")
    t.add_argument("--modes", default="fwd,fwd_bwd,dbwd", help=f"of {', '.join(MODES)}")
    t.add_argument("--variants", default="gqa,gqa-p1,gqa-p4,repeat,mha", help="and main, with --baseline")
    t.add_argument("--warm-only", action="store_true", help="compile every step (run each twice), time nothing")
    t.add_argument("--rounds", type=int, default=5)
    t.add_argument("--per-round-s", type=float, default=0.05, help="time per variant per round (sets reps)")
    c.add_argument("--T", type=int, default=2048)
    c.add_argument("--window", type=int, default=1024)
    for a in (c, t):
        a.add_argument("--baseline", default=None, help="package of the kernels before GQA (the MHA check)")
        a.add_argument("--json", default=None)
    args = p.parse_args(argv)
    if not torch.cuda.is_available() and not (args.cmd == "check" and swa.common.INTERPRET):
        print("swa_gqa: needs a CUDA GPU (or, for check, TRITON_INTERPRET=1)", file=sys.stderr)
        return 2
    try:
        kv = [int(x) for x in args.kv_heads.split(",")] if args.cmd == "check" else []
        layouts = args.layouts.split(",") if args.cmd == "time" else [args.layout]
        modes = args.modes.split(",") if args.cmd == "time" else []
        sets = args.sets.split(",") if args.cmd == "time" else []
    except ValueError:
        print(f"swa_gqa: --kv-heads must be integers, got {args.kv_heads!r}", file=sys.stderr)
        return 2
    bad = [x for x in layouts if x not in LAYOUTS] + [m for m in modes if m not in MODES] \
        + [x for x in sets if x not in SETS] + [str(h) for h in kv if h < 1 or 32 % h]
    if bad:
        print(f"swa_gqa: unknown layout/mode/set or kv heads not dividing 32: {', '.join(bad)}", file=sys.stderr)
        return 2
    meta = dict(device=torch.cuda.get_device_name() if DEVICE == "cuda" else "cpu (Triton interpreter)",
                torch=torch.__version__,
                date=time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), argv=sys.argv[1:])
    print(f"# {meta['device']}, torch {meta['torch']}, {meta['date']}", flush=True)
    if args.cmd == "check":
        ok, rows = check(args.layout, args.dtype, kv, args.T, args.window, args.baseline, args.group_parts.split(","))
    else:
        old = importlib.import_module(args.baseline) if args.baseline else None
        variants = args.variants.split(",") + (["main"] if old else [])
        rows = []
        for lay in layouts:
            time_layout(lay, sets, modes, variants, old, args.rounds, args.per_round_s, args.warm_only, rows=rows,
                        save=lambda: save(args.json, meta, rows))
        if rows:
            print("\n" + table(rows), flush=True)
        ok = True
    save(args.json, meta, rows)
    return 0 if ok else 1


def save(path, meta, rows):
    if path:
        write_json(path, dict(meta=meta, rows=rows), device="cuda" if torch.cuda.is_available() else "cpu")


if __name__ == "__main__":
    sys.exit(main())
