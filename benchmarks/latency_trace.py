"""latency.py with a trace: every feed's time and the CUDA allocator's memory after it, and every thread's Python
stack every 45 s (faulthandler), written to $OUT/latency_trace.txt (or ./latency_trace.txt). For a run that stalls
or slows down: where it waits, and whether memory grows from prompt to prompt.

    python benchmarks/latency_trace.py --methods ttt --contexts 8192 32768 131072 --long-reps 2 --out t.json

Takes latency.py's arguments. Only on a GPU (the allocator's figures are CUDA's).
"""
import faulthandler
import os
import sys
import time

import torch

import latency  # benchmarks/latency.py: the script's own folder is on sys.path

log = open(os.path.join(os.environ.get("OUT", "."), "latency_trace.txt"), "w", buffering=1)
faulthandler.dump_traceback_later(45, repeat=True, file=log)
_feed = latency.feed


def feed(state, ids):
    t0 = time.perf_counter()
    logits = _feed(state, ids)
    torch.cuda.synchronize()
    dt = time.perf_counter() - t0
    if ids.shape[1] > 1 or dt > 0.5:  # prompts, and any decoded token that took long
        free, _ = torch.cuda.mem_get_info()
        log.write(f"{time.strftime('%H:%M:%S')} feed {ids.shape[1]} tokens at pos {state.pos - ids.shape[1]}: "
                  f"{dt:.3f} s; free {free / 2**30:.1f} GiB, allocated {torch.cuda.memory_allocated() / 2**30:.1f}, "
                  f"reserved {torch.cuda.memory_reserved() / 2**30:.1f}\n")
    return logits


if __name__ == "__main__":
    latency.feed = feed
    sys.argv[0] = "latency.py"
    latency.main()
