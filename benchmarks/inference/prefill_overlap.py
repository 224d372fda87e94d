"""TTT prefill with and without the prefix look-ahead (`start(..., overlap_prefix=...)`, inference/engine.py).

    python -m benchmarks.inference.prefill_overlap          # 3B, bf16, CUDA graphs, as benchmarks/inference/latency.py
    python -m benchmarks.inference.prefill_overlap --contexts 131072 --reps 5
    python -m benchmarks.inference.prefill_overlap --tiny      # a toy model: a smoke run (the CPU's too)

With the look-ahead, the next 8K chunk's prefix blocks run on a second CUDA stream while the current chunk's
inner steps replay on the first. The two settings alternate prompt by prompt, so that drift in the machine's
speed hits both alike; each context reports the median and the fastest prefill per token, and their ratio.
A prompt of one chunk (8K) has nothing to look ahead to: there both settings run the same work.
"""
from __future__ import annotations

import argparse
import statistics

import torch

from ttt_e2e.inference import InferenceGraphs, feed, start

from benchmarks.core.env import describe, environment
from benchmarks.core.timing import default_device, host_ms
from benchmarks.inference.latency import build


def prefill_s(model, ttt, graphs, n: int, overlap: bool) -> float:
    """Seconds of one TTT prefill of n random tokens (the state's allocation not timed)."""
    device = model.wte.weight.device
    prompt = torch.randint(0, model.cfg.vocab_size, (1, n), device=device)
    state = start(model, ttt, 1, graphs=graphs, overlap_prefix=overlap)
    return host_ms(lambda: feed(state, prompt), reps=1, warmup=0, device=device.type)[0] / 1e3


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--contexts", nargs="+", type=int, default=[8192, 32768, 131072])
    p.add_argument("--reps", type=int, nargs="+", default=[9, 5, 3], help="prompts per setting, per context")
    p.add_argument("--tiny", action="store_true", help="a toy model (a smoke run; give small --contexts)")
    args = p.parse_args(argv)
    device = default_device()
    if device != "cuda" and not args.tiny:
        raise SystemExit("needs a GPU (--tiny for a smoke run)")
    reps = args.reps + [args.reps[-1]] * (len(args.contexts) - len(args.reps))
    model, ttt = build("ttt", args.tiny, device, torch.bfloat16 if device == "cuda" else torch.float32)
    graphs = InferenceGraphs(capture=device == "cuda")
    print(describe(environment(device)))
    with torch.no_grad():
        for overlap in (False, True):  # warm-up: kernels compiled, every step graph captured (past 2 W)
            prefill_s(model, ttt, graphs, 3 * model.cfg.window + 1, overlap)
        print("| context | serial us/token (median / fastest) | look-ahead us/token (median / fastest) | "
              "serial / look-ahead (median) |")
        print("|---:|---:|---:|---:|")
        for n, r in zip(args.contexts, reps):
            runs = {False: [], True: []}
            for _ in range(r):
                for overlap in (False, True):
                    runs[overlap].append(prefill_s(model, ttt, graphs, n, overlap))
            med = {o: 1e6 * statistics.median(t) / n for o, t in runs.items()}
            low = {o: 1e6 * min(t) / n for o, t in runs.items()}
            print(f"| {n} | {med[False]:.2f} / {low[False]:.2f} | {med[True]:.2f} / {low[True]:.2f} | "
                  f"{med[False] / med[True]:.3f} |", flush=True)


if __name__ == "__main__":
    main()
