"""The save_pretrained format (Hugging Face layout): config.json (our Config's sections and the state dict's
format) and the weights as safetensors, one `model.safetensors` or, for large models, shards with a
`model.safetensors.index.json`. huggingface_hub does the work: save_torch_state_dict (sharding),
load_state_dict_from_file, PyTorchModelHubMixin (config, model card, Hub upload: convert/load.py)."""
from __future__ import annotations

import json
from pathlib import Path

from ttt_e2e.config import Config

from .steps import FORMAT, CheckpointError

SAFETENSORS, INDEX = "model.safetensors", "model.safetensors.index.json"


def is_pretrained_dir(path: Path) -> bool:
    """A folder of config.json and safetensors weights (ours, or a Hugging Face model's), not a step dir."""
    path = Path(path)
    return (not (path / "model.pt").is_file() and (path / "config.json").is_file()
            and ((path / SAFETENSORS).is_file() or (path / INDEX).is_file()))


def read_safetensors(path: Path) -> dict:
    """The state dict in a folder: model.safetensors, or the shards its index names."""
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


def read_saved_config(path: Path) -> tuple[dict, int]:
    """(the sections of our Config, the state dict's format) in a save_pretrained dir's config.json; a dir
    without a format was written before it was recorded: 1."""
    try:
        saved = json.loads((Path(path) / "config.json").read_text())
    except (OSError, ValueError) as e:
        raise CheckpointError(f"cannot read {Path(path) / 'config.json'}: {e}") from None
    known = {k: v for k, v in saved.items() if k in Config.__dataclass_fields__} if isinstance(saved, dict) else {}
    if "model" not in known:
        hint = (" (a Hugging Face model: convert it first, python -m ttt_e2e.convert from-hf)"
                if isinstance(saved, dict) and "architectures" in saved else "")
        raise CheckpointError(f"{Path(path) / 'config.json'} has no 'model' section: not written by ttt_e2e "
                              f"save_pretrained{hint}")
    return known, int(saved.get("format", 1))


def write_pretrained(state_dict: dict, config: dict, save_directory: Path, max_shard_size) -> None:
    """The weights (sharded above max_shard_size, with an index) into save_directory; config: the sections to
    go into config.json (which PyTorchModelHubMixin writes), stamped here with the format."""
    from huggingface_hub import save_torch_state_dict

    save_directory = Path(save_directory)
    save_directory.mkdir(parents=True, exist_ok=True)
    save_torch_state_dict(state_dict, save_directory, max_shard_size=max_shard_size)
    config["format"] = FORMAT
