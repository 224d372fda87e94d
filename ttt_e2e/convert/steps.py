"""Our checkpoint format: one step dir, written atomically, read back with its format migrated.

    step_00000100/model.pt   full (unsharded) model state dict, fp32, keys as in Transformer.state_dict()
    step_00000100/state.pt   {"format", "step", "config", ...}: the trainer adds optimizer, scheduler, sampler, RNG
    step_00000100/meta.json  the same step and config, for humans
    step_00000100/*.pt, */   more files or folders of the writer's (the rollback snapshot, a converted tokenizer)

`write_step` is the one writer (the trainer's Checkpointer and every converter): everything goes into a hidden
temporary dir beside the destination, every file fsync'ed, then renamed into place (os.replace, atomic on POSIX),
so a visible step dir is always complete.

FORMAT is the version of the model state dict's layout. 1: q, k, v (and each MLP's W1, W3) may be separate
matrices; 2: fused (`attn.wqkv.weight`: the n_heads query heads, then the key heads, then the value heads, grouped-
query attention's n_kv_heads each; `w13`). `migrate` turns 1 into 2; a state without a format (a save_pretrained
dir written before the version was recorded) is 1.
"""
from __future__ import annotations

import json
import os
import shutil
import time
from pathlib import Path
from typing import Callable, Optional

import torch

FORMAT = 2
LATEST = "latest"
PREFIX = "step_"


class CheckpointError(ValueError):
    """A checkpoint is missing, unreadable or does not fit; the one-line message names it."""


def step_dir_name(step: int) -> str:
    return f"{PREFIX}{step:08d}"


def fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_durable(path: Path, write: Callable) -> None:
    """write(f) into a new file at path, flushed to disk before returning."""
    with open(path, "wb") as f:
        write(f)
        f.flush()
        os.fsync(f.fileno())


def write_step(final: Path, model_sd: dict, state: dict, files: Optional[dict] = None,
               folders: Optional[dict[str, Callable[[Path], None]]] = None) -> Path:
    """The step dir `final` (which must not exist), atomically: model.pt (model_sd), state.pt (state, stamped with
    FORMAT), meta.json (its step and config, and what it was converted from), each of files {name: object} as a
    torch file, each of folders {name: write(dir)}."""
    final = Path(final)
    state = {**state, "format": FORMAT}
    tmp = final.parent / f".tmp-{final.name}-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        write_durable(tmp / "model.pt", lambda f: torch.save(model_sd, f))  # straight to the file: 3B is 12 GB
        write_durable(tmp / "state.pt", lambda f: torch.save(state, f))
        for name, obj in (files or {}).items():
            write_durable(tmp / name, lambda f, obj=obj: torch.save(obj, f))
        for name, write in (folders or {}).items():
            write(tmp / name)
        meta = {"step": state.get("step"), "time": time.time(), "config": state.get("config"),
                **({"converted_from": state["converted_from"]} if "converted_from" in state else {})}
        write_durable(tmp / "meta.json", lambda f: f.write(json.dumps(meta, indent=1).encode()))
        fsync_dir(tmp)
        os.replace(tmp, final)
        fsync_dir(final.parent)
    except Exception:  # a failed write leaves nothing; a kill leaves the hidden dir (the Checkpointer's next start
        shutil.rmtree(tmp, ignore_errors=True)  # removes it)
        raise
    return final


def step_dirs(ckpt_dir: Path) -> list[Path]:
    dirs = [p for p in Path(ckpt_dir).glob(f"{PREFIX}*") if p.is_dir() and p.name[len(PREFIX):].isdigit()]
    return sorted(dirs, key=lambda p: int(p.name[len(PREFIX):]))


def latest_checkpoint(ckpt_dir: Path) -> Optional[Path]:
    """The step dir `latest` names; if the pointer is missing (killed between a rename and the pointer update),
    the newest step dir, which is complete by construction."""
    ckpt_dir = Path(ckpt_dir)
    pointer = ckpt_dir / LATEST
    if pointer.is_file():
        target = ckpt_dir / pointer.read_text().strip()
        if (target / "model.pt").is_file():
            return target
    dirs = step_dirs(ckpt_dir) if ckpt_dir.is_dir() else []
    return dirs[-1] if dirs else None


def read_torch(path: Path, name: str) -> dict:
    try:
        return torch.load(path / name, map_location="cpu", weights_only=True)
    except Exception as e:  # truncated or foreign file: say which, in one line
        raise CheckpointError(f"cannot read checkpoint file {path / name}: {type(e).__name__}: "
                              f"{str(e).splitlines()[0] if str(e) else ''}") from None


# ---- the migration from format 1 ---------------------------------------------------------------------------------
# Format 1 checkpoints written before q, k, v (and each MLP's W1, W3) became one matrix hold the parts. They are
# joined: the same function and, AdamW being elementwise, the same optimizer moments, so such a run resumes exactly.
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
    out = dict(sd)
    for key in keys:
        names = _old_parts(key, sd)
        if names:
            out[key] = torch.cat([out.pop(n) for n in names])
    return out


def _fuse_optimizer_state(osd: dict, keys) -> dict:
    """Each part's moments joined (the step count is the parts' common one), the parts' names replaced by the
    fused one in its parameter group."""
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


def migrate(path: Path, model_sd: dict, state: dict, keys) -> tuple[dict, dict]:
    """(model state dict, state) of a checkpoint of any known format in the current one; keys: the model's
    state-dict keys (the fused names to look for)."""
    fmt = state.get("format", 1)
    if fmt == 1:
        model_sd = _fuse_model_state(model_sd, keys)
        if "optimizer" in state:
            state = {**state, "optimizer": _fuse_optimizer_state(state["optimizer"], keys)}
        state = {**state, "format": 2}
    elif fmt != FORMAT:
        raise CheckpointError(f"checkpoint {path} has format {fmt}, this code reads {FORMAT} and older")
    return model_sd, state
