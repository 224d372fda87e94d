"""Why the meta-gradient spikes (issue 26, docs/study.md): at fixed weights, the outer gradient's norm by number of
inner steps and by inner lr, split by parameter group.

If the inner loop phi_{t+1} = phi_t - eta clip(g_t) is unstable (eta times the curvature of the inner loss large
enough that some direction of its Jacobian grows), the gradient through n inner steps grows like r^n for some
r > 1, in every parameter upstream of the loop alike, while the forward loss stays finite. A calm loop shows a
norm flat in n. The inner steps are varied by the sequence length (n = T / b), the inner lr by the multiplier.

    python -m benchmarks.train.meta_grad_growth RUN/checkpoints/step_00000010 RUN/checkpoints/step_00000020 \
        --out growth.json

Checkpoints of a byte-token run (data.tokenizer=bytes); the sequences are this Python's largest standard-library
files (the source the issue's run trained on). The figures are on the CPU (float32, where the model was built).
"""
from __future__ import annotations

import argparse
import math
import sys
import sysconfig
from pathlib import Path

import torch

from ttt_e2e.pretrained import load_pretrained
from ttt_e2e.ttt.meta import sequence_loss

from benchmarks.core.records import write_json


def stdlib_sequences(n: int, length: int) -> torch.Tensor:
    """n byte sequences of `length` tokens (the byte tokenizer's ids are the bytes) from the largest stdlib
    modules."""
    files = sorted(Path(sysconfig.get_paths()["stdlib"]).glob("*.py"), key=lambda p: -p.stat().st_size)
    seqs = [list(f.read_bytes()[:length]) for f in files if f.stat().st_size > length][:n]
    return torch.tensor(seqs, dtype=torch.long)


def group(name: str, p: torch.Tensor) -> str:
    if "prime" in name:
        return "mlp_prime"  # phi_0, the inner loop's initial weights
    if p.dim() == 1:
        return "norms"
    return "embedding" if "wte" in name else ("prefix" if name.startswith("prefix") else "suffix")


def measure(ckpt: str, x: torch.Tensor, mults: list[float], lengths: list[int]) -> list[dict]:
    model, cfg = load_pretrained(ckpt)
    model.train()
    rows = []
    for T in lengths:
        for mult in mults:
            model.zero_grad()
            out = sequence_loss(model, x[:, :T], x[:, 1:T + 1], None, cfg.ttt, mult)
            out.loss.backward()
            sq: dict[str, float] = {}
            for n, p in model.named_parameters():
                g = group(n, p)
                sq[g] = sq.get(g, 0.0) + p.grad.double().pow(2).sum().item()
            rows.append({"checkpoint": ckpt, "inner_steps": T // cfg.ttt.mini_batch_size,
                         "eta": cfg.ttt.inner_lr * mult, "loss": out.loss.item(),
                         "grad_norm": math.sqrt(sum(sq.values())), **{k: math.sqrt(v) for k, v in sq.items()}})
            r = rows[-1]
            print(f"{Path(ckpt).name}  n {r['inner_steps']:4d}  eta {r['eta']:.3g}  loss {r['loss']:.3f}  "
                  f"|g| {r['grad_norm']:.3g}  " + "  ".join(f"{k} {math.sqrt(v):.2g}" for k, v in sorted(sq.items())),
                  flush=True)
    return rows


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("checkpoints", nargs="+")
    p.add_argument("--sequences", type=int, default=2)
    p.add_argument("--lengths", default=None, help="sequence lengths (default: T/4, T/2, T of the checkpoint)")
    p.add_argument("--mults", default="0.25,0.5,1", help="inner-lr multipliers")
    p.add_argument("--out")
    a = p.parse_args(argv)
    T = load_pretrained(a.checkpoints[0])[1].model.seq_length
    lengths = [int(v) for v in a.lengths.split(",")] if a.lengths else [T // 4, T // 2, T]
    x = stdlib_sequences(a.sequences, max(lengths) + 1)
    rows = [r for c in a.checkpoints for r in measure(c, x, [float(m) for m in a.mults.split(",")], lengths)]
    if a.out:
        write_json(a.out, {"rows": rows}, device="cpu")
    return 0


if __name__ == "__main__":
    sys.exit(main())
