"""What every benchmark's command line starts with: its parser (the module docstring as help, --tiny for a smoke
run) and the run's device, compute dtype and environment record, printed first."""
from __future__ import annotations

import argparse
from typing import NamedTuple

import torch

from benchmarks.core.env import describe, environment
from benchmarks.core.timing import default_device


def parser(doc: str, tiny: str | None = "toy shapes (a smoke run: the code paths, the CPU's too)"):
    """An ArgumentParser with doc as its description (kept as written) and, unless tiny is None, a --tiny flag."""
    p = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    if tiny is not None:
        p.add_argument("--tiny", action="store_true", help=tiny)
    return p


class Run(NamedTuple):
    device: str  # "cuda" or "cpu"
    dtype: torch.dtype  # bfloat16 on the GPU; float32 on the CPU (the Triton interpreter and CPU matmuls)
    env: dict  # benchmarks/core/env.py's record


def start_run(device: str | None = None) -> Run:
    """The run's device (default: the GPU if there is one), its compute dtype and its environment, printed."""
    device = device or default_device()
    env = environment(device)
    print(describe(env), flush=True)
    return Run(device, torch.bfloat16 if device == "cuda" else torch.float32, env)
