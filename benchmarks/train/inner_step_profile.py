"""Where the time of one inference TTT inner step goes (3B, b = 1024, steady state past W), kernel by kernel; or,
with --prefix, the time of one prefill chunk's pass through the prefix blocks (W tokens, the caches full); or,
with --feed N, a whole N-token prompt through `feed` as latency.py runs it (graphs, look-ahead), where it also says
how long the GPU sat idle: wall clock against the union of the kernels' intervals over both streams.

    python -m benchmarks.train.inner_step_profile [--size 3b] [--top 25] [--ops] [--prefix | --feed 65536]
    python -m benchmarks.train.inner_step_profile --size tiny     # a smoke run (the CPU's too)

Builds the paper config with random bf16 weights, prefills 3 W tokens through `feed` with CUDA graphs (so the
step graphs exist), then times (a) one replayed step graph, CUDA events, median of 20, and (b) one eager step
under torch.profiler, whose kernels (the same ones the graph replays) are grouped and summed.
"""
from __future__ import annotations

import argparse
import statistics
import time

import torch
from torch.profiler import profile

from ttt_e2e.config import TTTConfig
from ttt_e2e.inference import InferenceGraphs, feed, start
from ttt_e2e.inference.engine import _autocast, _blocks

from benchmarks.core.env import describe, environment
from benchmarks.core.models import build, model_config
from benchmarks.core.timing import cuda_event_ms, default_device, kernel_launches, profiler_activities, sync

DEVICE = default_device()


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--size", default="3b", help="a paper size (125m ... 3b) or tiny (a smoke run)")
    p.add_argument("--top", type=int, default=25)
    p.add_argument("--ops", action="store_true", help="also the ATen ops (with shapes) by their kernels' time")
    p.add_argument("--prefix", action="store_true", help="profile a prefill chunk's prefix pass instead")
    p.add_argument("--feed", type=int, default=0, help="profile a whole prompt of this many tokens instead")
    args = p.parse_args(argv)
    tiny = args.size == "tiny"
    model = build(model_config(args.size, "e2e"), device=DEVICE,
                  dtype=torch.bfloat16 if DEVICE == "cuda" else torch.float32).eval()
    ttt = TTTConfig(train_mode="meta", mini_batch_size=32 if tiny else 1024)
    print(describe(environment(DEVICE)))
    activities = profiler_activities(cpu=args.ops)
    with torch.no_grad():
        if args.feed:
            prof = _profile_feed(model, ttt, activities, args.ops, args.feed)
        else:
            prof = (_profile_prefix if args.prefix else _profile_step)(model, ttt, activities, args.ops)
    launches = kernel_launches(prof)
    groups = {name: sum(ts) for name, ts in launches.items()}
    total = sum(groups.values())
    print(f"profiled (eager): {sum(map(len, launches.values()))} kernels, {total / 1e3:.2f} ms of GPU time")
    total = total or 1.0  # no GPU: no kernels
    for name, t in sorted(groups.items(), key=lambda kv: -kv[1])[:args.top]:
        print(f"{t / 1e3:8.2f} ms {100 * t / total:5.1f}% {len(launches[name]):5d}x  {name}")
    if args.ops:
        ops = [e for e in prof.key_averages(group_by_input_shape=True)
               if e.device_type == torch.autograd.DeviceType.CPU and e.self_device_time_total > 0]
        print("--- ops by the GPU time of their own kernels")
        for e in sorted(ops, key=lambda e: -e.self_device_time_total)[:args.top]:
            shapes = str(e.input_shapes)[:110]
            print(f"{e.self_device_time_total / 1e3:8.2f} ms {e.count:5d}x  {e.key[:32]:32s} {shapes}")


def _profile_step(model, ttt, activities, ops):
    W, b = model.cfg.window, ttt.mini_batch_size
    ids = torch.randint(0, model.cfg.vocab_size, (1, 3 * W + 1), device=DEVICE)
    graphs = InferenceGraphs(capture=DEVICE == "cuda")
    state = start(model, ttt, 1, graphs=graphs)
    feed(state, ids)
    h = torch.randn(1, b, model.cfg.d_model, device=DEVICE, dtype=model.wte.weight.dtype)
    tgt = ids[:, 1:b + 1]
    mask = torch.ones_like(tgt, dtype=torch.bool)
    pos0 = state.pos - state.pos % b + b  # past W: the steady-state graph
    with _autocast(state):
        graphs.inner_step(state, h, tgt, mask, pos0)
        _report_ms("replayed steady-state step", lambda: graphs.inner_step(state, h, tgt, mask, pos0))
        graphs.capture = False  # the same code, eagerly, for the profiler
        graphs.inner_step(state, h, tgt, mask, pos0)
        sync()
        with profile(activities=activities, record_shapes=ops) as prof:
            graphs.inner_step(state, h, tgt, mask, pos0)
            sync()
    return prof


def _profile_prefix(model, ttt, activities, ops):
    """The prefix blocks over a chunk of W tokens whose caches hold a whole window, as in a long prompt's prefill
    (chunks of W at positions that are multiples of W)."""
    W, P = model.cfg.window, model.cfg.n_prefix
    state = start(model, ttt, 1, overlap_prefix=False)
    ids = torch.randint(0, model.cfg.vocab_size, (1, W), device=DEVICE)
    x = model.wte(ids)
    with _autocast(state):
        for c in range(2):  # fill the caches: positions 0 .. 2W-1
            _blocks(state, x, 0, P, c * W)
        pos = [2 * W]

        def chunk():
            _blocks(state, x, 0, P, pos[0])
            pos[0] += W

        chunk()
        _report_ms("prefix pass over one chunk", chunk)
        with profile(activities=activities, record_shapes=ops) as prof:
            chunk()
            sync()
    return prof


def _profile_feed(model, ttt, activities, ops, n):
    W = model.cfg.window
    graphs = InferenceGraphs(capture=DEVICE == "cuda")
    warm = torch.randint(0, model.cfg.vocab_size, (1, 3 * W + 1), device=DEVICE)
    ids = torch.randint(0, model.cfg.vocab_size, (1, n), device=DEVICE)

    def prompt():
        feed(start(model, ttt, 1, graphs=graphs), ids)

    feed(start(model, ttt, 1, graphs=graphs), warm)  # captures the step graphs
    prompt()
    _report_ms(f"prefill of {n} tokens", prompt, reps=3)
    sync()
    with profile(activities=activities, record_shapes=ops) as prof:
        t0 = time.perf_counter()
        prompt()
        sync()
        wall = time.perf_counter() - t0
    spans = sorted((e.time_range.start, e.time_range.end) for e in prof.events()
                   if e.device_type == torch.autograd.DeviceType.CUDA)
    if not spans:  # no GPU
        return prof
    busy, end = 0.0, float("-inf")
    for a, z in spans:  # the union of the kernels' intervals (us)
        busy += max(0.0, z - max(a, end))
        end = max(end, z)
    span = spans[-1][1] - spans[0][0]
    print(f"profiled prompt: wall {1e3 * wall:.1f} ms (under the profiler), first kernel to last {span / 1e3:.1f} ms,"
          f" GPU busy (union over streams) {busy / 1e3:.1f} ms, idle {(span - busy) / 1e3:.1f} ms")
    return prof


def _report_ms(what, fn, reps=20):
    reps = reps if DEVICE == "cuda" else 1
    print(f"{what}: {statistics.median(cuda_event_ms(fn, reps)):.2f} ms (median of {reps})")


if __name__ == "__main__":
    main()
