"""The one place that resolves `model.compute_dtype`, for training and inference alike: parameters stay fp32 (or
fp64), matmuls run under autocast.

auto: bf16 autocast on CUDA (docs/METHOD.md: bf16 compute, fp32 parameters and inner state), none on CPU, where
bf16 matmuls are slow and fp32 keeps CPU runs bitwise reproducible. float64 casts the parameters (tests). Inside
the model, `model/layers.py: compute_dtype` only reads the autocast state this sets.
"""
from __future__ import annotations

import contextlib
from typing import Optional

import torch

from ttt_e2e.config import ModelConfig

_DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32, "float64": torch.float64}


def param_dtype(cfg: ModelConfig) -> torch.dtype:
    return torch.float64 if cfg.compute_dtype == "float64" else torch.float32


def autocast_dtype(cfg: ModelConfig, device: torch.device,
                   weights: Optional[torch.dtype] = None) -> Optional[torch.dtype]:
    """The autocast dtype, or None for no autocast (compute in the weights' dtype). weights: the parameters'
    dtype where they may differ from param_dtype (inference loads bf16 weights): a full-precision compute dtype
    then still autocasts unless the weights have it already."""
    if cfg.compute_dtype == "auto":
        dtype = torch.bfloat16 if device.type == "cuda" else None
    else:
        dtype = _DTYPES[cfg.compute_dtype]
    if dtype in (torch.float32, torch.float64) and (weights is None or weights == dtype):
        return None  # full precision throughout: nothing to cast
    return dtype  # half precision: autocast also when the weights are half already (phi stays fp32)


def autocast(cfg: ModelConfig, device: torch.device):
    dtype = autocast_dtype(cfg, device)
    return torch.autocast(device.type, dtype=dtype) if dtype is not None else contextlib.nullcontext()
