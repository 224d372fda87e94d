"""The one writer of result JSON: every file a benchmark writes carries the environment record (benchmarks/core/
env.py) under "environment", so each figure names the device and the commit it was measured on."""
from __future__ import annotations

import json
from pathlib import Path

from benchmarks.core.env import environment


def stamped(payload: dict, env: dict | None = None, device: str | None = None) -> dict:
    """payload with the environment record first (measured now unless given)."""
    return {"environment": env if env is not None else environment(device), **payload}


def write_json(path: str | Path, payload: dict, env: dict | None = None, device: str | None = None) -> Path:
    """Write payload, stamped with the environment, to path (its folder made); returns the path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(stamped(payload, env, device), indent=1, default=str) + "\n")
    return path


def read_json(path: str | Path) -> dict:
    return json.loads(Path(path).read_text())
