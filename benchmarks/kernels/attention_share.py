"""How much of a TTT prefill token is attention, in the first window and in the steady state, and what attention
speed the flatness target (prefill us/token max/min <= 1.15) would need.

The first W tokens of a prompt attend over half a window on average, later tokens over a whole one; everything
else costs the same per token. So prompts of n1 = W and n2 > W tokens give, per token,
  first window: a (attention kernels), o (the rest: other kernels and idle time), wall = a + o
  steady:       A, O from the difference of the two prompts, (T(n2) - T(n1)) / (n2 - n1)
and the attention speed-up x that would make steady / first = `--target` with o and O unchanged:
  (O + A / x) / (o + a / x) = target  =>  x = (A - target a) / (target o - O)   (none when target o <= O).

Each prompt runs serially (no look-ahead stream: every kernel's time is its own, not shared with a concurrent
one) under torch.profiler, after warm-up, with the inner steps replayed as CUDA graphs; wall times are medians of
`--reps` prompts without the profiler, with and without the look-ahead.

    python -m benchmarks.kernels.attention_share [--size 3b] [--contexts 8192 40960] [--reps 5] [--out share.json]
    python -m benchmarks.kernels.attention_share --size tiny --contexts 64 128 --reps 1   # smoke run (CPU)
"""
from __future__ import annotations

import argparse
import statistics
import time

import torch
from torch.profiler import ProfilerActivity, profile

from ttt_e2e.config import TTTConfig
from ttt_e2e.inference import InferenceGraphs, feed, start

from benchmarks.core.models import build, model_config
from benchmarks.core.records import write_json
from benchmarks.core.timing import ClockSampler, default_device, kernel_launches

ATTENTION = ("_swa_", "_sum_parts_kernel", "_merge_forward_kernel")  # kernels/swa (forward, backward, parts)


def is_attention(kernel_name: str) -> bool:
    return kernel_name.startswith(ATTENTION)


def percentiles(xs):
    xs = sorted(xs)
    return {f"p{q}": xs[min(len(xs) - 1, q * len(xs) // 100)] for q in (10, 50, 90)}


def required_speedup(first: dict, steady: dict, target: float):
    """Attention speed-up x with (O + A/x) / (o + a/x) = target; None when no x reaches it."""
    a, o = first["attention_us"], first["wall_us"] - first["attention_us"]
    A, O = steady["attention_us"], steady["wall_us"] - steady["attention_us"]
    if target * o <= O:
        return None
    return max((A - target * a) / (target * o - O), 0.0)


def prompt_row(model, ttt, graphs, clocks, n: int, reps: int, split_us: float, device: str) -> dict:
    """One prompt length: wall times (serial and with look-ahead), and the profiled serial prompt's kernels."""
    ids = torch.randint(0, model.cfg.vocab_size, (1, n), device=device)

    def prompt(overlap):
        feed(start(model, ttt, 1, graphs=graphs, overlap_prefix=overlap), ids)
        if device == "cuda":
            torch.cuda.synchronize()

    walls, clock = {}, {}
    for overlap in (False, True):
        prompt(overlap)
        ts, w0 = [], time.time()
        for _ in range(reps):
            t0 = time.perf_counter()
            prompt(overlap)
            ts.append(time.perf_counter() - t0)
        walls[overlap] = statistics.median(ts)
        clock[overlap] = clocks.over(w0, time.time())
    with profile(activities=[ProfilerActivity.CUDA if device == "cuda" else ProfilerActivity.CPU]) as prof:
        prompt(False)
    launches = kernel_launches(prof)
    k = {name: [len(ts), sum(ts)] for name, ts in launches.items()}  # [launches, GPU us]
    att = sum(t for name, (_, t) in k.items() if is_attention(name))
    return {"tokens": n, "wall_us": 1e6 * walls[False], "wall_overlap_us": 1e6 * walls[True],
            "sm_mhz_watts": {"serial": clock[False], "look-ahead": clock[True]},
            "attention_us": att, "other_kernels_us": sum(t for _, t in k.values()) - att,
            "kernels": k,
            "attention_launches_us": {
                name: {part: percentiles(sel) | {"n": len(sel)}
                       for part, sel in ((f"> {split_us:g}", [t for t in ts if t > split_us]),
                                         (f"<= {split_us:g}", [t for t in ts if t <= split_us]))
                       if sel}
                for name, ts in launches.items() if is_attention(name)}}


def per_token_figures(r1: dict, r2: dict) -> dict:
    n1, n2 = r1["tokens"], r2["tokens"]
    out = {}
    for name, scale in (("first", lambda key: r1[key] / n1),
                        ("steady", lambda key: (r2[key] - r1[key]) / (n2 - n1))):
        out[name] = {key: scale(key) for key in ("wall_us", "wall_overlap_us", "attention_us", "other_kernels_us")}
    return out


def print_report(args, W: int, rows: dict, per_token: dict, x) -> None:
    n1, n2 = args.contexts
    r1, r2 = rows[n1], rows[n2]
    print(f"{args.size}, window {W}, prompts {n1} and {n2} tokens; us per token "
          f"(first window: the {n1}-token prompt; steady: the difference of the two)")
    print(f"{'':8s} {'wall serial':>12s} {'wall look-ahead':>16s} {'attention':>10s} {'other kernels':>14s} "
          f"{'idle':>6s} {'attention share':>16s}")
    for name, r in per_token.items():
        idle = r["wall_us"] - r["attention_us"] - r["other_kernels_us"]
        print(f"{name:8s} {r['wall_us']:12.2f} {r['wall_overlap_us']:16.2f} {r['attention_us']:10.2f} "
              f"{r['other_kernels_us']:14.2f} {idle:6.2f} {r['attention_us'] / r['wall_us']:16.1%}")
    s, f = per_token["steady"], per_token["first"]
    print(f"steady / first: serial {s['wall_us'] / f['wall_us']:.3f}, look-ahead "
          f"{s['wall_overlap_us'] / f['wall_overlap_us']:.3f}; non-attention per token: first "
          f"{f['wall_us'] - f['attention_us']:.2f}, steady {s['wall_us'] - s['attention_us']:.2f}")
    print(f"attention speed-up for steady / first = {args.target}: "
          + ("none reaches it" if x is None else f"{x:.2f}x (all attention kernels, the rest unchanged)"))
    for n, r in rows.items():
        c = r["sm_mhz_watts"]
        print(f"{n}-token prompts: mean SM clock / power over the timed prompts: " + ", ".join(
            f"{mode} {v[0]:.0f} MHz / {v[1]:.0f} W" if v else f"{mode} n/a" for mode, v in c.items()))
    print(f"attention launches of the {n2}-token prompt (us):")
    for name, parts in r2["attention_launches_us"].items():
        for part, st in parts.items():
            print(f"  {name:24s} {part:>8s}: {st['n']:5d} launches, p10 {st['p10']:7.1f}, p50 {st['p50']:7.1f}, "
                  f"p90 {st['p90']:7.1f}")
    print(f"kernels by us per token, first window and steady state (the {args.top} largest differences):")
    k1, k2 = r1["kernels"], r2["kernels"]
    diff = {}
    for name in set(k1) | set(k2):
        c1, t1 = k1.get(name, (0, 0.0))
        c2, t2 = k2.get(name, (0, 0.0))
        diff[name] = (t1 / n1, (t2 - t1) / (n2 - n1), c1, c2)
    for name, (f_us, s_us, c1, c2) in sorted(diff.items(), key=lambda kv: -abs(kv[1][1] - kv[1][0]))[:args.top]:
        print(f"  {f_us:7.3f} {s_us:7.3f}  launches {c1:6d} {c2:6d}  {name}")


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--size", default="3b", help="a paper size (125m ... 3b) or tiny (a smoke run)")
    p.add_argument("--contexts", nargs=2, type=int, default=[8192, 40960])
    p.add_argument("--reps", type=int, default=5)
    p.add_argument("--target", type=float, default=1.15)
    p.add_argument("--top", type=int, default=12)
    p.add_argument("--split-us", type=float, default=1000.0,
                   help="attention launches above this many us (at 3B: the prefix chunks' forward) are summarized "
                        "apart from the shorter ones (the inner steps')")
    p.add_argument("--out")
    args = p.parse_args(argv)
    device = default_device()
    tiny = args.size == "tiny"
    model = build(model_config(args.size, "e2e"), device=device,
                  dtype=torch.float32 if tiny else torch.bfloat16).eval()
    W = model.cfg.window
    n1, n2 = args.contexts
    if n1 != W or n2 <= n1 or n2 % W:
        raise SystemExit(f"--contexts: the first must be the window ({W}), the second a larger multiple of it")
    ttt = TTTConfig(train_mode="meta", mini_batch_size=32 if tiny else 1024)
    graphs = InferenceGraphs(capture=device == "cuda")
    clocks = ClockSampler()
    with torch.no_grad():
        if device == "cuda":  # captures the step graphs
            feed(start(model, ttt, 1, graphs=graphs), torch.randint(0, model.cfg.vocab_size, (1, 3 * W + 1),
                                                                    device=device))
        rows = {n: prompt_row(model, ttt, graphs, clocks, n, args.reps, args.split_us, device) for n in (n1, n2)}
    per_token = per_token_figures(rows[n1], rows[n2])
    x = required_speedup(per_token["first"], per_token["steady"], args.target)
    print_report(args, W, rows, per_token, x)
    if args.out:
        write_json(args.out, {"size": args.size, "window": W, "prompts": rows, "per_token": per_token,
                              "target": args.target, "required_attention_speedup": x}, device=device)


if __name__ == "__main__":
    main()
