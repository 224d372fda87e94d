"""Model FLOPs per token and MFU.

Convention (matmul FLOPs of the parameters only; attention score/value products and recomputation excluded):
- pretrain: 6 N per token (forward 2N, backward 4N), N = prefix blocks + suffix blocks + ln_f + the output
  head (vocab x d, counted once even when tied to the embedding; the embedding lookup itself is free).
- meta: the prefix costs 6 N_prefix as usual. The suffix (and head) runs forward (2) and an inner backward
  for grad phi (4), then the outer backward differentiates through both, which costs about twice their
  forward+backward (12): 18 N_suffix per token. So flops/token = 6 N_prefix + 18 N_suffix.
  Re-running each inner step for rematerialization is not counted (that would be hardware, not model, FLOPs).
MFU = flops/token x tokens/s / (peak FLOP/s per device x devices). Peak: log.peak_tflops if given, else dense
bf16 tensor-core peaks from vendor datasheets by GPU name, else on CPU a rough fp32 estimate: threads x 3 GHz x
two FMA units x SIMD lanes (16 with AVX-512, 8 with AVX2) x 2. A CPU MFU is an order-of-magnitude indicator only.
"""
from __future__ import annotations

from typing import Optional

import torch

from ttt_e2e.model.transformer import Transformer

# Dense bf16 tensor-core peaks, TFLOP/s (SXM parts where there are variants).
_GPU_PEAK_TFLOPS = {"H200": 989.0, "H100": 989.0, "A100": 312.0, "L40S": 362.0, "A10G": 70.0, "L4": 121.0}


def _count(module) -> int:
    return sum(p.numel() for p in module.parameters())


def flops_per_token(model: Transformer, train_mode: str) -> float:
    n_prefix = _count(model.prefix)
    n_suffix = _count(model.suffix) + model.head_weight().numel()
    return 6.0 * n_prefix + (18.0 if train_mode == "meta" else 6.0) * n_suffix


def peak_flops(device: torch.device, override_tflops: Optional[float]) -> float:
    """Per device, FLOP/s."""
    if override_tflops:
        return override_tflops * 1e12
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        for key, tflops in _GPU_PEAK_TFLOPS.items():
            if key in name:
                return tflops * 1e12
        return 989e12  # unknown GPU: assume an H100 (say so via log.peak_tflops if that is wrong)
    lanes = 16 if "AVX512" in torch.backends.cpu.get_cpu_capability() else 8
    return torch.get_num_threads() * 3e9 * 2 * lanes * 2
