"""`load_pretrained(path) -> (model, cfg)`: one call for every kind of saved model.

  - one of our training checkpoints (a run dir, its checkpoints dir or a step dir; what `ttt_e2e.convert from-jax`
    writes is one of these),
  - a directory written by `model.save_pretrained(dir)` (config.json + safetensors, Hugging Face layout),
  - a Hugging Face Hub repo id holding the latter (downloaded with huggingface_hub).

cfg is our Config (cfg.model, cfg.ttt, ...): `sequence_loss(model, x, y, mask, cfg.ttt)` runs on the model.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Optional, Sequence

import torch

from ttt_e2e.config import Config
from ttt_e2e.train.checkpoint import CheckpointError

SAFETENSORS, INDEX = "model.safetensors", "model.safetensors.index.json"


def is_hf_dir(path: Path) -> bool:
    return (path / "config.json").is_file() and ((path / SAFETENSORS).is_file() or (path / INDEX).is_file())


def read_saved_config(path: Path) -> dict:
    """The sections of our Config in a save_pretrained dir's config.json."""
    try:
        saved = json.loads((Path(path) / "config.json").read_text())
    except (OSError, ValueError) as e:
        raise CheckpointError(f"cannot read {Path(path) / 'config.json'}: {e}") from None
    known = {k: v for k, v in saved.items() if k in Config.__dataclass_fields__} if isinstance(saved, dict) else {}
    if "model" not in known:
        raise CheckpointError(f"{Path(path) / 'config.json'} has no 'model' section: not written by ttt_e2e "
                              f"save_pretrained")
    return known


def read_weights(path: Path) -> dict:
    """The state dict in a save_pretrained dir: model.safetensors, or the shards its index names."""
    from huggingface_hub import load_state_dict_from_file

    path = Path(path)
    try:
        files = (sorted(set(json.loads((path / INDEX).read_text())["weight_map"].values()))
                 if (path / INDEX).is_file() else [SAFETENSORS])
        sd = {}
        for name in files:
            sd.update(load_state_dict_from_file(path / name))
    except Exception as e:  # a truncated or missing shard: one line naming it
        msg = " ".join(str(e).split())[:300]
        raise CheckpointError(f"cannot read the weights in {path}: {type(e).__name__}: {msg}") from None
    return sd


def _load_ours(path: str, overrides: Sequence[str] = ()):
    """Through the trainer's checkpoint code, which also reads save_pretrained dirs (train/checkpoint.py)."""
    from ttt_e2e.model.transformer import Transformer
    from ttt_e2e.train.checkpoint import load_checkpoint, read_config, resolve_checkpoint

    step_dir = resolve_checkpoint(path)
    cfg = read_config(step_dir, list(overrides))
    model = Transformer(cfg.model, cfg.ttt)
    state = load_checkpoint(step_dir, model, part="params")
    return model, cfg, state["step"]


def load(path, overrides: Sequence[str] = (), **hub_kwargs):
    """(model, cfg, step): `load_pretrained` plus the step the weights were saved at (0 for save_pretrained)."""
    p = Path(str(path)).expanduser()
    if p.exists() or str(path).startswith((".", "/", "~")) or str(path).count("/") != 1:
        return _load_ours(str(path), overrides)
    from huggingface_hub import snapshot_download  # "owner/name": a Hub repo

    try:
        local = snapshot_download(str(path), allow_patterns=["*.json", "*.safetensors"],
                                  **{k: v for k, v in hub_kwargs.items() if v is not None})
    except Exception as e:  # offline, no such repo, gated: one line
        msg = " ".join(str(e).split())[:300]
        raise CheckpointError(f"no checkpoint at '{path}', and not a Hub repo to download: {type(e).__name__}: "
                              f"{msg}") from None
    return _load_ours(local, overrides)


def load_pretrained(path, overrides: Sequence[str] = (), device: Optional[str | torch.device] = None,
                    **hub_kwargs) -> tuple[torch.nn.Module, Config]:
    """(model, cfg) from a checkpoint, a save_pretrained dir or a Hub repo id (see the module docstring);
    overrides: dotted settings ("model.attention_backend=torch", "ttt.mini_batch_size=512") applied to the
    saved config. The model is in eval mode, on `device` (default: where it was built, the CPU)."""
    model, cfg, _ = load(path, overrides, **hub_kwargs)
    model.eval()
    return (model.to(device) if device is not None else model), cfg
