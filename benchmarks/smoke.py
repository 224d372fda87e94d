"""The smoke run of every benchmark entry point: toy shapes, every code path, seconds (on the CPU with Triton's
interpreter, or on a GPU). tests/benchmarks/test_smoke.py runs them all so that none rots; on a GPU machine

    python -m benchmarks.smoke [NAME ...] [--out DIR] [--budget-s 40]     # NAME: area.name, e.g. train.meta_step

runs them (default: all) in one process and prints a table of which passed. A new entry point adds its line here.
"""
from __future__ import annotations

import argparse
import importlib
import inspect
import json
import os
import sys
import tempfile
import time
import traceback
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
TINY_TRAIN = ["model.n_layers=2", "model.suffix_len=1", "model.d_model=64", "model.n_heads=2", "model.mlp_width=128",
              "model.prime_mlp_width=128", "model.vocab_size=258", "model.seq_length=256",
              "ttt.mini_batch_size=64"]  # train.py overrides of a toy model (parallel_gpu.py --tiny's)

# module -> the command lines of its smoke run ({tmp}: the folder of its outputs), and the JSON files they write
SMOKE = {
    "kernels.attention": ([["--tiny", "--json", "{tmp}/att.json"],
                           ["--report", "{tmp}/att.json", "--plot", "{tmp}/att.png"]], ["att.json"]),
    "kernels.attention_share": ([["--size", "tiny", "--contexts", "64", "128", "--reps", "1", "--out",
                                  "{tmp}/share.json"]], ["share.json"]),
    "kernels.fused_projections": ([["--tiny"]], []),
    "kernels.meta_grad_precision": ([["--tiny", "--seeds", "1"]], []),
    "kernels.swa_fwd_tiles": ([["--tiny"]], []),
    "kernels.swa_fwd_versions": ([["--tiny", "--reps", "1"]], []),
    "kernels.swa_fwd_vs_cudnn": ([["--tiny", "--profile-host"]], []),
    "kernels.swa_head_split": ([["--tiny", "--fwd-tile", "table"]], []),
    "kernels.swa_key_parts": ([["--tiny"]], []),
    "train.meta_step": ([["--sizes", "tiny", "--seq", "64", "--mini-batch", "16", "--window", "32", "--steps", "1",
                          "--no-phases", "--graph", "--out", "{tmp}/step.json"]], ["step.json"]),
    "train.op_profile": ([["tiny:e2e:0:0", "--by-node"]], []),
    "train.inner_step_profile": ([["--size", "tiny"], ["--size", "tiny", "--prefix"],
                                  ["--size", "tiny", "--feed", "128", "--ops"]], []),
    "train.step_flops": ([["--sizes", "125m", "--seq", "128", "--mini-batch", "64", "--json", "{tmp}/flops.json"]],
                         ["flops.json"]),
    "train.compare_runs": ([["{tmp}/run_a", "{tmp}/run_b", "--json", "{tmp}/cmp.json", "--plot", "{tmp}/cmp.png"]],
                           ["cmp.json"]),
    "train.meta_grad_growth": ([["{tmp}/ckpt", "--sequences", "1", "--lengths", "32,64", "--mults", "1", "--out",
                                 "{tmp}/growth.json"]], ["growth.json"]),
    "train.versions": ([[str(ROOT), str(ROOT), "--labels", "a", "b", "--tiny", "--device", "cpu", "--rounds", "1",
                         "--steps", "1", "--targets", "125m fa", "--out", "{tmp}/versions"]],
                       ["versions/versions.json"]),
    "train.parallel_gpu": ([["--out", "{tmp}/pg", "--device", "cpu", "--tiny", "--parts", "d", "--steps", "4"]],
                           ["pg/parallel_gpu.json"]),
    "train.scaling": ([["--sizes", "125m", "--modes", "e2e", "--dists", "ddp", "--gpus", "1", "--steps", "4",
                        "--skip", "1", "--out", "{tmp}/scaling", "--", "training.device=cpu", *TINY_TRAIN]],
                      ["scaling/scaling.json"]),
    "inference.latency_trace": ([["--tiny", "--methods", "ttt", "--contexts", "64", "--short-reps", "1"]], []),
    "inference.prefill_overlap": ([["--tiny", "--contexts", "128", "--reps", "1"]], []),
    "eval.eval_context": ([["--tiny", "--out", "{tmp}/ec", "--reps", "1"]], ["ec/results.json"]),
    "eval.convert_check": ([["--tiny", "--device", "cpu", "--out", "{tmp}/cc"]], ["cc/convert_check.json"]),
    "eval.hf_gpu_check": ([["--device", "cpu", "--cases", "llama:torch,qwen3_gqa:torch", "--out", "{tmp}/hfc"]],
                          ["hfc/hf_gpu_check.json"]),
    "kernels.swa_gqa": ([["check", "--layout", "llama", "--dtype", "fp32", "--kv-heads", "8", "--T", "32",
                          "--window", "16", "--json", "{tmp}/gqa.json"]], ["gqa.json"]),
}
# Entry points whose every part needs a GPU (CUDA graphs of a 1B model): on a CPU their smoke run is the one-line
# refusal (exit 2) that tests/benchmarks/test_smoke.py checks; on a GPU machine `python -m benchmarks.smoke` runs them
GPU_ONLY = {"inference.hf_llama": [["--steps", "2", "--context", "2048", "--decode", "4"]]}
COVERED_ELSEWHERE = {"inference.latency": "tests/benchmarks/test_latency.py"}


def fixtures(name: str, tmp: Path) -> None:
    """What a smoke run reads: two training runs' metrics, a tiny checkpoint."""
    if name == "train.compare_runs":
        for run, shift in (("run_a", 0.0), ("run_b", 1e-6)):
            (tmp / run).mkdir()
            lines = [json.dumps({"step": s, "loss": 5.0 - 0.1 * s + shift, "step_time_s": 0.01}) for s in range(1, 13)]
            (tmp / run / "metrics.jsonl").write_text("\n".join(lines) + "\n")
    if name == "train.meta_grad_growth":
        from ttt_e2e.config import Config, TTTConfig
        from ttt_e2e.convert.load import PretrainedTransformer

        from benchmarks.core.models import tiny_config

        cfg = Config(model=tiny_config("e2e", seq_length=64, window=32), ttt=TTTConfig(mini_batch_size=16))
        PretrainedTransformer(cfg.model, cfg.ttt).save_pretrained(tmp / "ckpt", config=cfg)



def run(name: str, tmp: Path) -> None:
    """The smoke run of benchmarks.<name> with its outputs under tmp; raises on a failure."""
    tmp.mkdir(parents=True, exist_ok=True)
    fixtures(name, tmp)
    main = importlib.import_module(f"benchmarks.{name}").main
    from ttt_e2e.kernels.swa import common

    overrides = dict(common.CONFIG_OVERRIDES)  # a tile study sets the kernels' overrides for its own process
    try:
        _run_commands(name, main, tmp)
    finally:
        common.CONFIG_OVERRIDES.clear()
        common.CONFIG_OVERRIDES.update(overrides)


def _run_commands(name: str, main, tmp: Path) -> None:
    for argv in SMOKE[name][0] if name in SMOKE else GPU_ONLY[name]:
        argv = [a.replace("{tmp}", str(tmp)) for a in argv]
        if inspect.signature(main).parameters:
            code = main(argv)
        else:  # a main() that reads sys.argv
            saved, sys.argv = sys.argv, [name, *argv]
            try:
                code = main()
            finally:
                sys.argv = saved
        if code not in (None, 0):
            raise RuntimeError(f"{name} {argv}: exit {code}")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("names", nargs="*", help="area.name of the entry points (default: all)")
    p.add_argument("--out", help="where their outputs go (default: a temporary folder)")
    p.add_argument("--budget-s", type=float, default=None, help="start no entry point after this many seconds")
    args = p.parse_args(argv)
    if not torch.cuda.is_available():  # before any kernel module is imported: triton.jit reads it at definition
        os.environ.setdefault("TRITON_INTERPRET", "1")
    known = set(SMOKE) | (set(GPU_ONLY) if torch.cuda.is_available() else set())
    unknown = sorted(set(args.names) - known)
    if unknown:
        p.error(f"no smoke run for {unknown} here; known: {sorted(known)}")
    out = Path(args.out or tempfile.mkdtemp(prefix="smoke_"))
    t_start, rows = time.time(), []
    for name in args.names or sorted(known):
        if args.budget_s is not None and time.time() - t_start > args.budget_s:
            rows.append((name, "not run (budget)", 0.0))
            continue
        t0 = time.time()
        try:
            run(name, out / name.replace(".", "_"))
            rows.append((name, "ok", time.time() - t0))
        except Exception as e:  # noqa: BLE001 -- one broken entry point is a row of the table, not the end
            traceback.print_exc()
            rows.append((name, f"FAILED: {type(e).__name__}: {str(e).splitlines()[0][:120] if str(e) else ''}",
                         time.time() - t0))
    print("\n| entry point | smoke run | s |\n|---|---|---|")
    for name, status, seconds in rows:
        print(f"| {name} | {status} | {seconds:.1f} |")
    return int(any(status.startswith("FAILED") for _, status, _ in rows))


if __name__ == "__main__":
    sys.exit(main())
