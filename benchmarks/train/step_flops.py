"""Executed matmul FLOPs of one training step, `fa` pretrain vs `e2e` meta: the floor of the step-time ratio.

    python -m benchmarks.train.step_flops [--sizes 125m 1b llama-3.2-1b] [--seq 8192]

Issue 6 asks for a meta step at most 1.8x the pretraining step. The ratio of the work each step must do bounds
that from below whatever the kernels: a meta step at the pretraining step's efficiency costs exactly this ratio.
The count runs on the meta device (no memory, no compute) through the all-PyTorch path, with
`torch.utils.flop_counter.FlopCounterMode` (matmuls and attention; elementwise work is not counted). Attention
runs materialized there, which counts masked-out (query, key) pairs too; so attention is counted apart (the step
is counted again with a matmul-free stand-in for it) and scaled to the pairs a fused kernel visits: the causal
half for a full-length window, the visible part of each (mini-batch x cached keys) block for the suffix.
"""
from __future__ import annotations

import argparse
from contextlib import contextmanager
from dataclasses import replace

import torch
from torch.utils.flop_counter import FlopCounterMode

import ttt_e2e.model.attention as attention
from ttt_e2e.config import Kernels, TTTConfig
from ttt_e2e.model.sizes import PAPER_SIZES, paper_config
from ttt_e2e.model.transformer import Transformer
from ttt_e2e.ttt.meta import sequence_loss

from benchmarks.core.models import HF_CONFIGS, hf_configs
from benchmarks.core.records import write_json

_attend = attention.attend


@contextmanager
def attention_counting(where: str, pairs: dict):
    """where: 'all' keeps real attention everywhere, 'prefix' only in first-order (prefix) calls, 'none' nowhere.
    Every call records its materialized and visible (query, key) pairs under 'prefix' or 'suffix'."""
    def attend(q, k, v, *, window, q_pos0=0, k_pos0=0, backend="auto", first_order=False):
        part = "prefix" if first_order else "suffix"
        Tq, Tk = q.shape[-2], k.shape[-2]
        qp, kp = torch.arange(Tq)[:, None] + q_pos0, torch.arange(Tk)[None, :] + k_pos0
        visible = ((kp <= qp) & (kp > qp - window) & (kp >= 0)).sum().item()
        pairs.setdefault(part, [0, 0])
        pairs[part][0] += Tq * Tk
        pairs[part][1] += visible
        if where == "all" or (where == "prefix" and first_order):
            return _attend(q, k, v, window=window, q_pos0=q_pos0, k_pos0=k_pos0, backend="torch",
                           first_order=first_order)
        group = q.shape[1] // k.shape[1]  # grouped-query attention: each kv head read by `group` query heads
        kv = (k[..., Tk - Tq:, :] + v[..., Tk - Tq:, :]).repeat_interleave(group, dim=1)
        return q + kv  # same graph shape, no matmul

    attention.attend = attend
    try:
        yield
    finally:
        attention.attend = _attend


def count(mcfg, tcfg, where: str) -> tuple[int, dict]:
    pairs: dict = {}
    with torch.device("meta"):
        model = Transformer(mcfg, tcfg)
    kernels = Kernels(elementwise=False, cross_entropy=False)
    model.use_fused_kernels(kernels.elementwise)
    T = mcfg.seq_length
    x = torch.zeros(1, T, dtype=torch.long, device="meta")
    with attention_counting(where, pairs), FlopCounterMode(display=False) as fc:
        sequence_loss(model, x, x, None, tcfg, kernels=kernels).loss.backward()
    return fc.get_total_flops(), pairs


def step_flops(size: str, T: int, b: int) -> dict:
    if size in HF_CONFIGS:  # the source's function and the converted model (benchmarks/core/models.py)
        fa, e2e = (replace(c, attention_backend="torch") for c in hf_configs(size, T, T))
    else:
        fa, e2e = (paper_config(size, v, T, attention_backend="torch") for v in ("fa", "e2e"))
    modes = {"fa": (fa, TTTConfig(train_mode="pretrain", mini_batch_size=T)),
             "e2e": (e2e, TTTConfig(train_mode="meta", mini_batch_size=b, ilr_init=1.0, remat_inner=False))}
    out = {}
    for name, (mcfg, tcfg) in modes.items():
        if name == "fa":  # one causal attention call per layer, wherever recorded: all of it counted as 'suffix'
            none, _ = count(mcfg, tcfg, "none")
            full, pairs = count(mcfg, tcfg, "all")
            pairs = {"suffix": [sum(p[i] for p in pairs.values()) for i in (0, 1)]}
            parts = {"suffix": full - none}
        else:
            none, _ = count(mcfg, tcfg, "none")
            pre, _ = count(mcfg, tcfg, "prefix")
            full, pairs = count(mcfg, tcfg, "all")
            parts = {"prefix": pre - none, "suffix": full - pre}
        attn = sum(v * pairs[k][1] / pairs[k][0] for k, v in parts.items())
        out[name] = dict(matmul_tflop=none / 1e12, attention_tflop=attn / 1e12, total_tflop=(none + attn) / 1e12)
    out["ratio"] = out["e2e"]["total_tflop"] / out["fa"]["total_tflop"]
    return out


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", nargs="+", default=["125m", "1b"], choices=[*PAPER_SIZES, *HF_CONFIGS])
    ap.add_argument("--seq", type=int, default=8192)
    ap.add_argument("--mini-batch", type=int, default=1024)
    ap.add_argument("--json", default=None)
    args = ap.parse_args(argv)
    res = {s: step_flops(s, args.seq, args.mini_batch) for s in args.sizes}
    for s, r in res.items():
        print(f"{s}: fa {r['fa']['total_tflop']:.2f} TFLOP ({r['fa']['attention_tflop']:.2f} attention), "
              f"e2e {r['e2e']['total_tflop']:.2f} ({r['e2e']['attention_tflop']:.2f} attention): "
              f"ratio {r['ratio']:.2f}")
    if args.json:
        write_json(args.json, {"seq": args.seq, "mini_batch": args.mini_batch, "sizes": res}, device="cpu")


if __name__ == "__main__":
    main()
