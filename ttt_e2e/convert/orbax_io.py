"""The reference's orbax checkpoints, read and written through orbax-checkpoint only (the `jax` extra).

The authors' `Checkpointer` (their ttt/infra/checkpoint.py) saves with an `orbax.checkpoint.CheckpointManager`:
<root>/<step>/model_weights/ is a StandardCheckpointHandler item holding the equinox model's arrays as nested dicts
keyed by field names. Their arrays were saved from GPU meshes, and a restore without a target rebuilds each array's
sharding on the devices recorded at save time; restoring every leaf as a numpy array works on any machine.
"""
from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Optional

import numpy as np

from .layout import ConvertError

ITEM = "model_weights"


def available() -> bool:
    try:
        import orbax.checkpoint  # noqa: F401
    except ImportError:
        return False
    return True


def _ocp():
    # Restoring as numpy needs no accelerator: keep jax off the GPUs (its default preallocates most of their
    # memory) unless the caller chose platforms. Only effective before jax's first import.
    os.environ.setdefault("JAX_PLATFORMS", "cpu")
    try:
        import orbax.checkpoint as ocp
    except ImportError as e:
        raise ConvertError(f"reading or writing orbax checkpoints needs orbax-checkpoint: pip install "
                           f"'ttt-e2e[jax]' ({e})") from None
    logging.getLogger("absl").setLevel(logging.CRITICAL)  # "metrics not found": the authors save none; real failures raise
    return ocp


def is_orbax(path: Path) -> bool:
    """A manager root (step dirs with a model_weights item) or one step's dir."""
    return (path / ITEM).is_dir() or any(p.is_dir() and (p / ITEM).is_dir() for p in path.iterdir())


def item_dir(path: Path) -> tuple[Path, Optional[int]]:
    """(the model_weights item dir, its step) of a manager root (its latest step) or a step dir."""
    if (path / ITEM).is_dir():
        step = int(path.name) if path.name.isdigit() else None
        return path / ITEM, step
    ocp = _ocp()
    manager = ocp.CheckpointManager(path.resolve(), options=ocp.CheckpointManagerOptions(read_only=True))
    step = manager.latest_step()
    if step is None:
        raise ConvertError(f"no finished orbax checkpoint step under {path}")
    return path / str(step) / ITEM, step


def read(path: Path) -> tuple[dict[str, np.ndarray], Optional[int]]:
    """{reference key path: array}, step, of an orbax checkpoint (manager root or step dir)."""
    ocp = _ocp()
    import jax

    item, step = item_dir(path)
    try:
        meta = ocp.StandardCheckpointer().metadata(item.resolve())
        meta = getattr(meta, "item_metadata", meta)  # later versions wrap it in a StepMetadata
        tree = getattr(meta, "tree", meta)  # 0.11: a TreeMetadata with .tree; older: the tree itself
        args = jax.tree.map(lambda _: ocp.RestoreArgs(restore_type=np.ndarray), tree)
        restored = ocp.PyTreeCheckpointer().restore(item.resolve(), restore_args=args)
    except Exception as e:  # a partial download, a foreign dir: orbax's own words, in one line
        msg = str(e).strip().splitlines()[0] if str(e).strip() else ""
        raise ConvertError(f"cannot restore orbax item {item}: {type(e).__name__}: {msg}"[:400]) from None
    flat = {}
    for keys, leaf in jax.tree_util.tree_flatten_with_path(restored)[0]:  # None leaves (blanked fields) drop out
        flat["." + ".".join(str(getattr(k, "key", getattr(k, "name", k))) for k in keys)] = np.asarray(leaf)
    return flat, step


def write(root: Path, step: int, flat: dict[str, np.ndarray]) -> None:
    """Save `flat` as the authors' Checkpointer does: CheckpointManager(root), item model_weights (a
    StandardSave of nested dicts), the arrays placed on a one-device ("data", "state") mesh like their trainer's."""
    ocp = _ocp()
    import jax
    from jax.sharding import Mesh, NamedSharding, PartitionSpec

    mesh = Mesh(np.array(jax.devices()[:1]).reshape(1, 1), ("data", "state"))
    replicated = NamedSharding(mesh, PartitionSpec())
    tree: dict = {}
    for key, array in flat.items():
        node, *path = key.lstrip(".").split(".")
        d = tree.setdefault(node, {})
        for name in path[:-1]:
            d = d.setdefault(name, {})
        d[path[-1]] = jax.device_put(array, replicated)
    options = ocp.CheckpointManagerOptions(
        multiprocessing_options=ocp.options.MultiprocessingOptions(primary_host=0))
    with ocp.CheckpointManager(root.resolve(), options=options) as manager:
        manager.save(step, args=ocp.args.Composite(**{ITEM: ocp.args.StandardSave(tree)}))
        manager.wait_until_finished()
