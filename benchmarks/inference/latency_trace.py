"""latency.py with a trace: every feed's time, the GPU's mean SM clock and power draw over it (nvidia-smi sampled
every 50 ms), the CUDA allocator's memory after it, and every thread's Python stack every 45 s (faulthandler),
written to $OUT/latency_trace.txt (or ./latency_trace.txt). For a run that stalls or slows down: where it waits,
whether memory grows from prompt to prompt, and whether the clock does not hold (a long prefill runs at the
board's power limit, a short one after an idle stretch may not reach it).

    python -m benchmarks.inference.latency_trace --methods ttt --contexts 8192 32768 131072 --long-reps 2 --out t.json

Takes latency.py's arguments. The allocator's figures are CUDA's: a --tiny run on the CPU traces the times only.
"""
import faulthandler
import os
import time

import torch

from benchmarks.core.timing import ClockSampler, sync
from benchmarks.inference import latency

_feed = latency.feed


def traced_feed(log, clocks):
    """latency.feed, each prompt (and each slow decoded token) logged with its time, clock and memory."""

    def feed(state, ids):
        t0, w0 = time.perf_counter(), time.time()
        logits = _feed(state, ids)
        sync()
        dt, w1 = time.perf_counter() - t0, time.time()
        if ids.shape[1] > 1 or dt > 0.5:  # prompts, and any decoded token that took long
            clk = clocks.over(w0, w1)
            clk = f"SM {clk[0]:.0f} MHz, {clk[1]:.0f} W; " if clk else ""
            mem = ""
            if torch.cuda.is_available():
                free, _ = torch.cuda.mem_get_info()
                mem = (f"free {free / 2**30:.1f} GiB, allocated {torch.cuda.memory_allocated() / 2**30:.1f}, "
                       f"reserved {torch.cuda.memory_reserved() / 2**30:.1f}")
            log.write(f"{time.strftime('%H:%M:%S')} feed {ids.shape[1]} tokens at pos {state.pos - ids.shape[1]}: "
                      f"{dt:.3f} s; {clk}{mem}\n")
        return logits

    return feed


def main(argv=None):
    with open(os.path.join(os.environ.get("OUT", "."), "latency_trace.txt"), "w", buffering=1) as log:
        faulthandler.dump_traceback_later(45, repeat=True, file=log)
        latency.feed = traced_feed(log, ClockSampler())
        try:
            latency.main(argv)
        finally:
            latency.feed = _feed
            faulthandler.cancel_dump_traceback_later()


if __name__ == "__main__":
    main()
