"""training.cuda_graph: one micro-batch's forward and backward captured as a CUDA graph and replayed every step,
on one GPU, under DDP and under FSDP2 (the same micro-step; FSDP2's parameters in and gradients out: sharded.py).

A meta-mode step launches tens of thousands of small kernels (every op of every inner step, its backward and
double backward) and is host-bound on a fast GPU; its shapes are static and it has no host syncs, so one capture
(ttt_e2e/cuda_graph.py) serves the whole run. What changes between steps lives in device memory: the micro-batch
(copied into static buffers) and the inner-lr multiplier (a 0-d tensor; the outer lr is the optimizer's, which
stays eager with the clip and the non-finite checks).

Gradients: every parameter's .grad is a view into a few flat fp32 buckets allocated before capture (at the first
step's begin(), after a resumed run's optimizer state is loaded: torch.distributed.checkpoint initializes an empty
optimizer's state only where no parameter has a .grad), so the
captured backward accumulates into them (gradient accumulation works unchanged; `zero_grad` zeroes the buckets
in place). Data parallelism is done here, not by DDP: the graph holds the UNWRAPPED LossModule's forward and
backward, and after the last micro-batch of a step `end()` all-reduces each bucket once, outside the
graph (each bucket divided by the world size, then summed: DDP's own order, so the mean is the same). Why not DDP
inside the graph: DDP's hooks run Python bookkeeping per bucket during the backward and its bucket rebuild and
unused-parameter search break a static capture; NCCL could be captured, but the reduction would then be replayed
after every micro-batch instead of once per step. What the reduction outside the graph gives up is its overlap
with the backward: one all-reduce of the model's fp32 gradients per optimizer step, against a meta step of
several forward/backward passes per parameter. Not yet measured on several GPUs (none were lent when this was
written); benchmarks/train/parallel_gpu.py measures the 1-rank DDP-graphed step against the single-GPU graphed one,
and benchmarks/train/scaling.py the weak scaling, whose figures go to benchmarks/RESULTS.md. Rank 0's parameters are
broadcast at the start, as DDP's constructor does.

The warm-up calls (kernel compilation, allocator sizing) run the real forward/backward on the first batch and
their gradients are zeroed: they change no state, so a graphed run computes what an eager one computes. A capture
that fails (an op that syncs with the host, out of memory, ...) falls back to the same unwrapped module run
eagerly, with a warning that says why: the run stays correct, and is visibly slower, never silently so.
"""
from __future__ import annotations

import logging
import warnings
from typing import Callable, Optional

import torch
import torch.distributed as dist

from ttt_e2e.cuda_graph import GraphedStep

log = logging.getLogger(__name__)

BUCKET_BYTES = 256 * 2**20  # per flat gradient buffer (NCCL reaches full bandwidth well below this)


class FlatGrads:
    """Every parameter's .grad as a view into a few flat buffers (one dtype each, at most BUCKET_BYTES unless a
    single parameter is larger), and their mean over ranks."""

    def __init__(self, params: list[torch.nn.Parameter], bucket_bytes: int = BUCKET_BYTES):
        self.buckets: list[torch.Tensor] = []
        groups: list[list[torch.nn.Parameter]] = []
        size = 0
        for p in params:
            nbytes = p.numel() * p.element_size()
            if not groups or groups[-1][0].dtype != p.dtype or groups[-1][0].device != p.device \
                    or size + nbytes > bucket_bytes:
                groups.append([])
                size = 0
            groups[-1].append(p)
            size += nbytes
        for group in groups:
            flat = torch.zeros(sum(p.numel() for p in group), dtype=group[0].dtype, device=group[0].device)
            offset = 0
            for p in group:
                p.grad = flat[offset:offset + p.numel()].view_as(p)
                offset += p.numel()
            self.buckets.append(flat)

    def zero_(self) -> None:
        for b in self.buckets:
            b.zero_()

    def all_reduce_mean(self) -> None:
        """The mean over the process group's ranks, in place (a no-op without a process group)."""
        if not dist.is_initialized() or dist.get_world_size() == 1:
            return
        world = dist.get_world_size()
        for b in self.buckets:
            b.div_(world)
            dist.all_reduce(b, op=dist.ReduceOp.SUM)


def broadcast_parameters(module: torch.nn.Module) -> None:
    """Rank 0's parameters and buffers on every rank (what DDP's constructor does)."""
    if dist.is_initialized() and dist.get_world_size() > 1:
        for t in (*module.parameters(), *module.buffers()):
            dist.broadcast(t.data, src=0)


class GraphedMicroStep:
    """The graphed micro-step (train/step.py's interface), on an unwrapped LossModule; captures at the first call
    (with that micro-batch as the example). `bridge` (FSDP2): the ShardBridge whose replica `module` runs on.
    capture=False runs the same step eagerly (the fallback, and the CPU tests of this path)."""

    def __init__(self, module: torch.nn.Module, amp: Callable, n_micro: int, warmup: int = 2,
                 capture: bool = True, bridge=None):
        self.module, self.amp, self.n_micro, self.warmup, self.bridge = module, amp, n_micro, warmup, bridge
        self._grads: Optional[FlatGrads] = None
        self.graph: Optional[GraphedStep] = None
        self.capture = capture
        self.fallback_reason: Optional[str] = None
        self._ilr: Optional[torch.Tensor] = None

    @property
    def grads(self) -> FlatGrads:
        """Allocated at first use, not at construction: a checkpoint's optimizer state is loaded in between, and
        torch.distributed.checkpoint initializes an empty optimizer's state only where no parameter has a .grad."""
        if self._grads is None:
            self._grads = FlatGrads([p for p in self.module.parameters() if p.requires_grad])
        return self._grads

    def _forward_backward(self, x, y, m, ilr) -> dict:
        with self.amp():
            out = self.module(x, y, m, ilr)
        (out["loss"] / self.n_micro).backward()
        return {k: v.detach() for k, v in out.items()}

    def _capture(self, x, y, m, ilr) -> GraphedStep:
        # With a process group, NCCL's watchdog thread polls its events during the capture: thread_local keeps
        # that from invalidating it (the capturing thread's own unsafe calls still fail the capture)
        mode = "thread_local" if dist.is_initialized() else "global"
        return GraphedStep(self._forward_backward, x, y, m, ilr, warmup=self.warmup, zero_grad=self.grads.zero_,
                           capture_error_mode=mode)

    @property
    def captured(self) -> bool:
        """Whether the step replays a graph (False before the first call, on a CPU, or after a failed capture)."""
        return self.graph is not None

    def begin(self) -> None:
        """Before a step's first micro-batch: the gradient buckets (at the first step), under FSDP2 the whole
        parameters from the shards."""
        self.grads  # noqa: B018 -- allocated here, before any backward adds to the .grad it replaces
        if self.bridge is not None:
            self.bridge.gather()

    def end(self) -> None:
        """After a step's last micro-batch: the gradients' mean over ranks (one all-reduce per bucket, outside the
        graph; a no-op on one rank), under FSDP2 each rank's rows of it as its shards' gradients."""
        self.grads.all_reduce_mean()
        if self.bridge is not None:
            self.bridge.scatter_grads()

    def zero_grad(self) -> None:
        self.grads.zero_()  # in place: the graph's backward accumulates into these very tensors

    def __call__(self, x: torch.Tensor, y: torch.Tensor, m: torch.Tensor, ilr: float, last: bool = True) -> dict:
        """The micro-batch's outputs (when graphed, static tensors: read them before the next call); its gradient
        is added to the buckets."""
        if self._ilr is None:
            self._ilr = torch.zeros((), dtype=torch.float32, device=x.device)
        ilr_t = self._ilr.fill_(ilr)  # a device-side fill: no host sync (a tensor made from the float would wait)
        if self.capture and self.graph is None:
            try:
                self.graph = self._capture(x, y, m, ilr_t)
            except Exception as e:  # noqa: BLE001 -- any capture failure: run eagerly, and say so
                self.capture = False
                self.fallback_reason = f"{type(e).__name__}: {str(e).strip().splitlines()[0][:300] if str(e) else ''}"
                warnings.warn(f"training.cuda_graph: the capture failed ({self.fallback_reason}); this run continues "
                              "EAGERLY (correct, but several times slower in meta mode); set "
                              "training.cuda_graph=false to silence this", RuntimeWarning, stacklevel=2)
                log.warning("CUDA graph capture failed, running eagerly: %s", self.fallback_reason)
                if torch.cuda.is_available():
                    torch.cuda.synchronize()
                    torch.cuda.empty_cache()
                self.grads.zero_()  # whatever the failed warm-up or capture added
        if self.graph is None:
            return self._forward_backward(x, y, m, ilr)  # the float, as the eager path passes it
        return self.graph(x, y, m, ilr_t)
