"""Compute precision from model.compute_dtype: parameters stay fp32 (or fp64), matmuls run under autocast.

auto: bf16 autocast on CUDA (METHOD.md: bf16 compute, fp32 parameters and inner state), none on CPU, where
bf16 matmuls are slow and fp32 keeps CPU runs bitwise reproducible. float64 casts the parameters (tests).
"""
from __future__ import annotations

import contextlib

import torch

from ttt_e2e.config import ModelConfig

_DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32, "float64": torch.float64}


def param_dtype(cfg: ModelConfig) -> torch.dtype:
    return torch.float64 if cfg.compute_dtype == "float64" else torch.float32


def autocast_dtype(cfg: ModelConfig, device: torch.device):
    """The autocast dtype, or None for no autocast."""
    if cfg.compute_dtype == "auto":
        return torch.bfloat16 if device.type == "cuda" else None
    return _DTYPES[cfg.compute_dtype] if cfg.compute_dtype in ("bfloat16", "float16") else None


def autocast(cfg: ModelConfig, device: torch.device):
    dtype = autocast_dtype(cfg, device)
    return torch.autocast(device.type, dtype=dtype) if dtype is not None else contextlib.nullcontext()
