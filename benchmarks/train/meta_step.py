"""Meta-training throughput: one optimizer step of the training path, `fa` pretrain vs `e2e` meta (issue 6).

    python -m benchmarks.train.meta_step --sizes 125m 1b [--steps 10] [--out benchmarks/meta_step.json]

One GPU, batch 1 sequence of T = 8192 tokens, bf16 autocast with fp32 parameters, AdamW. A step is what the
trainer does: sequence_loss -> backward -> clip -> AdamW step -> zero_grad. Reported: ms/step (median of
--steps timed steps after warm-up, CUDA events), tokens/s, MFU, peak memory, and a per-phase breakdown measured
by timing nested prefixes of the step (prefix forward; + suffix inner steps; + outer backward; + optimizer) and
differencing them, plus the profiler's top kernels. Free of hydra/wandb/datasets (absent on the GPU machine).
"""
from __future__ import annotations

import argparse
import json
import statistics

import torch

from ttt_e2e.config import Kernels, ModelConfig, TTTConfig
from ttt_e2e.cuda_graph import GraphedStep
from ttt_e2e.model.params import count_parameters
from ttt_e2e.model.sizes import PAPER_SIZES
from ttt_e2e.model.transformer import Transformer
from ttt_e2e.ttt.meta import sequence_loss

from benchmarks.core.env import environment
from benchmarks.core.models import train_configs
from benchmarks.core.records import write_json
from benchmarks.core.table import cell, print_table
from benchmarks.core.timing import (cuda_ms, default_device, peak_memory_gib, profiler_activities, reset_peak_memory,
                                    sync)


H100_BF16_PEAK = 989e12  # dense bf16 tensor-core peak of an H100 SXM, for MFU
DEVICE = default_device()
CUDA = DEVICE == "cuda"


def model_flops(cfg: ModelConfig, T: int) -> float:
    """Useful FLOPs of one training step of the baseline function: 6 per weight per token (every matmul weight,
    the tied head included) plus attention's 12 per visible (query, key) pair per head dim (fwd 4 + bwd 8). Both
    modes are charged the same useful work, so the meta overhead shows as lower MFU."""
    n = count_parameters(cfg)
    W = cfg.attention_window
    pairs = sum(min(i + 1, W) for i in range(T))
    return 6 * T * (n["non_embedding"] + n["embedding"]) + 12 * pairs * cfg.d_model * cfg.n_layers


def bench(name: str, mcfg: ModelConfig, tcfg: TTTConfig, steps: int, profile: bool, phases: bool,
          graph: bool, fused_kernels: bool = True, ce_kernel: bool = True) -> dict:
    torch.manual_seed(0)
    model = Transformer(mcfg, tcfg).to(DEVICE)
    kernels = Kernels(fused_kernels, ce_kernel)
    model.use_fused_kernels(kernels.elementwise)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, betas=(0.9, 0.95), weight_decay=0.1, fused=CUDA)
    T = mcfg.seq_length
    ids = torch.randint(0, mcfg.vocab_size, (1, T + 1), device=DEVICE)
    x, y = ids[:, :-1], ids[:, 1:]
    autocast = torch.autocast(DEVICE, dtype=torch.bfloat16, enabled=CUDA)

    def prefix():
        with autocast, torch.no_grad():
            model.run_prefix(model.wte(x))

    def forward():
        with autocast:
            return sequence_loss(model, x, y, None, tcfg, kernels=kernels).loss

    def forward_backward():
        forward().backward()
        opt.zero_grad(set_to_none=True)

    def step():
        forward().backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)

    reset_peak_memory()
    step_ms = cuda_ms(step, steps, warmup=3 if CUDA else 1)
    med = statistics.median(step_ms)
    result = dict(
        name=name, ms_per_step=med, ms_all=step_ms, tokens_per_s=T / med * 1e3,
        mfu=model_flops(mcfg, T) / (med * 1e-3) / H100_BF16_PEAK, peak_mem_gib=peak_memory_gib(),
    )
    if phases:
        cum = {k: statistics.median(cuda_ms(f, steps)) for k, f in
               (("prefix", prefix), ("forward", forward), ("forward_backward", forward_backward))}
        result["phases_ms"] = {"prefix forward": cum["prefix"], "suffix (inner steps, forward)": cum["forward"] - cum["prefix"],
                               "outer backward": cum["forward_backward"] - cum["forward"],
                               "optimizer (clip + AdamW)": med - cum["forward_backward"]}
    if profile:
        with torch.profiler.profile(activities=profiler_activities()) as prof:
            step()
            sync()
        result["top_kernels"] = prof.key_averages().table(sort_by="cuda_time_total" if CUDA else "cpu_time_total",
                                                          row_limit=25)
    if graph and not CUDA:
        result["graphed_error"] = "no GPU: no CUDA graph"
    elif graph:  # the same step captured whole in a CUDA graph and replayed (ttt_e2e/cuda_graph.py)
        del opt
        result.update(graphed_step(model, tcfg, kernels, x, y, autocast, steps, model_flops(mcfg, T) / H100_BF16_PEAK))
    del model
    if CUDA:
        torch.cuda.empty_cache()
    return result


def graphed_step(model, tcfg, kernels, x, y, autocast, steps: int, flop_per_peak_s: float) -> dict:
    """{"graphed": figures} of the step captured whole in a CUDA graph and replayed, or {"graphed_error": ...}."""
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, betas=(0.9, 0.95), weight_decay=0.1, fused=True,
                            capturable=True)

    def captured(x, y):
        with autocast:
            loss = sequence_loss(model, x, y, None, tcfg, kernels=kernels).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        return loss.detach()

    reset_peak_memory()
    try:
        graphed = GraphedStep(captured, x, y, zero_grad=lambda: opt.zero_grad(set_to_none=True))
        g_ms = cuda_ms(lambda: graphed(x, y), steps)
    except Exception as e:  # noqa: BLE001 -- a failed capture is a result to report, not a crash
        return {"graphed_error": f"{type(e).__name__}: {str(e).splitlines()[0][:300]}"}
    med = statistics.median(g_ms)
    return {"graphed": dict(ms_per_step=med, ms_all=g_ms, tokens_per_s=x.shape[1] / med * 1e3,
                            mfu=flop_per_peak_s / (med * 1e-3), peak_mem_gib=peak_memory_gib())}


HEADERS = ["config", "ms/step", "tokens/s", "MFU", "peak GiB", "prefix", "suffix inner", "outer bwd", "optimizer"]


def table_rows(r: dict) -> list[list]:
    """The table's rows of one result: the eager step with its phases, then the CUDA-graph step (or its error)."""
    if "error" in r:
        return [[r["name"], r["error"]]]
    phases = [f"{x:.1f}" for x in r.get("phases_ms", {}).values()] or ["-"] * 4
    rows = [[r["name"], f"{r['ms_per_step']:.1f}", f"{r['tokens_per_s']:.0f}", f"{100 * r['mfu']:.1f}%",
             cell(r["peak_mem_gib"], 3), *phases]]
    if "graphed_error" in r:
        rows.append([f"{r['name']} (CUDA graph)", r["graphed_error"]])
    if "graphed" in r:
        g = r["graphed"]
        rows.append([f"{r['name']} (CUDA graph)", f"{g['ms_per_step']:.1f}", f"{g['tokens_per_s']:.0f}",
                     f"{100 * g['mfu']:.1f}%", cell(g["peak_mem_gib"], 3), "", "", "", ""])
    return rows


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", nargs="+", default=["125m", "1b"], choices=[*PAPER_SIZES, "tiny"],
                    help="tiny: a toy model (a smoke run, the CPU's too: --seq 64 --mini-batch 16 --window 32)")
    ap.add_argument("--seq", type=int, default=8192)
    ap.add_argument("--mini-batch", type=int, default=1024)
    ap.add_argument("--window", type=int, default=8192)
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--profile", action="store_true")
    ap.add_argument("--no-phases", action="store_true", help="skip the per-phase breakdown")
    ap.add_argument("--graph", action="store_true", help="also time the step captured in a CUDA graph")
    ap.add_argument("--modes", nargs="+", default=["fa", "e2e"], choices=["fa", "e2e"])
    ap.add_argument("--remat-inner", action=argparse.BooleanOptionalAction, default=True,
                    help="e2e: recompute each inner step in the outer backward (ttt.remat_inner)")
    ap.add_argument("--remat-prefix", action=argparse.BooleanOptionalAction, default=False,
                    help="e2e: recompute each prefix block in the outer backward (ttt.remat_prefix)")
    ap.add_argument("--remat-prefix-blocks", type=int, default=None,
                    help="e2e with --remat-prefix: recompute only the first N prefix blocks (ttt.remat_prefix_blocks)")
    ap.add_argument("--recompute-logits", action="store_true",
                    help="cross-entropy without keeping the logits (ttt.recompute_logits), both modes")
    ap.add_argument("--no-fused-kernels", action="store_true",
                    help="RMSNorm, RoPE and the SwiGLU gate in PyTorch ops (model.fused_kernels=false), for ablation")
    ap.add_argument("--no-ce-kernel", action="store_true",
                    help="cross-entropy in PyTorch ops (fp32 logits) instead of kernels/cross_entropy, for ablation")
    ap.add_argument("--out", default=None)
    args = ap.parse_args(argv)
    results = []
    for size in args.sizes:
        modes = train_configs(size, args.seq, args.mini_batch, args.window, remat_inner=args.remat_inner,
                              remat_prefix=args.remat_prefix, remat_prefix_blocks=args.remat_prefix_blocks,
                              recompute_logits=args.recompute_logits)
        kernels = " fused_kernels=off" * args.no_fused_kernels + " ce_kernel=off" * args.no_ce_kernel
        blocks = "" if args.remat_prefix_blocks is None else f"({args.remat_prefix_blocks} blocks)"
        tag = "".join([" remat_inner=off" * (not args.remat_inner), f" remat_prefix=on{blocks}" * args.remat_prefix,
                       " recompute_logits=on" * args.recompute_logits, kernels])
        fa_tag = " recompute_logits=on" * args.recompute_logits + kernels
        for mode, (mcfg, tcfg) in ((m, modes[m]) for m in args.modes):
            name = f"{size} {mode}" + (tag if mode == "e2e" else fa_tag)
            try:
                r = bench(name, mcfg, tcfg, args.steps, args.profile, not args.no_phases, args.graph,
                          fused_kernels=not args.no_fused_kernels, ce_kernel=not args.no_ce_kernel)
            except torch.OutOfMemoryError as e:
                r = dict(name=name, error=f"out of memory: {str(e).splitlines()[0]}")
                torch.cuda.empty_cache()  # only a GPU runs out of memory this way
            results.append(r)
            print(json.dumps({k: v for k, v in r.items() if k not in ("top_kernels", "ms_all")}), flush=True)
            if "top_kernels" in r:
                print(r["top_kernels"], flush=True)
    env = environment(DEVICE)
    print_table(HEADERS, [row for r in results for row in table_rows(r)], env)
    for size in args.sizes:
        by = {r["name"]: r for r in results if "error" not in r}
        if f"{size} fa{fa_tag}" in by and f"{size} e2e{tag}" in by:
            fa, e2e = by[f"{size} fa{fa_tag}"], by[f"{size} e2e{tag}"]
            print(f"{size}: meta / pretrain = {e2e['ms_per_step'] / fa['ms_per_step']:.2f}x (eager)")
            if "graphed" in fa and "graphed" in e2e:
                print(f"{size}: meta / pretrain = {e2e['graphed']['ms_per_step'] / fa['graphed']['ms_per_step']:.2f}x "
                      "(both CUDA graphs)")
    if args.out:
        write_json(args.out, {"args": vars(args), "results": results}, env)


if __name__ == "__main__":
    main()
