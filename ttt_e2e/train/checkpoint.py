"""Checkpoints: atomic on disk, a `latest` pointer that only ever names a complete one, exact resume.

Layout of <run dir>/checkpoints/:
    step_00000100/model.pt   full (unsharded) model state dict, fp32, keys as in Transformer.state_dict()
    step_00000100/state.pt   step, optimizer, scheduler, data sampler position, RNG states, config
    step_00000100/meta.json  the same step and config, for humans
    step_00000100/*.pt       the trainer's extra files (the rollback policy's snapshot: train/spikes.py)
    latest                   one line: the name of the newest complete step dir

A checkpoint is written into a hidden temporary dir, every file fsync'ed, then renamed into place (os.replace,
atomic on POSIX); `latest` is replaced the same way only after that. Old checkpoints beyond keep_last are first
renamed to a hidden trash name and then deleted, so every visible step_* dir is complete at all times and a kill
at any instant leaves at most hidden leftovers (removed at the next start).

State dicts go through torch.distributed.checkpoint.state_dict with full_state_dict=True, which gathers FSDP2
shards (and is a plain state_dict for one process or DDP), so a checkpoint does not depend on the world size.
"""
from __future__ import annotations

import json
import os
import random
import shutil
import time
from dataclasses import asdict
from pathlib import Path
from typing import Optional

import numpy as np
import torch
from torch.distributed.checkpoint.state_dict import (StateDictOptions, get_model_state_dict,
                                                     get_optimizer_state_dict, set_model_state_dict,
                                                     set_optimizer_state_dict)

FORMAT = 1
LATEST = "latest"
_PREFIX = "step_"


class CheckpointError(ValueError):
    """A checkpoint is missing, unreadable or does not fit; the one-line message names it."""


def step_dir_name(step: int) -> str:
    return f"{_PREFIX}{step:08d}"


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _write_durable(path: Path, write) -> None:
    with open(path, "wb") as f:
        write(f)
        f.flush()
        os.fsync(f.fileno())


def _step_dirs(ckpt_dir: Path) -> list[Path]:
    dirs = [p for p in ckpt_dir.glob(f"{_PREFIX}*") if p.is_dir() and p.name[len(_PREFIX):].isdigit()]
    return sorted(dirs, key=lambda p: int(p.name[len(_PREFIX):]))


def latest_checkpoint(ckpt_dir: Path) -> Optional[Path]:
    """The step dir `latest` names; if the pointer is missing (killed between a rename and the pointer update),
    the newest step dir, which is complete by construction."""
    ckpt_dir = Path(ckpt_dir)
    pointer = ckpt_dir / LATEST
    if pointer.is_file():
        target = ckpt_dir / pointer.read_text().strip()
        if (target / "model.pt").is_file():
            return target
    dirs = _step_dirs(ckpt_dir) if ckpt_dir.is_dir() else []
    return dirs[-1] if dirs else None


def _pretrained(path: Path):
    """ttt_e2e.pretrained where path is a save_pretrained dir (config.json + safetensors: weights only), else None."""
    if (path / "model.pt").is_file():
        return None
    from ttt_e2e import pretrained

    return pretrained if pretrained.is_hf_dir(path) else None


def resolve_checkpoint(path: str) -> Path:
    """A step dir, a checkpoints dir (its latest) or a run dir (its checkpoints' latest)."""
    p = Path(os.path.expanduser(path))
    if (p / "model.pt").is_file() or _pretrained(p):
        return p
    for ckpt_dir in (p, p / "checkpoints"):
        found = latest_checkpoint(ckpt_dir) if ckpt_dir.is_dir() else None
        if found is not None:
            return found
    raise CheckpointError(f"no checkpoint at '{path}' (expected a step dir with model.pt, a checkpoints dir or a "
                          f"run dir)")


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
        state = {"format": FORMAT, "step": step, "optimizer": optim_sd, "scheduler": scheduler.state_dict(),
                 "sampler": sampler.state_dict(), "rng": _rng_state(), "config": asdict(config), **(extra or {})}
        tmp = self.dir / f".tmp-{final.name}-{os.getpid()}"
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir()
        _write_durable(tmp / "model.pt", lambda f: torch.save(model_sd, f))
        _write_durable(tmp / "state.pt", lambda f: torch.save(state, f))
        for name, obj in (files or {}).items():
            _write_durable(tmp / name, lambda f: torch.save(obj, f))
        meta = {"step": step, "time": time.time(), "config": asdict(config)}
        _write_durable(tmp / "meta.json", lambda f: f.write(json.dumps(meta, indent=1).encode()))
        _fsync_dir(tmp)
        os.replace(tmp, final)
        _fsync_dir(self.dir)
        pointer_tmp = self.dir / f".tmp-{LATEST}-{os.getpid()}"
        _write_durable(pointer_tmp, lambda f: f.write(final.name.encode() + b"\n"))
        os.replace(pointer_tmp, self.dir / LATEST)
        _fsync_dir(self.dir)
        self._prune(keep=final)
        return final

    def _prune(self, keep: Path) -> None:
        dirs = _step_dirs(self.dir)
        for old in dirs[:-self.keep_last]:
            if old == keep:
                continue
            trash = self.dir / f".trash-{old.name}-{os.getpid()}"
            os.replace(old, trash)
            shutil.rmtree(trash, ignore_errors=True)


def _shape_mismatch(path: Path, ckpt: dict, model) -> Optional[str]:
    want = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    have = {k: tuple(v.shape) for k, v in ckpt.items()}
    missing = sorted(set(want) - set(have))
    unexpected = sorted(set(have) - set(want))
    shapes = [f"{k}: checkpoint {have[k]} vs model {want[k]}" for k in sorted(set(want) & set(have))
              if want[k] != have[k]]
    if not (missing or unexpected or shapes):
        return None

    def few(xs):
        return ", ".join(xs[:4]) + (f" (+{len(xs) - 4} more)" if len(xs) > 4 else "")

    parts = [f"missing keys [{few(missing)}]" if missing else "", f"unexpected keys [{few(unexpected)}]"
             if unexpected else "", f"shape mismatches [{few(shapes)}]" if shapes else ""]
    return (f"checkpoint {path} does not fit this model (other architecture?): "
            + "; ".join(p for p in parts if p))


# Checkpoints written before q, k, v (and each MLP's W1, W3) became one matrix hold the parts. They are joined on
# load: the same function and, AdamW being elementwise, the same optimizer moments, so such a run resumes exactly.
_FUSED = (("attn.wqkv.weight", ("attn.wq.weight", "attn.wk.weight", "attn.wv.weight")), ("w13", ("w1", "w3")))


def _old_parts(key: str, have) -> Optional[list[str]]:
    """The names of the parts of fused matrix `key` where `have` holds them all instead of it, else None."""
    for fused, parts in _FUSED:
        if key.endswith("." + fused) and key not in have:
            names = [key[:-len(fused)] + p for p in parts]
            if all(n in have for n in names):
                return names
    return None


def _fuse_model_state(sd: dict, keys) -> dict:
    """The model state dict sd with the parts of each of the model's fused matrices (keys) joined, as saved by
    the code before the fusion; a current checkpoint comes back as it is."""
    out = dict(sd)
    for key in keys:
        names = _old_parts(key, sd)
        if names:
            out[key] = torch.cat([out.pop(n) for n in names])
    return out


def _fuse_optimizer_state(osd: dict, keys) -> dict:
    """The same for a full optimizer state dict (keyed by parameter names): each part's moments joined (the step
    count is the parts' common one), the parts' names replaced by the fused one in its parameter group."""
    state, groups = dict(osd["state"]), [dict(g, params=list(g["params"])) for g in osd["param_groups"]]
    for key in keys:
        names = _old_parts(key, state)
        if not names:
            continue
        parts = [state.pop(n) for n in names]
        state[key] = {k: torch.cat([p[k] for p in parts]) if torch.is_tensor(v) and v.dim() else v
                      for k, v in parts[0].items()}
        for g in groups:
            if names[0] in g["params"]:
                g["params"] = [key if n == names[0] else n for n in g["params"] if n not in names[1:]]
    return {**osd, "state": state, "param_groups": groups}


def _load(path: Path, name: str) -> dict:
    try:
        return torch.load(path / name, map_location="cpu", weights_only=True)
    except Exception as e:  # truncated or foreign file: say which, in one line
        raise CheckpointError(f"cannot read checkpoint file {path / name}: {type(e).__name__}: "
                              f"{str(e).splitlines()[0] if str(e) else ''}") from None


def load_file(path: Path, name: str) -> Optional[dict]:
    """An extra file a checkpoint was saved with (Checkpointer.save's files), or None where it has none."""
    return _load(path, name) if (path / name).is_file() else None


def load_checkpoint(path: Path, model, optimizer=None, scheduler=None, sampler=None, part: str = "all") -> dict:
    """Load into the (possibly wrapped-in-place) model; part=params loads the weights only. Returns the saved
    state (step, config, ...) for the caller; with part=all also restores optimizer, scheduler, sampler, RNG."""
    keys = list(model.state_dict())
    hf = _pretrained(path)
    model_sd = _fuse_model_state(hf.read_weights(path) if hf else _load(path, "model.pt"), keys)
    problem = _shape_mismatch(path, model_sd, model)
    if problem:
        raise CheckpointError(problem)
    state = {"format": FORMAT, "step": 0} if hf else _load(path, "state.pt")
    if state.get("format") != FORMAT:
        raise CheckpointError(f"checkpoint {path} has format {state.get('format')}, this code reads {FORMAT}")
    if part == "all" and "optimizer" not in state:
        raise CheckpointError(f"checkpoint {path} holds parameters only (no optimizer state: converted or "
                              f"exported weights): start from it with training.load_part=params")
    set_model_state_dict(model, model_sd, options=StateDictOptions(full_state_dict=True, strict=True))
    if part == "all":
        set_optimizer_state_dict(model, optimizer, _fuse_optimizer_state(state["optimizer"], keys),
                                 options=StateDictOptions(full_state_dict=True))
        scheduler.load_state_dict(state["scheduler"])
        sampler.load_state_dict(state["sampler"])
        _set_rng_state(state["rng"])
    return state


def read_config(step_dir: Path, overrides: Optional[list[str]] = None):
    """The Config a checkpoint was trained with (from meta.json), with dotted overrides ("data.source=...")."""
    from omegaconf import OmegaConf

    from ttt_e2e.config import Config

    meta_path, hf = Path(step_dir) / "meta.json", _pretrained(Path(step_dir))
    try:
        saved = hf.read_saved_config(step_dir) if hf else json.loads(meta_path.read_text())["config"]
    except (OSError, ValueError, KeyError) as e:
        raise CheckpointError(f"cannot read the config of checkpoint {step_dir}: {e}") from None
    merged = OmegaConf.merge(OmegaConf.structured(Config), saved, OmegaConf.from_dotlist(list(overrides or [])))
    return OmegaConf.to_object(merged)
