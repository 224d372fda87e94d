"""`load(path, overrides, device, dtype)`: one loader for every saved model and every entry point (load_pretrained,
eval.py, the needle evaluation, generate.py, training.init_from through read_checkpoint).

path is one of our checkpoints (a run dir, its checkpoints dir or a step dir; what the converters write is one),
a save_pretrained dir, or a Hugging Face Hub repo id ("owner/name") holding the latter. Every failure is a
CheckpointError (or, for a bad override, a ConfigError) with a one-line message; the entry points print it and
exit with status 2.
"""
from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass, is_dataclass
from pathlib import Path
from typing import Any, Optional, Sequence

import torch
from huggingface_hub import PyTorchModelHubMixin

from ttt_e2e.config import Config, ConfigError, TTTConfig
from ttt_e2e.model.transformer import Transformer

from .pretrained_dir import is_pretrained_dir, read_safetensors, read_saved_config, write_pretrained
from .steps import CheckpointError, latest_checkpoint, migrate, read_torch


def is_hub_id(path: str) -> bool:
    """Whether path is a Hugging Face Hub repo id ("owner/name") rather than a local path."""
    return not Path(path).expanduser().exists() and not path.startswith((".", "/", "~")) and path.count("/") == 1


def snapshot(repo_id: str, patterns: list[str], **hub_kwargs) -> Path:
    """The local snapshot of a Hub repo's files matching patterns (downloaded where not cached)."""
    from huggingface_hub import snapshot_download

    try:
        return Path(snapshot_download(repo_id, allow_patterns=patterns,
                                      **{k: v for k, v in hub_kwargs.items() if v is not None}))
    except Exception as e:  # offline, no such repo, gated: one line
        raise CheckpointError(f"no checkpoint at '{repo_id}', and not a Hub repo to download: {type(e).__name__}: "
                              f"{' '.join(str(e).split())[:300]}") from None


def resolve_checkpoint(path, **hub_kwargs) -> Path:
    """The dir to read: a step dir or save_pretrained dir itself, a checkpoints dir's or a run dir's latest, or the
    local snapshot of a Hub repo id (the hub_kwargs go to snapshot_download)."""
    path = str(path)
    if is_hub_id(path):
        return snapshot(path, ["*.json", "*.safetensors"], **hub_kwargs)
    p = Path(os.path.expanduser(path))
    if (p / "model.pt").is_file() or is_pretrained_dir(p):
        return p
    for ckpt_dir in (p, p / "checkpoints"):
        found = latest_checkpoint(ckpt_dir) if ckpt_dir.is_dir() else None
        if found is not None:
            return found
    raise CheckpointError(f"no checkpoint at '{path}' (expected a step dir with model.pt, a checkpoints dir or a "
                          f"run dir)")


def with_overrides(saved, overrides: Sequence[str] = ()) -> Config:
    """Our Config from saved sections (a dict, or a Config) and dotted overrides ("model.window=4096")."""
    from omegaconf import OmegaConf
    from omegaconf.errors import OmegaConfBaseException

    overrides = list(overrides or ())
    try:
        merged = OmegaConf.merge(OmegaConf.structured(Config), saved, OmegaConf.from_dotlist(overrides))
        return OmegaConf.to_object(merged)
    except OmegaConfBaseException as e:
        raise ConfigError(f"bad setting in {' '.join(overrides) or 'the saved config'}: "
                          f"{str(e).strip().splitlines()[0]}") from None


def read_config(step_dir: Path, overrides: Sequence[str] = ()) -> Config:
    """The Config a checkpoint was saved with, with dotted overrides. A relative data.tokenizer that names a folder
    inside the checkpoint (the converted model's tokenizer) is that folder."""
    step_dir = Path(step_dir)
    try:
        saved = (read_saved_config(step_dir)[0] if is_pretrained_dir(step_dir)
                 else json.loads((step_dir / "meta.json").read_text())["config"])
    except (OSError, ValueError, KeyError, TypeError) as e:
        if isinstance(e, CheckpointError):
            raise
        raise CheckpointError(f"cannot read the config of checkpoint {step_dir}: {e}") from None
    cfg = with_overrides(saved, overrides)
    tok = cfg.data.tokenizer
    if tok and not os.path.isabs(tok) and (step_dir / tok).is_dir():
        cfg.data.tokenizer = str((step_dir / tok).resolve())
    return cfg


def read_checkpoint(step_dir: Path, keys) -> tuple[dict, dict]:
    """(model state dict, state) of a step dir or save_pretrained dir, migrated to the current format; keys: the
    model's state-dict keys. A save_pretrained dir's state is {"step": 0} (weights only)."""
    step_dir = Path(step_dir)
    if is_pretrained_dir(step_dir):
        fmt = read_saved_config(step_dir)[1]
        return migrate(step_dir, read_safetensors(step_dir), {"format": fmt, "step": 0}, keys)
    return migrate(step_dir, read_torch(step_dir, "model.pt"), read_torch(step_dir, "state.pt"), keys)


def check_fits(path: Path, sd: dict, model: torch.nn.Module) -> None:
    """Refuse a state dict whose keys or shapes differ from the model's, in one line."""
    want = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    have = {k: tuple(v.shape) for k, v in sd.items()}
    missing, unexpected = sorted(set(want) - set(have)), sorted(set(have) - set(want))
    shapes = [f"{k}: checkpoint {have[k]} vs model {want[k]}" for k in sorted(set(want) & set(have))
              if want[k] != have[k]]
    if not (missing or unexpected or shapes):
        return

    def few(xs):
        return ", ".join(xs[:4]) + (f" (+{len(xs) - 4} more)" if len(xs) > 4 else "")

    parts = [f"missing keys [{few(missing)}]" if missing else "", f"unexpected keys [{few(unexpected)}]"
             if unexpected else "", f"shape mismatches [{few(shapes)}]" if shapes else ""]
    raise CheckpointError(f"checkpoint {path} does not fit this model (other architecture?): "
                          + "; ".join(p for p in parts if p))


class PretrainedTransformer(Transformer, PyTorchModelHubMixin, library_name="ttt-e2e",
                            tags=["ttt-e2e", "test-time-training"],
                            repo_url="https://github.com/test-time-training/e2e",
                            paper_url="https://test-time-training.github.io/e2e.pdf"):
    """The model as `load` returns it: a Transformer that also saves itself in the save_pretrained format and
    uploads itself (`save_pretrained`, `push_to_hub`, `from_pretrained`: PyTorchModelHubMixin)."""

    def pretrained_config(self, config: Any = None) -> dict:
        """The config.json contents: `config` (our Config, or a dict of its sections) or, without one, the model's
        own settings and the TTT settings it was loaded with."""
        if config is not None:
            return asdict(config) if is_dataclass(config) else dict(config)
        return {"model": asdict(self.cfg), "ttt": asdict(getattr(self, "ttt", None) or TTTConfig())}

    def save_pretrained(self, save_directory, *, config: Any = None, max_shard_size: int | str = "5GB",
                        **kwargs) -> Optional[str]:
        """Write config.json and the weights (sharded above max_shard_size, with an index) to save_directory;
        push_to_hub=True, repo_id=... also uploads it (PyTorchModelHubMixin.save_pretrained)."""
        sections = self.pretrained_config(config)
        write_pretrained(self.state_dict(), sections, Path(save_directory), max_shard_size)
        return super().save_pretrained(save_directory, config=sections, **kwargs)

    def _save_pretrained(self, save_directory: Path) -> None:
        pass  # the weights are written by save_pretrained above (sharded), before the config and model card

    @classmethod
    def _from_pretrained(cls, *, model_id: str, revision=None, cache_dir=None, force_download=False,
                         local_files_only=False, token=None, **_):
        return load(model_id, revision=revision, cache_dir=cache_dir, force_download=force_download,
                    local_files_only=local_files_only, token=token).model


def saved_setting(path: str, key: str):
    """One setting ("model.n_layers") of the config saved with the checkpoint at path: the Hydra resolver
    `${checkpoint:PATH,KEY}` (conf/experiment/hf/: a run that takes its architecture from the converted model it
    starts from, each setting still overridable on the command line)."""
    if path in (None, "", "None", "???"):
        raise CheckpointError(f"${{checkpoint:...,{key}}} needs training.init_from=<the converted checkpoint>")
    node = asdict(read_config(resolve_checkpoint(path)))
    for part in key.split("."):
        node = node[part]
    return node


def register_resolvers() -> None:
    """`${checkpoint:PATH,KEY}` for Hydra configs (saved_setting)."""
    from omegaconf import OmegaConf

    OmegaConf.register_new_resolver("checkpoint", saved_setting, replace=True, use_cache=False)


@dataclass
class Loaded:
    model: PretrainedTransformer  # in eval mode
    config: Config
    step: int  # the step the weights were saved at (0: a save_pretrained dir)
    path: Path  # the dir read


def load(path, overrides: Sequence[str] = (), device: Optional[str | torch.device] = None,
         dtype: Optional[torch.dtype] = None, **hub_kwargs) -> Loaded:
    """The model saved at path (see the module docstring) with its Config; overrides: dotted settings applied to
    the saved config ("model.attention_backend=torch", "ttt.mini_batch_size=512"); device, dtype: where and in
    what the parameters go (default: the CPU, fp32). hub_kwargs: snapshot_download's, for a Hub repo id."""
    step_dir = resolve_checkpoint(path, **hub_kwargs)
    cfg = read_config(step_dir, overrides)
    cfg.model.validate()
    cfg.ttt.validate(cfg.model)
    model = PretrainedTransformer(cfg.model, cfg.ttt)
    model.ttt = cfg.ttt
    sd, state = read_checkpoint(step_dir, list(model.state_dict()))
    check_fits(step_dir, sd, model)
    model.load_state_dict(sd)
    model.eval()
    if device is not None or dtype is not None:
        model.to(device=device, dtype=dtype)
    return Loaded(model, cfg, int(state.get("step", 0)), step_dir)
