"""How much memory a context needs, checked before starting, so a too-long context fails with a clear message
instead of an out-of-memory error in the middle of a prefill (which `feed` also turns into a MemoryError)."""
from __future__ import annotations

from typing import Optional

import torch

from ttt_e2e.config import TTTConfig
from ttt_e2e.model.transformer import Transformer

GiB = 1 << 30


def estimate_bytes(model: Transformer, ttt: Optional[TTTConfig], batch: int, positions: int, chunk: int,
                   elem: int) -> dict[str, int]:
    """Bytes beyond the weights: KV caches, the activations of one prefill chunk, the inner state. A rough upper
    estimate (elem: bytes per activation element)."""
    cfg = model.cfg
    d, width = cfg.d_model, max(cfg.mlp_width, cfg.prime_width)
    slots = positions if cfg.window is None else min(positions, cfg.window)
    # a sliding-window cache may hold a whole chunk's fused QKV output (KVCache.attend adopts its k and v)
    kv_width = (2 * cfg.kv_heads if cfg.window is None else cfg.n_heads + 2 * cfg.kv_heads) * cfg.head_dim
    kv = cfg.n_layers * batch * kv_width * slots * elem
    meta = ttt is not None and ttt.train_mode == "meta"
    c = min(chunk, positions)
    keys = slots if cfg.window is None else cfg.window + c  # keys one chunk attends to
    act = batch * c * (8 * d + 3 * width) * elem
    if cfg.attention_backend == "torch" or not next(model.parameters()).is_cuda:  # materialized scores
        act += 3 * batch * cfg.n_heads * c * keys * elem
    inner = 0
    if meta:
        b = ttt.mini_batch_size
        phi = sum(p.numel() for n, p in model.suffix.named_parameters() if ".prime." in n)
        inner = 3 * batch * phi * 4  # phi, its gradient, phi_next in fp32
        # the step's graph: the suffix activations of b tokens, fp32 logits and their gradient
        inner += cfg.suffix_len * batch * b * (16 * d + 6 * width) * elem + 3 * batch * b * cfg.vocab_size * 4
        if cfg.attention_backend == "torch" or not next(model.parameters()).is_cuda:
            inner += 4 * cfg.suffix_len * batch * cfg.n_heads * b * (slots + b) * elem
    return {"kv_cache": kv, "activations": act, "inner": inner}


def available_bytes(device: torch.device) -> int:
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        # memory torch's allocator holds but does not use is free for us too
        return free + torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device)
    try:
        with open("/proc/meminfo") as f:
            info = dict(line.split(":", 1) for line in f)
        return int(info["MemAvailable"].split()[0]) * 1024
    except (OSError, KeyError, ValueError):
        import os
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")


def check_memory(model: Transformer, ttt: Optional[TTTConfig], batch: int, positions: int, chunk: int,
                 elem: int) -> None:
    """Raise MemoryError if the estimate exceeds what is free on the model's device."""
    need = estimate_bytes(model, ttt, batch, positions, chunk, elem)
    device = next(model.parameters()).device
    free = available_bytes(device)
    if sum(need.values()) > free:
        parts = ", ".join(f"{k} {v / GiB:.2f}" for k, v in need.items())
        raise MemoryError(f"a context of {positions} positions x batch {batch} needs about "
                          f"{sum(need.values()) / GiB:.2f} GiB ({parts}) but only {free / GiB:.2f} GiB is free on "
                          f"{device}: shorten the prompt or max_new_tokens, lower the batch or the prefill chunk"
                          + (", or use a sliding-window model (its cache stays W long)" if model.cfg.window is None
                             else ""))
