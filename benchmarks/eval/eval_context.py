"""Long-context evaluation: the training-mode loss (eager, no_grad) against the engine path that validation and
eval.py take (ttt_e2e/eval/stream_loss.py: the inference engine's prefill, every inner step a CUDA graph).

A 125M TTT-E2E model with random weights (conf/model/125m.yaml with the e2e widths of
conf/experiment/125m/pretrain/e2e.yaml: MLP and MLP' 1664, suffix 3, vocab 128256, W 8192, b 1024), fp32
parameters under bf16 autocast as eval.py runs it, one window (batch 1) of each context. Per path and context:
the time of one window's per-token losses (median of --reps, after one untimed call that compiles the kernels
and, for the engine, captures its graphs, itself reported), the peak memory allocated during the timed calls,
and, where both paths ran, max and mean |difference| of the per-token losses (unmasked tokens) and the two means.
The old path at 128K runs unless --skip-old-long or its time estimated from 32K exceeds --old-long-budget.

    python -m benchmarks.eval.eval_context --out bench_eval                 # H100: 32K and 128K, both paths
    python -m benchmarks.eval.eval_context --out /tmp/e --tiny              # CPU smoke test at toy sizes, seconds

No hydra/omegaconf here: the GPU machine has none of them.
"""
from __future__ import annotations

import argparse
import gc
import json
import statistics
import sys
import time
from pathlib import Path

import torch


from ttt_e2e.config import TTTConfig
from ttt_e2e.data import make_batch
from ttt_e2e.eval.stream_loss import StreamLoss
from ttt_e2e.model.sizes import paper_config
from ttt_e2e.model.transformer import Transformer
from ttt_e2e.train.parallel import LossModule

from benchmarks.core.env import describe, environment
from benchmarks.core.models import tiny_config
from benchmarks.core.records import write_json
from benchmarks.core.timing import sync

K = 1024
BOS = 128000  # Llama-3's <|begin_of_text|>


def build(tiny: bool, device: str):
    """The 125M TTT-E2E model (random weights, seed 0) and its TTT settings, or the tiny one."""
    cfg = tiny_config("e2e", seq_length=128, window=64) if tiny else paper_config("125m", "e2e")
    ttt = TTTConfig(train_mode="meta", mini_batch_size=16 if tiny else 1024, remat_inner=False)
    torch.manual_seed(0)
    model = Transformer(cfg).to(device).eval()
    return model, ttt


def window(model, n: int, device: str, seed: int):
    vocab = model.cfg.vocab_size
    bos = BOS if vocab > BOS else 1
    w = torch.randint(0, vocab, (1, n + 1), generator=torch.Generator().manual_seed(seed))
    w[:, ::4096 if n > 4096 else 97] = bos  # documents packed as in training: some targets are BOS (masked)
    return (*(t.to(device) for t in make_batch(w, bos)), bos)


def time_path(fn, batch, reps: int, device: str) -> dict:
    """fn(inputs, targets, mask) -> token losses: one untimed call, then `reps` timed ones."""
    inputs, targets, mask, _ = batch
    row = {}
    try:
        sync()
        t0 = time.perf_counter()
        tok = fn(inputs, targets, mask)
        sync()
        row["first_call_s"] = time.perf_counter() - t0
        if device == "cuda":
            torch.cuda.reset_peak_memory_stats()
            base = torch.cuda.memory_allocated()
        runs = []
        for _ in range(reps):
            sync()
            t0 = time.perf_counter()
            tok = fn(inputs, targets, mask)
            sync()
            runs.append(time.perf_counter() - t0)
        row.update(median_ms=1e3 * statistics.median(runs), runs_ms=[1e3 * r for r in runs])
        if device == "cuda":
            row["peak_gib"] = torch.cuda.max_memory_allocated() / 2**30
            row["peak_over_start_gib"] = (torch.cuda.max_memory_allocated() - base) / 2**30
        row["loss"] = (tok[mask].double().mean()).item()
        return row, tok
    except (MemoryError, torch.OutOfMemoryError) as e:
        row["error"] = f"does not fit: {str(e).splitlines()[0][:160]}"
        return row, None


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", required=True, help="directory for results.json")
    ap.add_argument("--tiny", action="store_true", help="toy sizes on the CPU (the code paths, not the figures)")
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--skip-old-long", action="store_true", help="no old path at the longest context")
    ap.add_argument("--old-long-budget", type=float, default=60.0,
                    help="seconds the old path may take at the longest context (estimated from the shorter one)")
    args = ap.parse_args(argv)
    device = "cpu" if args.tiny else "cuda"
    if device == "cuda" and not torch.cuda.is_available():
        print("error: needs a CUDA GPU (or --tiny for the CPU smoke test)", file=sys.stderr)
        return 2
    short, long = (128, 256) if args.tiny else (32 * K, 128 * K)
    model, ttt = build(args.tiny, device)
    amp = torch.autocast("cuda", dtype=torch.bfloat16) if device == "cuda" else torch.autocast("cpu", enabled=False)
    loss_module = LossModule(model, ttt)
    old = lambda i, t, m: loss_module(i, t, m, 1.0)["token_losses"]  # noqa: E731
    rows = []
    with torch.no_grad(), amp:
        for n in (short, long):
            batch = window(model, n, device, seed=n)
            stream = StreamLoss(model, ttt, batch[3])
            new = lambda i, t, m: stream(i, t, m, 1.0)["token_losses"]  # noqa: E731
            reps = args.reps if n == short or args.tiny else max(3, args.reps // 2)  # tiny: as few as asked
            r_new, tok_new = time_path(new, batch, reps, device)
            stream.close()
            del stream
            gc.collect()
            row = {"context": n, "engine": r_new}
            if device == "cuda":
                row["allocated_after_gib"] = torch.cuda.memory_allocated() / 2**30
            r_old = rows[0]["training"] if rows else {}
            guess = r_old.get("median_ms", 0) / 1e3 * (n / short) * (1 + max(2, reps // 2))
            if n == short or (not args.skip_old_long and guess <= args.old_long_budget):
                r_old, tok_old = time_path(old, batch, min(reps, 3) if n == short else max(2, reps // 2), device)
                row["training"] = r_old
                if tok_old is not None and tok_new is not None:
                    d = (tok_new - tok_old).abs()[batch[2]].double()
                    row.update(max_abs_diff=d.max().item(), mean_abs_diff=d.mean().item(),
                               check="ok" if d.mean() < 0.02 and abs(r_new["loss"] - r_old["loss"]) < 5e-3
                               else "MISMATCH")
            else:
                row["training"] = {"skipped": "--skip-old-long" if args.skip_old_long else
                                   f"would take about {guess:.0f} s (> --old-long-budget {args.old_long_budget:.0f})"}
            rows.append(row)
            print(json.dumps(row), flush=True)
    env = environment(device)
    meta = {"tiny": args.tiny,
            "model": {k: getattr(model.cfg, k) for k in ("vocab_size", "n_layers", "d_model", "mlp_width",
                                                         "prime_mlp_width", "suffix_len", "window")},
            "mini_batch_size": ttt.mini_batch_size, "batch": 1, "reps": args.reps}
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    write_json(out / "results.json", {"meta": meta, "rows": rows}, env)
    print(f"\n{describe(env)}, 125M TTT-E2E{' (tiny)' if args.tiny else ''}, batch 1")
    print(f"{'context':>8} {'path':>9} {'first s':>8} {'median ms':>10} {'peak GiB':>9} {'loss':>8} "
          f"{'max|diff|':>10} {'mean|diff|':>10} check")
    for row in rows:
        for path in ("training", "engine"):
            r = row[path]
            diff = ""
            if "max_abs_diff" in row and path == "engine":
                diff = f"{row['max_abs_diff']:>10.2e} {row['mean_abs_diff']:>10.2e} {row['check']}"
            if "median_ms" in r:
                print(f"{row['context']:>8} {path:>9} {r['first_call_s']:>8.2f} {r['median_ms']:>10.1f} "
                      f"{r.get('peak_gib', float('nan')):>9.2f} {r['loss']:>8.4f} {diff}")
            else:
                print(f"{row['context']:>8} {path:>9} {r.get('error') or r.get('skipped')}")
    print(f"wrote {out / 'results.json'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
