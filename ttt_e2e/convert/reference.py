"""from-jax and to-jax: the authors' checkpoints (orbax, or .npz keyed by their parameter paths) to one of our
checkpoint directories (ttt_e2e/train/checkpoint.py layout, parameters only) and back."""
from __future__ import annotations

import json
import os
import shutil
import zipfile
from dataclasses import asdict
from pathlib import Path
from typing import Optional, Sequence

import numpy as np

from ttt_e2e.config import Config

from . import layout, orbax_io
from .layout import ConvertError
from .load import load, with_overrides
from .steps import write_durable, write_step

LLAMA3 = "meta-llama/Meta-Llama-3-8B"  # the authors' tokenizer (their datasets are Llama-3 tokenized)
LLAMA3_VOCAB = 128256


def read_npz(path: Path) -> dict[str, np.ndarray]:
    try:
        with np.load(path, allow_pickle=False) as z:
            return {k: z[k] for k in z.files}
    except (OSError, ValueError, EOFError, zipfile.BadZipFile, KeyError) as e:
        msg = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ConvertError(f"cannot read {path} (truncated or partial download?): {msg}") from None


def read_reference(src: Path) -> tuple[dict[str, np.ndarray], int]:
    """The reference's arrays and step (0 for an .npz) of an .npz, an orbax manager root or one step dir."""
    if not src.exists():
        raise ConvertError(f"no such file or directory: {src}")
    if src.is_file() and src.suffix == ".npz":
        return read_npz(src), 0
    if src.is_dir() and orbax_io.is_orbax(src):
        flat, step = orbax_io.read(src)
        return flat, step or 0
    raise ConvertError(f"{src} is neither an .npz of the reference's parameters nor an orbax checkpoint (a "
                       f"CheckpointManager dir or one step dir, with a '{orbax_io.ITEM}' item)")


def find_reference_config(src: Path) -> Optional[Path]:
    """The reference's config.json beside the checkpoint: in SRC (a dir) or up to two levels above (the manager
    root above a step dir, the download dir above the manager root); only one with a "model" section counts."""
    start = src if src.is_dir() else src.parent
    candidates = [start / "config.json", start.parent / "config.json", start.parent.parent / "config.json"]
    if src.is_file():  # what to-jax writes beside an .npz
        candidates.insert(0, src.with_name(src.stem + ".config.json"))
    for p in candidates:
        if p.is_file():
            try:
                cfg = json.loads(p.read_text())
            except (OSError, ValueError):
                continue
            if isinstance(cfg, dict) and isinstance(cfg.get("model"), dict) and "hidden_size" in cfg["model"]:
                return p
    return None


def _fresh(dst: Path) -> Path:
    """A hidden temporary dir beside dst, renamed onto it only once everything is written."""
    if dst.exists():
        raise ConvertError(f"{dst} already exists: remove it or choose another destination")
    dst.parent.mkdir(parents=True, exist_ok=True)
    tmp = dst.parent / f".tmp-{dst.name}-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    return tmp


def from_jax(src, dst, config: Optional[str] = None, overrides: Sequence[str] = (),
             tokenizer: Optional[str] = None, log=None) -> Path:
    """Convert the reference's checkpoint at src into our checkpoint dir dst (which must not exist)."""
    src, dst = Path(src), Path(dst)
    if dst.exists():  # before any reading: a large restore should not end in this
        raise ConvertError(f"{dst} already exists: remove it or choose another destination")
    flat, step = read_reference(src)
    ref_path = Path(config) if config else find_reference_config(src)
    ref = None
    if ref_path is not None:
        try:
            ref = json.loads(ref_path.read_text())
        except (OSError, ValueError) as e:
            raise ConvertError(f"cannot read config {ref_path}: {e}") from None
    elif log:
        log(f"no config.json beside {src}: the released checkpoints' settings assumed "
            f"(window 8192, mini-batch 1024, RoPE theta 5e5, seq_length 8192, inner lr 1, clip 1); "
            f"change them with --set")
    cfg = layout.model_config(flat, ref)
    cfg.data.tokenizer = tokenizer or (LLAMA3 if cfg.model.vocab_size == LLAMA3_VOCAB else cfg.data.tokenizer)
    cfg = with_overrides(cfg, overrides)
    layout.check_reference(flat, cfg.model)
    sd = layout.to_ours(flat, cfg.model)
    # parameters only: state.pt has no optimizer, so training.load_part=all refuses it and load_part=params takes it
    write_step(dst, sd, {"step": step, "config": asdict(cfg), "converted_from": str(src)})
    return dst


def load_ours(src) -> tuple[dict, Config, int]:
    """(state dict, Config, step) of one of our checkpoints or a save_pretrained dir."""
    loaded = load(src)
    return {k: v.detach() for k, v in loaded.model.state_dict().items()}, loaded.config, loaded.step


def to_jax(src, dst, log=None) -> Path:
    """Our checkpoint at src -> the reference's layout at dst: an .npz (dst ending in .npz) or an orbax
    CheckpointManager dir (needs orbax-checkpoint), each with the reference's config.json beside it."""
    dst = Path(dst)
    if dst.exists():
        raise ConvertError(f"{dst} already exists: remove it or choose another destination")
    sd, cfg, step = load_ours(src)
    if cfg.model.suffix_len < 1 or not cfg.model.prime_mlp:
        raise ConvertError(f"{src} is not a TTT-E2E model (model.prime_mlp={cfg.model.prime_mlp}, "
                           f"suffix_len={cfg.model.suffix_len}): the reference's TTT layout needs MLP'")
    m = cfg.model
    for bad, what in ((m.kv_heads != m.n_heads, f"grouped-query attention (model.n_kv_heads={m.n_kv_heads})"),
                      (m.head_dim * m.n_heads != m.d_model, f"a head width of its own ({m.head_dim})"),
                      (m.rope_scaling is not None, f"RoPE scaling (model.rope_scaling={m.rope_scaling})")):
        if bad:
            raise ConvertError(f"{src} has {what}, which the reference's model does not")
    flat = layout.to_reference(sd, cfg.model)
    ref_cfg = json.dumps(layout.reference_config(cfg), indent=1).encode()
    tmp = _fresh(dst)
    try:
        if dst.suffix == ".npz":
            tmp.mkdir()
            write_durable(tmp / "weights.npz", lambda f: np.savez(f, **flat))
            os.replace(tmp / "weights.npz", dst)
            config_path = dst.with_name(dst.stem + ".config.json")
            write_durable(config_path, lambda f: f.write(ref_cfg))
            if log:
                log(f"config: {config_path} (from-jax reads it beside the .npz)")
        else:
            orbax_io.write(tmp, step, flat)
            write_durable(tmp / "config.json", lambda f: f.write(ref_cfg))
            os.replace(tmp, dst)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return dst
