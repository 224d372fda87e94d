"""CUDA-event timing shared by the benchmarks (the latency benchmark times whole calls on the wall clock instead)."""
from __future__ import annotations

import statistics

import torch


def graph_us(fn, inner: int = 10, reps: int = 15) -> float:
    """us per call of fn: the median over `reps` replays of a CUDA graph of `inner` calls (launch overhead out of
    the figure)."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # warm-up (compilation) outside the capture
        fn()
    torch.cuda.current_stream().wait_stream(side)
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for _ in range(inner):
            fn()
    graph.replay()
    torch.cuda.synchronize()
    return statistics.median(cuda_event_ms(graph.replay, reps)) / inner * 1e3


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
