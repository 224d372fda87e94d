"""An infinite, deterministic, resumable sampler of window indices, split disjointly over ranks."""
from __future__ import annotations

import torch

from .errors import DataError


class StatefulSampler:
    """Each epoch is a fresh permutation of all windows (torch.Generator seeded with seed + epoch), cut into
    global batches of batch_size * world_size; rank r takes slice r of every global batch. The windows left over
    after the last full global batch of an epoch are skipped that epoch (a different permutation next epoch).

    The order depends only on (num_windows, seed, global batch size): a run resumed on a different number of
    ranks with the same global batch sees the same batches. state_dict() after k next_batch() calls, loaded into a
    fresh sampler, continues with batch k + 1.
    """

    def __init__(self, num_windows: int, batch_size: int, rank: int = 0, world_size: int = 1, seed: int = 0):
        if batch_size < 1:
            raise DataError(f"batch_size must be >= 1, got {batch_size}")
        if world_size < 1 or not 0 <= rank < world_size:
            raise DataError(f"rank {rank} is not in [0, world_size={world_size})")
        global_batch = batch_size * world_size
        if num_windows < global_batch:
            raise DataError(f"only {num_windows} windows, fewer than one global batch of {global_batch} "
                            f"(batch_size {batch_size} x world_size {world_size}); use more data or smaller batches")
        self.num_windows = num_windows
        self.batch_size = batch_size
        self.rank = rank
        self.world_size = world_size
        self.seed = seed
        self.global_batch = global_batch
        self.batches_per_epoch = num_windows // global_batch
        self.epoch = 0
        self.position = 0  # global batches already taken in this epoch
        self._perm_epoch = None
        self._perm = None

    def _permutation(self) -> torch.Tensor:
        if self._perm_epoch != self.epoch:
            g = torch.Generator().manual_seed(self.seed + self.epoch)
            self._perm = torch.randperm(self.num_windows, generator=g)
            self._perm_epoch = self.epoch
        return self._perm

    def next_batch(self) -> list[int]:
        if self.position >= self.batches_per_epoch:
            self.epoch += 1
            self.position = 0
        start = self.position * self.global_batch + self.rank * self.batch_size
        batch = self._permutation()[start:start + self.batch_size].tolist()
        self.position += 1
        return batch

    def __iter__(self):
        while True:
            yield self.next_batch()

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "position": self.position, "seed": self.seed,
                "num_windows": self.num_windows, "global_batch": self.global_batch}

    def load_state_dict(self, state: dict) -> None:
        # A different corpus, seed or global batch would silently give a different order: refuse it.
        for k in ("num_windows", "seed", "global_batch"):
            if k in state and state[k] != getattr(self, k):
                raise DataError(f"sampler state has {k}={state[k]}, but this sampler has {k}={getattr(self, k)}; "
                                f"cannot resume the same data order")
        self.epoch = int(state["epoch"])
        self.position = int(state["position"])
