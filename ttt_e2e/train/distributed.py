"""Ranks, devices and the process group.

torchrun (single or multi node) sets RANK / WORLD_SIZE / LOCAL_RANK / MASTER_ADDR / MASTER_PORT. A Slurm job
launched by hydra-submitit-launcher (one task per GPU) sets only SLURM_* variables; submitit's helper turns them
into the torchrun ones, so both launchers reach the same init_process_group. Backend: nccl on CUDA, gloo on CPU
(both, nccl for CUDA tensors and gloo for CPU ones, where FSDP2 offloads to the CPU).

A process group is made whenever a launcher started the process (torchrun sets RANK, even for one rank: that job
then runs the same DDP code as a job of many), and for FSDP2 in a plain one-process run (a 1-rank group in
memory: `python train.py training.distributed=fsdp` shards nothing, but offloads to the CPU where asked).
"""
from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist

from ttt_e2e.config import ConfigError


@dataclass
class DistInfo:
    rank: int
    world_size: int
    local_rank: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def _export_slurm_env() -> None:
    """Inside a multi-task Slurm job without torchrun's variables, derive them (needs submitit)."""
    if "RANK" in os.environ or int(os.environ.get("SLURM_NTASKS", "1")) <= 1:
        return
    try:
        from submitit.helpers import TorchDistributedEnvironment
    except ImportError as e:
        raise ConfigError("a multi-task Slurm job needs torchrun's RANK/WORLD_SIZE variables or the submitit "
                          "package (pip install hydra-submitit-launcher)") from e
    # submitit reads the Slurm variables once it knows it is in a Slurm job: it is told so by its own launcher;
    # a plain `srun python train.py` is one too.
    os.environ.setdefault("SUBMITIT_EXECUTOR", "slurm")
    # Not CUDA_VISIBLE_DEVICES: submitit would set it to the local rank alone, which then no longer indexes the
    # visible GPUs (pick_device selects the local rank's among those Slurm gave the task).
    TorchDistributedEnvironment().export(set_cuda_visible_devices=False)


def pick_device(device: str, local_rank: int) -> torch.device:
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda":
        if not torch.cuda.is_available():
            raise ConfigError("training.device=cuda but no CUDA device is available")
        # A task that Slurm bound to its own GPU(s) sees fewer devices than there are local ranks
        index = local_rank % torch.cuda.device_count()
        torch.cuda.set_device(index)
        return torch.device("cuda", index)
    return torch.device("cpu")


def init_distributed(device: str, need_group: bool = False, cpu_and_cuda: bool = False) -> DistInfo:
    """need_group: make a 1-rank group when no launcher set one up (FSDP2 needs one). cpu_and_cuda: on CUDA, a
    gloo backend beside nccl for CPU tensors (FSDP2's CPU offload)."""
    _export_slurm_env()
    launched = "RANK" in os.environ
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    dev = pick_device(device, local_rank)
    if (launched or world > 1 or need_group) and not dist.is_initialized():
        backend = ("cuda:nccl,cpu:gloo" if cpu_and_cuda else "nccl") if dev.type == "cuda" else "gloo"
        kwargs = {} if launched or world > 1 else dict(store=dist.HashStore(), rank=0, world_size=1)
        dist.init_process_group(backend=backend, device_id=dev if dev.type == "cuda" else None, **kwargs)
    return DistInfo(rank, world, local_rank, dev)


def shutdown() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()


def is_distributed() -> bool:
    return dist.is_initialized() and dist.get_world_size() > 1


def barrier() -> None:
    if is_distributed():
        dist.barrier()


def all_reduce_sum(t: torch.Tensor) -> torch.Tensor:
    """Sum over ranks (in place, returned for chaining); a no-op in one process."""
    if is_distributed():
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t


def broadcast_object(obj, src: int = 0):
    """Rank src's Python object on every rank (e.g. rank 0's run dir)."""
    if not is_distributed():
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=src)
    return box[0]
