"""bf16 meta-gradient error against the fp32 all-PyTorch oracle, on fixed seeds (GPU).

    python -m benchmarks.kernels.meta_grad_precision [--seeds 11 22 33 44]
    PYTHONPATH=OTHER_CHECKOUT:. python -P -m benchmarks.kernels.meta_grad_precision   # the other version's package
    python -m benchmarks.kernels.meta_grad_precision --tiny --seeds 1   # a smoke run (CPU: the PyTorch path only)

The model of tests/ttt/test_gpu_meta.py (4 layers, vocabulary 5000, 2 sequences of 1024, b = 128): for each seed
the relative error of the whole meta-gradient, of the suffix matrices' part and of the head's, for the kernels path
and the all-PyTorch path under the same bf16 autocast. Fixed seeds make two versions of the code comparable (put
the other version first on PYTHONPATH with -P, so the current directory does not come first; the script prints which
package it ran).
"""
from __future__ import annotations

import argparse

import torch

import ttt_e2e
from ttt_e2e.config import Kernels, ModelConfig, TTTConfig
from ttt_e2e.model.transformer import Transformer
from ttt_e2e.ttt.meta import sequence_loss

from benchmarks.core.env import describe, environment
from benchmarks.core.timing import default_device


SHAPE = dict(vocab_size=5000, n_layers=4, d_model=256, n_heads=4, mlp_width=384, suffix_len=2, seq_length=1024,
             window=384)
TINY = dict(vocab_size=258, n_layers=2, d_model=32, n_heads=2, mlp_width=48, suffix_len=1, seq_length=64, window=32)


def grads(kernels: bool, dtype: torch.dtype, seed: int, shape: dict = SHAPE, device: str = "cuda"):
    """{parameter name: its meta-gradient (float64)} of the kernels or the all-PyTorch path under dtype autocast."""
    cfg = ModelConfig(**shape, attention_backend="triton" if kernels else "torch")
    ttt = TTTConfig(train_mode="meta", mini_batch_size=cfg.seq_length // 8, inner_lr=1.0)
    torch.manual_seed(seed)
    model = Transformer(cfg, ttt).to(device)
    model.use_fused_kernels(kernels)
    g = torch.Generator(device=device).manual_seed(seed + 1)
    ids = torch.randint(0, cfg.vocab_size, (2, cfg.seq_length + 1), device=device, generator=g)
    with torch.autocast(device, dtype=dtype, enabled=dtype != torch.float32):
        out = sequence_loss(model, ids[:, :-1], ids[:, 1:], None, ttt, kernels=Kernels(kernels, kernels))
    gr = torch.autograd.grad(out.loss, list(model.parameters()))
    return {n: x.double() for (n, _), x in zip(model.named_parameters(), gr)}


def rel(a: dict, b: dict, keys=None) -> float:
    keys = keys or list(b)
    num = sum(((a[n] - b[n]) ** 2).sum() for n in keys) ** 0.5
    den = sum((b[n] ** 2).sum() for n in keys) ** 0.5
    return (num / den).item()


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seeds", nargs="+", type=int, default=[11, 22, 33, 44])
    ap.add_argument("--tiny", action="store_true", help="a toy model (a smoke run; the CPU runs the PyTorch path only)")
    args = ap.parse_args(argv)
    device = default_device()
    if device != "cuda" and not args.tiny:
        raise SystemExit("needs a CUDA GPU (the kernels path); --tiny for a smoke run")
    torch.backends.cuda.matmul.allow_tf32 = False  # the oracle in true fp32
    print("package:", ttt_e2e.__file__)
    print(describe(environment(device)))
    shape = TINY if args.tiny else SHAPE
    paths = (("kernels", True), ("pytorch", False)) if device == "cuda" else (("pytorch", False),)
    means = {name: [] for name, _ in paths}
    for seed in args.seeds:
        ref = grads(False, torch.float32, seed, shape, device)
        suffix = [n for n in ref if n.startswith("suffix.") and ref[n].dim() >= 2 and ".prime." not in n]
        row = []
        for name, kernels in paths:
            g = grads(kernels, torch.bfloat16, seed, shape, device)
            means[name].append(rel(g, ref))
            row.append(f"{name}: all {rel(g, ref):.3e} suffix matrices {rel(g, ref, suffix):.3e} "
                       f"head {rel(g, ref, ['wte.weight']):.3e}")
        print(seed, " | ".join(row), flush=True)
    print("mean", {k: f"{sum(v) / len(v):.3e}" for k, v in means.items()})


if __name__ == "__main__":
    main()
