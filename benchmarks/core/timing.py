"""Timing shared by the benchmarks: CUDA events (with warm-up, or over replays of a CUDA graph), the host clock
(with a synchronize around each call), medians and spreads; the profiler's kernels by name; and the GPU clock
sampler that says at what clock a figure ran."""
from __future__ import annotations

import statistics
import subprocess
import threading
import time

import torch


def default_device() -> str:
    """"cuda" where there is a GPU, else "cpu" (smoke runs: the code paths, not the figures)."""
    return "cuda" if torch.cuda.is_available() else "cpu"


def sync() -> None:
    """Wait for the GPU's queued work (nothing to wait for without one)."""
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def profiler_activities(cpu: bool = False) -> list:
    """torch.profiler's activities: the GPU's kernels (the CPU's ops too with cpu=True, or without a GPU)."""
    from torch.profiler import ProfilerActivity

    if not torch.cuda.is_available():
        return [ProfilerActivity.CPU]
    return [ProfilerActivity.CUDA] + ([ProfilerActivity.CPU] if cpu else [])


def reset_peak_memory() -> None:
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()


def peak_memory_gib() -> float | None:
    """The GPU allocator's peak since reset_peak_memory (None without a GPU)."""
    return torch.cuda.max_memory_allocated() / 2**30 if torch.cuda.is_available() else None


def graph_us(fn, inner: int = 10, reps: int = 15) -> float:
    """us per call of fn: the median over `reps` replays of a CUDA graph of `inner` calls (launch overhead out of
    the figure). Without a GPU: the median host time of `reps` calls (the code path, not a figure)."""
    if not torch.cuda.is_available():
        return statistics.median(host_ms(fn, reps)) * 1e3
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
    """Milliseconds of each of `reps` calls of fn, between CUDA events around it (the caller warms up first).
    Without a GPU: the host time of each call (the code path, not a figure)."""
    if not torch.cuda.is_available():
        return host_ms(fn, reps, warmup=0)
    times = []
    for _ in range(reps):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    return times


def cuda_ms(fn, reps: int, warmup: int = 2) -> list[float]:
    """Milliseconds of each of `reps` calls of fn (CUDA events) after `warmup` untimed calls."""
    for _ in range(warmup):
        fn()
    return cuda_event_ms(fn, reps)


def host_ms(fn, reps: int, warmup: int = 1, device: str = "cpu") -> list[float]:
    """Milliseconds of each of `reps` calls of fn on the host clock, the device synchronized before and after
    each call (the figure of a whole call, host work included), after `warmup` untimed calls."""
    sync = torch.cuda.synchronize if str(device).startswith("cuda") else (lambda: None)
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(reps):
        sync()
        t0 = time.perf_counter()
        fn()
        sync()
        times.append(1e3 * (time.perf_counter() - t0))
    return times


def kernel_ms(fn, warmup: int = 100, rep: int = 500, return_mode: str = "mean") -> float:
    """Milliseconds per call of fn launched back to back (triton.testing.do_bench: GPU time, no host time in the
    figure; its mean by default, as do_bench). Without a GPU: the host time of one call after one warm-up (the
    code path, not a figure)."""
    if not torch.cuda.is_available():
        return host_ms(fn, reps=1)[0]
    from triton.testing import do_bench

    return do_bench(fn, warmup=warmup, rep=rep, return_mode=return_mode)


def spread(xs: list[float]) -> float:
    """(max - min) / median: how far apart the repeats of one figure are."""
    return (max(xs) - min(xs)) / statistics.median(xs)


def summary(xs: list[float]) -> dict:
    """The median of the repeats, their spread and the repeats themselves (what a result JSON keeps)."""
    return {"median": statistics.median(xs), "spread": spread(xs), "runs": list(xs)}


def kernel_launches(prof) -> dict[str, list[float]]:
    """Each GPU kernel's launch times (us) in a torch.profiler run, by kernel name (template arguments dropped)."""
    out: dict[str, list[float]] = {}
    for e in prof.events():
        if e.device_type == torch.autograd.DeviceType.CUDA:
            out.setdefault(e.name.split("<")[0][:90], []).append(e.device_time)
    return out


class ClockSampler:
    """The GPU's SM clock (MHz) and power draw (W), sampled by `nvidia-smi -lms` on a thread, for the figures of a
    run that the board's power limit can slow: an H100 at its ~700 W limit drops from 1980 to ~1650 MHz within
    about a second of sustained load, so a short call after an idle stretch runs faster than a long one.
    Without nvidia-smi it samples nothing and `over` returns None."""

    def __init__(self, every_ms: int = 50):
        self.samples: list[tuple[float, float, float]] = []  # (time.time(), MHz, W)
        try:
            self._smi = subprocess.Popen(["nvidia-smi", "--query-gpu=clocks.sm,power.draw",
                                          "--format=csv,noheader,nounits", "-lms", str(every_ms)],
                                         stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
        except OSError:
            return
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self):
        for line in self._smi.stdout:
            try:
                mhz, watts = (float(x) for x in line.split(",")[:2])
            except ValueError:
                continue
            self.samples.append((time.time(), mhz, watts))

    def over(self, t0: float, t1: float):
        """Mean (MHz, W) of the samples taken between time.time() values t0 and t1, or None."""
        xs = [(mhz, w) for t, mhz, w in list(self.samples) if t0 <= t <= t1]
        if not xs:
            return None
        return sum(x[0] for x in xs) / len(xs), sum(x[1] for x in xs) / len(xs)
