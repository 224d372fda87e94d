"""Checkpoints: atomic on disk, a `latest` pointer that only ever names a complete one, exact resume.

Layout of <run dir>/checkpoints/ (the step dirs' format, its version and their one writer: ttt_e2e/convert/steps.py):
    step_00000100/           model.pt, state.pt (step, optimizer, scheduler, data sampler position, RNG states,
                             config), meta.json, the trainer's extra files (the rollback snapshot: train/spikes.py)
    latest                   one line: the name of the newest complete step dir

`latest` is replaced atomically only after its step dir is in place. Old checkpoints beyond keep_last are first
renamed to a hidden trash name and then deleted, so every visible step_* dir is complete at all times and a kill
at any instant leaves at most hidden leftovers (removed at the next start).

State dicts go through torch.distributed.checkpoint.state_dict with full_state_dict=True, which gathers FSDP2
shards (and is a plain state_dict for one process or DDP), so a checkpoint does not depend on the world size.
"""
from __future__ import annotations

import os
import random
import shutil
from dataclasses import asdict
from pathlib import Path
from typing import Optional

import numpy as np
import torch
from torch.distributed.checkpoint.state_dict import (StateDictOptions, get_model_state_dict,
                                                     get_optimizer_state_dict, set_model_state_dict,
                                                     set_optimizer_state_dict)

from ttt_e2e.convert.load import check_fits, read_checkpoint, read_config, resolve_checkpoint
from ttt_e2e.convert.steps import (FORMAT, LATEST, CheckpointError, fsync_dir, latest_checkpoint, read_torch,
                                   step_dir_name, step_dirs, write_durable, write_step)

__all__ = ["FORMAT", "Checkpointer", "CheckpointError", "latest_checkpoint", "load_checkpoint", "load_file",
           "read_config", "resolve_checkpoint", "step_dir_name"]


def _rng_state() -> dict:
    np_state = np.random.get_state()
    state = {"torch": torch.get_rng_state(), "python": random.getstate(),
             "numpy": (np_state[0], torch.from_numpy(np_state[1].astype(np.int64)), *np_state[2:])}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def _set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate(_tuples(state["python"]))
    kind, keys, *rest = state["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), *rest))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


def _tuples(x):
    return tuple(_tuples(v) for v in x) if isinstance(x, (list, tuple)) else x


_FULL = StateDictOptions(full_state_dict=True, cpu_offload=True)


class Checkpointer:
    """Saves into `ckpt_dir`; collective (every rank calls save, rank 0 writes)."""

    def __init__(self, ckpt_dir: str | Path, keep_last: int, is_main: bool):
        self.dir = Path(ckpt_dir)
        self.keep_last = keep_last
        self.is_main = is_main
        if is_main:
            self.dir.mkdir(parents=True, exist_ok=True)
            for leftover in self.dir.glob(".tmp-*"):  # a killed save or prune
                shutil.rmtree(leftover, ignore_errors=True)
            for leftover in self.dir.glob(".trash-*"):
                shutil.rmtree(leftover, ignore_errors=True)

    def latest(self) -> Optional[Path]:
        return latest_checkpoint(self.dir)

    def save(self, step: int, model, optimizer, scheduler, sampler, config, extra: Optional[dict] = None,
             files: Optional[dict] = None) -> Path:
        """extra: more of the trainer's state (the spike guard's), saved beside the rest and returned on load;
        files: {name: object} written as files of their own in the step dir (read back with load_file)."""
        model_sd = get_model_state_dict(model, options=_FULL)
        optim_sd = get_optimizer_state_dict(model, optimizer, options=_FULL)
        final = self.dir / step_dir_name(step)
        if not self.is_main:
            return final
        if final.exists():  # complete by construction (renamed into place only when done)
            return final
        state = {"step": step, "optimizer": optim_sd, "scheduler": scheduler.state_dict(),
                 "sampler": sampler.state_dict(), "rng": _rng_state(), "config": asdict(config), **(extra or {})}
        write_step(final, model_sd, state, files)
        pointer_tmp = self.dir / f".tmp-{LATEST}-{os.getpid()}"
        write_durable(pointer_tmp, lambda f: f.write(final.name.encode() + b"\n"))
        os.replace(pointer_tmp, self.dir / LATEST)
        fsync_dir(self.dir)
        self._prune(keep=final)
        return final

    def _prune(self, keep: Path) -> None:
        dirs = step_dirs(self.dir)
        for old in dirs[:-self.keep_last]:
            if old == keep:
                continue
            trash = self.dir / f".trash-{old.name}-{os.getpid()}"
            os.replace(old, trash)
            shutil.rmtree(trash, ignore_errors=True)


def load_file(path: Path, name: str) -> Optional[dict]:
    """An extra file a checkpoint was saved with (Checkpointer.save's files), or None where it has none."""
    return read_torch(path, name) if (path / name).is_file() else None


def load_checkpoint(path: Path, model, optimizer=None, scheduler=None, sampler=None, part: str = "all") -> dict:
    """Load into the (possibly wrapped-in-place) model; part=params loads the weights only. Returns the saved
    state (step, config, ...) for the caller; with part=all also restores optimizer, scheduler, sampler, RNG.
    Any format this code reads (convert/load.py: read_checkpoint, migrated to the current one)."""
    model_sd, state = read_checkpoint(path, list(model.state_dict()))
    check_fits(path, model_sd, model)
    if part == "all" and "optimizer" not in state:
        raise CheckpointError(f"checkpoint {path} holds parameters only (no optimizer state: converted or "
                              f"exported weights): start from it with training.load_part=params")
    set_model_state_dict(model, model_sd, options=StateDictOptions(full_state_dict=True, strict=True))
    if part == "all":
        set_optimizer_state_dict(model, optimizer, state["optimizer"], options=StateDictOptions(full_state_dict=True))
        scheduler.load_state_dict(state["scheduler"])
        sampler.load_state_dict(state["sampler"])
        _set_rng_state(state["rng"])
    return state
