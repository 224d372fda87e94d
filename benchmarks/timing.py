"""CUDA-event timing shared by the benchmarks (the latency benchmark times whole calls on the wall clock instead)."""
from __future__ import annotations

import torch


def cuda_event_ms(fn, reps: int) -> list[float]:
    """Milliseconds of each of `reps` calls of fn, between CUDA events around it (the caller warms up first)."""
    times = []
    for _ in range(reps):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    return times
