"""The environment record every result carries: the machine (device, driver), the software (python, torch, CUDA,
triton), the code (git commit and whether the tree differed from it) and the date.

The commit comes from TTT_E2E_COMMIT where whoever copied the tree set it (a copy without its own git: the GPU
machine's copy may even sit inside another checkout, whose HEAD is not this tree's), else from git when this tree
is the top of a checkout. The record says where the commit came from, and leaves the dirty flag unknown (None)
rather than guess."""
from __future__ import annotations

import datetime
import os
import platform
import subprocess
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[2]
COMMIT_VARIABLE = "TTT_E2E_COMMIT"


def _run(cmd: list[str]) -> str | None:
    try:
        p = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=20)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return p.stdout.strip() if p.returncode == 0 else None


def git_state() -> dict:
    """{"commit", "dirty", "commit_from"}: the commit named by TTT_E2E_COMMIT (dirty unknown), else the HEAD of
    the checkout whose top is this tree and whether tracked files differ from it, else nothing known."""
    given = os.environ.get(COMMIT_VARIABLE)
    if given:
        return {"commit": given.strip(), "dirty": None, "commit_from": COMMIT_VARIABLE}
    top = _run(["git", "rev-parse", "--show-toplevel"])
    commit = _run(["git", "rev-parse", "HEAD"]) if top and Path(top).resolve() == REPO else None
    if commit:
        status = _run(["git", "status", "--porcelain", "--untracked-files=no"])
        return {"commit": commit, "dirty": None if status is None else bool(status), "commit_from": "git"}
    return {"commit": None, "dirty": None, "commit_from": None}


def driver_version() -> str | None:
    out = _run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"])
    return out.splitlines()[0] if out else None


def triton_version() -> str | None:
    try:
        import triton
    except ImportError:
        return None
    return triton.__version__


def environment(device: str | None = None) -> dict:
    """The record of where and on what code a figure was measured (device: "cuda" or "cpu"; default: cuda when
    there is one)."""
    cuda = torch.cuda.is_available() if device is None else device.startswith("cuda")
    return {
        "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "device": torch.cuda.get_device_name() if cuda else f"cpu ({platform.processor() or platform.machine()})",
        "driver": driver_version() if cuda else None,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "triton": triton_version(),
        **git_state(),
    }


def describe(env: dict) -> str:
    """One line for the head of a printed table: device, versions, commit, date."""
    commit = (env.get("commit") or "unknown commit")[:10]
    if env.get("dirty"):
        commit += " + local changes"
    driver = f", driver {env['driver']}" if env.get("driver") else ""
    triton = f", triton {env['triton']}" if env.get("triton") else ""
    return f"{env['device']}{driver}, torch {env['torch']}{triton}, commit {commit}, {env['date']}"
