"""The graphed micro-step under FSDP2: whole parameters in, sharded gradients out, outside the graph.

FSDP2's hooks (all-gathers on its own streams, its reduce-scatter queued from a backward callback, its Python
state machine) are not run inside the capture at all. The graph holds a plain LossModule over a replica of the
model whose parameters are whole tensors ("gathered"): before a step's first micro-batch each is filled from its
FSDP2 shards (one all-gather per parameter; on one rank the replica's parameter IS the shard's storage, so there
is nothing to copy), the captured micro-steps accumulate into flat gradient buckets (graphed.FlatGrads), and after
the last one the buckets are averaged over the ranks and each FSDP2 parameter's .grad is set to its rows of the
mean, a DTensor view into the bucket (no copy; zeroing the buckets zeroes it). Clip and AdamW then run on the
sharded parameters exactly as under eager FSDP2, and checkpoints, the spike guard's snapshots and resume see
only the sharded model.
"""
from __future__ import annotations

import copy

import torch
import torch.distributed as dist
import torch.nn as nn


def _chunk_offset(p, rank: int, world: int) -> int:
    """The first row of rank's shard of p (FSDP2 shards dim 0 as torch.chunk does)."""
    return rank * -(-p.shape[0] // world)


class ShardBridge:
    """Between the FSDP2-sharded `model` and a replica of it whose parameters are whole. Build it on the model
    already sharded (fully_shard), before training; `replica` is built from `template`, a copy of the model taken
    before sharding (its parameters are reused as the whole buffers on several ranks, dropped on one)."""

    def __init__(self, model: nn.Module, template: nn.Module):
        self.world = dist.get_world_size()
        self.rank = dist.get_rank()
        self.sharded = list(model.parameters())
        self.replica = template
        names = [n for n, _ in model.named_parameters()]
        self.whole: list[nn.Parameter] = []
        for name, p in zip(names, self.sharded):
            mod_name, _, attr = name.rpartition(".")
            mod = self.replica.get_submodule(mod_name)
            if self.world == 1:  # the shard is the whole tensor: share its storage (nothing to gather)
                w = nn.Parameter(p.to_local().detach(), requires_grad=p.requires_grad)
                setattr(mod, attr, w)  # (this model ties its embeddings by reuse of wte, not by a second slot)
            else:
                w = getattr(mod, attr)
            self.whole.append(w)
        self.rows = [(_chunk_offset(p, self.rank, self.world), p.to_local().shape[0] if p.dim() else 0)
                     for p in self.sharded]
        self.gather()

    @torch.no_grad()
    def gather(self) -> None:
        """Every whole parameter filled from the current shards (on one rank a pointer check: they are the same
        storage unless something replaced the shard's)."""
        for p, w in zip(self.sharded, self.whole):
            local = p._local_tensor  # to_local() without its autograd function: this runs every step
            if w.data_ptr() == local.data_ptr():
                continue
            if self.world == 1:
                w.copy_(local)
            elif p.shape[0] % self.world == 0 and local.is_contiguous():  # even shards: straight into w
                dist.all_gather_into_tensor(w, local, group=p.device_mesh.get_group())
            else:
                w.copy_(p.full_tensor())

    def scatter_grads(self) -> None:
        """Each sharded parameter's .grad its rows of the whole (already averaged) gradient: views set once, which
        the buckets' in-place zeroing and accumulation keep current."""
        from torch.distributed.tensor import DTensor

        for p, w, (offset, n) in zip(self.sharded, self.whole, self.rows):
            if p.grad is None:
                local = w.grad.narrow(0, offset, n) if w.grad.dim() else w.grad
                p.grad = DTensor.from_local(local, p.device_mesh, p.placements, run_check=False, shape=p.shape,
                                            stride=p.stride())


def replica_of(model: nn.Module) -> nn.Module:
    """A copy of the (not yet sharded) model, to become the graphed step's replica."""
    return copy.deepcopy(model)
