"""`load_pretrained(path) -> (model, cfg)`: one call for every kind of saved model (the loader itself:
ttt_e2e/convert/load.py).

  - one of our training checkpoints (a run dir, its checkpoints dir or a step dir; what `python -m ttt_e2e.convert`
    writes, from the authors' JAX checkpoints or a Hugging Face Llama / Qwen3, is one of these),
  - a directory written by `model.save_pretrained(dir)` (config.json + safetensors, Hugging Face layout),
  - a Hugging Face Hub repo id holding the latter (downloaded with huggingface_hub).

cfg is our Config (cfg.model, cfg.ttt, ...): `sequence_loss(model, x, y, mask, cfg.ttt)` runs on the model.
"""
from __future__ import annotations

from typing import Optional, Sequence

import torch

from ttt_e2e.config import Config
from ttt_e2e.convert.load import PretrainedTransformer, load


def load_pretrained(path, overrides: Sequence[str] = (), device: Optional[str | torch.device] = None,
                    dtype: Optional[torch.dtype] = None, **hub_kwargs) -> tuple[PretrainedTransformer, Config]:
    """(model, cfg) from a checkpoint, a save_pretrained dir or a Hub repo id (see the module docstring);
    overrides: dotted settings ("model.attention_backend=torch", "ttt.mini_batch_size=512") applied to the
    saved config. The model is in eval mode, on `device` (default: the CPU) in `dtype` (default: fp32)."""
    loaded = load(path, overrides, device, dtype, **hub_kwargs)
    return loaded.model, loaded.config
