"""What to do with a step whose outer gradient is bad (optim.spike_policy).

The unrolled meta-gradient of a long inner loop explodes once the inner loop turns unstable: the Jacobian of
phi_{t+1} = phi_t - eta clip(g_t) has directions that grow, so the gradient grows with the number of inner steps,
while the forward loss stays finite (docs/study.md measures it: at fixed weights the norm grows by orders of
magnitude from 64 to 128 inner steps at a large inner lr and stays flat at a quarter of it). Clipping keeps such a
gradient's direction, which is then mostly the unstable mode's, and with AdamW shrinks every other coordinate's.

- stop: a non-finite loss or gradient norm ends the run; a large finite norm is left to the clip.
- skip: what large-scale trainers do with a transient spike. A step whose loss or gradient norm is non-finite, or
  whose gradient norm exceeds spike_factor x the median of the last spike_window accepted norms (once
  spike_min_history are known), takes no update; it is counted and logged; spike_max_consecutive skipped steps in
  a row end the run. Skipped norms never enter the history, so a spike cannot raise the bar for the next one.
- rollback: skip as above, and treat spikes that keep coming as a region to leave, not steps to wait out (PaLM
  restarted from a checkpoint before the spike and skipped the data; OPT-175B also lowered the learning rate): a
  snapshot is taken every spike_snapshot_every accepted steps (parameters and optimizer state, in host memory);
  when spike_rollback_after spikes have come since it, restore it (in place), go on with new data, and multiply
  the inner lr by spike_backoff_ilr (the cause: a smaller eta makes the inner loop stable again) and the outer lr
  by spike_backoff_lr. The step count and the schedules go on (a rolled-back stretch counts as
  steps taken), so a run ends at training.steps. spike_max_rollbacks rollbacks and one more due end the run.

The guard's state (history, counts, the inner lr's scale) is saved with each checkpoint, and under rollback its
snapshot too (gathered into full tensors like the model, `snapshot.pt`: as large again as model.pt and the
optimizer state), so a resumed run, on any number of ranks, judges and rolls back as the uninterrupted one would.
A checkpoint's saved config carries the backed-off inner lr (`backed_off`), so eval.py and generate.py use it.
"""
from __future__ import annotations

import logging
import math
import statistics
from collections import deque
from dataclasses import dataclass, replace
from enum import Enum
from typing import Optional

import torch

from ttt_e2e.config import Config, OptimConfig

log = logging.getLogger(__name__)

SNAPSHOT_FILE = "snapshot.pt"  # in a checkpoint's step dir, under the rollback policy


def _local(t: torch.Tensor) -> torch.Tensor:
    return t.to_local() if hasattr(t, "to_local") else t  # FSDP2: each rank keeps its own shard


def _sharded(p: torch.Tensor, t: torch.Tensor) -> bool:
    """Whether t, a snapshot tensor of parameter p (p itself or an AdamW moment; not the scalar step), is sharded."""
    return hasattr(p, "to_local") and t.dim() > 0


def _full(p: torch.Tensor, t: torch.Tensor, keep: bool) -> Optional[torch.Tensor]:
    """The whole tensor of which t is p's local shard (collective under FSDP2), on the CPU; None where not keep
    (the ranks that do not write checkpoints)."""
    if _sharded(p, t):
        from torch.distributed.tensor import DTensor

        local = t.to(p.device_mesh.device_type)
        t = DTensor.from_local(local, p.device_mesh, p.placements, shape=p.shape, stride=p.stride()).full_tensor()
    return t.cpu() if keep else None


def _shard(p: torch.Tensor, full: torch.Tensor) -> torch.Tensor:
    """This rank's part of full, sharded as parameter p is (collective under FSDP2), on the CPU."""
    if not _sharded(p, full):
        return full
    from torch.distributed.tensor import distribute_tensor

    return distribute_tensor(full.to(p.device_mesh.device_type), p.device_mesh, p.placements).to_local().cpu()


@dataclass
class Snapshot:
    """One step's parameters and optimizer state in host memory (each rank its own shard), in the order of
    model.parameters(). Restored in place, so the CUDA graph that reads these very tensors stays valid."""
    step: int
    params: list[torch.Tensor]
    state: list[dict]

    @classmethod
    def take(cls, step: int, model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> "Snapshot":
        return cls(step, [_local(p).detach().to("cpu", copy=True) for p in model.parameters()],
                   [{k: _local(v).detach().to("cpu", copy=True) if torch.is_tensor(v) else v
                     for k, v in optimizer.state[p].items()} for p in model.parameters()])

    def full_state(self, model: torch.nn.Module, keep: bool = True) -> dict:
        """The snapshot keyed by parameter name, every shard gathered into its whole tensor (collective under
        FSDP2), so a checkpoint holding it does not depend on the world size; tensors None where not keep."""
        names = [n for n, _ in model.named_parameters()]
        params = list(model.parameters())
        return {"step": self.step,
                "params": {n: _full(p, t, keep) for n, p, t in zip(names, params, self.params)},
                "state": {n: {k: _full(p, v, keep) if torch.is_tensor(v) else v for k, v in state.items()}
                          for n, p, state in zip(names, params, self.state)}}

    @classmethod
    def from_full(cls, full: dict, model: torch.nn.Module) -> "Snapshot":
        """The snapshot full_state gave, this rank's shards taken from it (collective under FSDP2)."""
        named = list(model.named_parameters())
        if sorted(full["params"]) != sorted(n for n, _ in named):
            raise ValueError("the saved snapshot's parameters are not this model's")
        return cls(full["step"], [_shard(p, full["params"][n]) for n, p in named],
                   [{k: _shard(p, v) if torch.is_tensor(v) else v for k, v in full["state"][n].items()}
                    for n, p in named])

    @torch.no_grad()
    def restore(self, model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> None:
        for p, saved, state in zip(model.parameters(), self.params, self.state):
            _local(p).copy_(saved)
            if not state:  # no update had been taken: AdamW initializes it again at the next one
                optimizer.state.pop(p, None)
                continue
            now = optimizer.state[p]
            for k, v in state.items():
                if torch.is_tensor(v) and torch.is_tensor(now.get(k)):
                    _local(now[k]).copy_(v)
                else:
                    now[k] = v.clone() if torch.is_tensor(v) else v


def backed_off(cfg: Config, ilr_scale: float) -> Config:
    """cfg with the inner lr the run trains with after its back-offs (the config a checkpoint is saved with)."""
    if ilr_scale == 1.0:
        return cfg
    ttt = cfg.ttt
    # the reference's warm-up reads ilr_init as an absolute inner lr: scaled with it, the multiplier is unchanged
    init = ttt.ilr_init * ilr_scale if ttt.reference_ilr_warmup else ttt.ilr_init
    return replace(cfg, ttt=replace(ttt, inner_lr=ttt.inner_lr * ilr_scale, ilr_init=init))


class Action(Enum):
    APPLY = "apply"  # the update is taken
    SKIP = "skip"  # no update (the batch is consumed, the schedule advances)
    ROLL_BACK = "roll back"  # no update, and the weights and optimizer state of the last snapshot restored
    STOP = "stop"  # the run ends


@dataclass(frozen=True)
class Verdict:
    action: Action
    why: Optional[str] = None  # what was wrong with the step (for STOP: why the run ends)


APPLY = Verdict(Action.APPLY)


class SpikeGuard:
    """The spike policy. Per step the trainer asks `judge(loss, grad_norm)` for a verdict, acts on it (updates or
    not), then hands it back to `after(verdict, ...)`, which rolls back or takes a snapshot."""

    def __init__(self, cfg: OptimConfig):
        self.cfg = cfg
        self.rolls_back = cfg.spike_policy == "rollback"
        self.history: deque[float] = deque(maxlen=cfg.spike_window)
        self.skipped = False  # the last judged step took no update
        self.total = 0  # skipped steps so far
        self.in_a_row = 0
        self.rollbacks = 0
        self.ilr_scale = 1.0  # multiplies the inner lr (rollback's back-off)
        self.since_snapshot = 0  # spikes since the snapshot
        self.accepted_since_snapshot = 0
        self.snapshot: Optional[Snapshot] = None

    def _problem(self, loss: float, grad_norm: float) -> tuple[Optional[str], bool]:
        """(what is wrong with the step or None, whether it is a non-finite value)."""
        if not math.isfinite(loss):
            return "non-finite loss", True
        if not math.isfinite(grad_norm):
            return "non-finite gradient norm", True
        if len(self.history) >= self.cfg.spike_min_history:
            median = statistics.median(self.history)
            if grad_norm > self.cfg.spike_factor * median:
                return f"gradient norm {grad_norm:.3g} > {self.cfg.spike_factor:g} x median {median:.3g}", False
        return None, False

    def judge(self, loss: float, grad_norm: float) -> Verdict:
        """The verdict on one step (counted: call once per step)."""
        why, non_finite = self._problem(loss, grad_norm)
        if self.cfg.spike_policy == "stop":
            # Only a non-finite value stops; a large finite norm is left to the clip, as before.
            self.skipped = False
            return Verdict(Action.STOP, why) if non_finite else APPLY
        self.skipped = why is not None
        if not self.skipped:
            self.history.append(grad_norm)
            self.in_a_row = 0
            return APPLY
        self.total += 1
        self.in_a_row += 1
        self.since_snapshot += 1
        if self.in_a_row >= self.cfg.spike_max_consecutive:
            return Verdict(Action.STOP, f"{why}, {self.in_a_row} skipped steps in a row (optim.spike_max_consecutive)")
        if self.rolls_back and self.since_snapshot >= self.cfg.spike_rollback_after:
            if self.rollbacks >= self.cfg.spike_max_rollbacks:
                return Verdict(Action.STOP, f"{self.since_snapshot} spikes since the last snapshot after "
                                            f"{self.rollbacks} rollbacks (optim.spike_max_rollbacks)")
            return Verdict(Action.ROLL_BACK, why)
        return Verdict(Action.SKIP, why)

    # ----------------------------------------------------------------------------------- the rollback policy

    def start(self, step: int, model, optimizer) -> None:
        """The first snapshot, where the run starts or where it resumes from a checkpoint that holds none."""
        if self.rolls_back and self.snapshot is None:
            self.snapshot = Snapshot.take(step, model, optimizer)
            self.accepted_since_snapshot = 0

    def after(self, verdict: Verdict, step: int, model, optimizer, scheduler) -> None:
        """After step `step` (steps taken, this one included) was applied or not as `verdict` said: the rollback
        it called for, or (under the rollback policy) a snapshot when one is due."""
        if verdict.action is Action.ROLL_BACK:
            self._roll_back(step, model, optimizer, scheduler)
        elif verdict.action is Action.APPLY and self.rolls_back:
            self.accepted_since_snapshot += 1
            if self.accepted_since_snapshot >= self.cfg.spike_snapshot_every:
                self.snapshot = Snapshot.take(step, model, optimizer)
                self.accepted_since_snapshot = self.since_snapshot = 0

    def _roll_back(self, step: int, model, optimizer, scheduler) -> None:
        self.snapshot.restore(model, optimizer)
        self.rollbacks += 1
        self.ilr_scale *= self.cfg.spike_backoff_ilr
        if self.cfg.spike_backoff_lr != 1.0:  # LambdaLR scales base_lrs, which its state_dict keeps
            scheduler.base_lrs = [lr * self.cfg.spike_backoff_lr for lr in scheduler.base_lrs]
            for group in optimizer.param_groups:
                group["lr"] *= self.cfg.spike_backoff_lr
        log.warning("spike policy: %d spikes since the last snapshot at step %d: rolled back to the weights of step "
                    "%d, inner lr x %g, outer lr x %g (rollback %d of at most %d)", self.since_snapshot, step,
                    self.snapshot.step, self.ilr_scale, self.cfg.spike_backoff_lr ** self.rollbacks, self.rollbacks,
                    self.cfg.spike_max_rollbacks)
        self.since_snapshot = self.accepted_since_snapshot = self.in_a_row = 0

    def state_dict(self) -> dict:
        return {"history": list(self.history), "total": self.total, "in_a_row": self.in_a_row,
                "rollbacks": self.rollbacks, "ilr_scale": self.ilr_scale, "since_snapshot": self.since_snapshot,
                "accepted_since_snapshot": self.accepted_since_snapshot}

    def load_state_dict(self, state: dict) -> None:
        self.history = deque(state["history"], maxlen=self.cfg.spike_window)
        self.total, self.in_a_row, self.rollbacks = state["total"], state["in_a_row"], state["rollbacks"]
        self.ilr_scale, self.since_snapshot = state["ilr_scale"], state["since_snapshot"]
        self.accepted_since_snapshot = state.get("accepted_since_snapshot", 0)

    def checkpoint_files(self, model, is_main: bool = True) -> dict:
        """The extra files of a checkpoint: the snapshot under rollback (collective: every rank calls it; only the
        main rank, which writes, keeps the gathered tensors)."""
        if not self.rolls_back or self.snapshot is None:
            return {}
        return {SNAPSHOT_FILE: self.snapshot.full_state(model, keep=is_main)}

    def load_snapshot(self, full: dict, model) -> None:
        """The snapshot a checkpoint saved (collective); start() then keeps it instead of taking a new one."""
        if self.rolls_back:
            self.snapshot = Snapshot.from_full(full, model)
