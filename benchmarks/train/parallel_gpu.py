"""GPU evidence for issues 23 and 31 on one GPU: graphed DDP = eager DDP, DDP-graphed vs single-GPU-graphed step time,
3B meta-training under FSDP2 with CPU offload, and what eager FSDP2 costs. Every figure comes from the trainer's own
metrics of a real `python train.py` / `torchrun train.py` job (benchmarks/train/scaling.py's worker: Hydra composition
of conf/experiment/<size>/pretrain/<mode>, stdlib bytes as data, no eval, no checkpoints, batch 1 x T = 8192).

    python -m benchmarks.train.parallel_gpu --out DIR [--parts a b c d] [--steps 25]
    python -m benchmarks.train.parallel_gpu --out DIR --device cpu --tiny          # every code path, CPU, small model

Parts:
  a  correctness: a small model (fp32, the same Triton kernels), torchrun with 1 rank (NCCL): the graphed DDP
     steps (own bucketed all-reduce) against eager DDP: losses and gradient norms, 8 steps with accumulation.
  b  125M and 1B, fa and e2e: the single-GPU graphed step (plain python, no process group) against the torchrun
     1-rank DDP graphed step; DDP/single ratio (target <= 1.05) and meta/pretrain ratio on the DDP path
     (target <= 1.8).
  c  3B e2e meta-training under FSDP2 on one GPU with CPU offload (and without, last: it may not fit):
     step time and peak GPU memory.
  d  125M e2e: eager FSDP2 (1 rank) against graphed DDP (from b): what FSDP2 costs.
  e  correctness of graphed FSDP2 (issue 31): a small model in bf16 (the default precision, the same Triton kernels),
     torchrun with 1 rank (NCCL): graphed FSDP2 (train/sharded.py) against eager FSDP2, 8 steps with
     accumulation: losses and gradient norms. --e-125m: instead 125M, eager FSDP2 with the graphed path's kernels
     against part f's graphed FSDP2 job (--steps steps; run after f).
  f  --sizes, torchrun with 1 rank: graphed FSDP2 e2e against graphed DDP e2e (target <= 1.15), and fa on the
     graphed FSDP2 path (meta / pretrain target <= 1.8).
  j  --jobs in the given order (the most wanted first, with --deadline); ratios where both sides ran: FSDP2 over
     DDP (graphed e2e), meta over pretrain (graphed FSDP2), eager over graphed (FSDP2 e2e), and the eager job's
     losses against the graphed one's (the same kernels: equal to bf16 rounding).
  g  3B at T = 8192 under FSDP2 without offload (remat of the inner loop and the prefix): e2e graphed, e2e eager,
     fa graphed: step time and peak memory (--steps-3b steps each, the first --skip-3b untimed).
Writes parallel_gpu.json under --out (only that: the jobs' run dirs go to --work); prints a table last.
"""
from __future__ import annotations

import argparse
import json
import signal
import sys
import tempfile
import time
from pathlib import Path

from benchmarks.train.scaling import overrides, run_job

TINY_MODEL = ["model.n_layers=2", "model.suffix_len=1", "model.d_model=64", "model.n_heads=2", "model.mlp_width=128",
              "model.prime_mlp_width=128", "model.vocab_size=258", "model.seq_length=256",
              "ttt.mini_batch_size=64"]


def parse_args() -> argparse.Namespace:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", required=True)
    ap.add_argument("--parts", nargs="+", default=["a", "b", "c", "d"], choices=list("abcdefgj"))
    ap.add_argument("--steps-3b", type=int, default=4, help="part g: steps per job")
    ap.add_argument("--skip-3b", type=int, default=2, help="part g: untimed first steps")
    ap.add_argument("--timeout-3b", type=float, default=200, help="part g: per job, seconds")
    ap.add_argument("--sizes", nargs="+", default=["125m", "1b"], help="part b")
    ap.add_argument("--steps", type=int, default=25, help="steps per 125M job (1B: 2/3 of it, 3B: 5)")
    ap.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
    ap.add_argument("--tiny", action="store_true", help="a small model everywhere (CPU check of the script)")
    ap.add_argument("--timeout", type=float, default=240, help="per job, seconds")
    ap.add_argument("--work", default=None, help="the jobs' run dirs and token cache (default: a temporary dir)")
    ap.add_argument("--no-fa", action="store_true", help="part f: only the e2e jobs")
    ap.add_argument("--jobs", nargs="+", default=[], help="part j: jobs in this order, each "
                    "[if-oom:]size/mode/dist/graphed|eager|offload[/steps[/skip[/min_s]]] (min_s: the least time "
                    "left to start it; 3b: remat of the inner loop, the "
                    "prefix and the logits; eager: with the graphed path's kernels, so that its losses are "
                    "comparable; if-oom: only where an earlier job of that size ran out of memory)")
    ap.add_argument("--deadline", type=float, default=None, help="seconds: no job is started after it, and a "
                    "running one is cut at it")
    ap.add_argument("--min-job-s", type=float, default=15, help="with --deadline: start no job with less left")
    ap.add_argument("--e-125m", action="store_true", help="part e: 125M eager FSDP2 against part f's graphed job")
    ap.add_argument("--no-3b-without-offload", action="store_true", help="part c: only the offloaded run")
    return ap.parse_args()


def max_rel_diff(xs: list, ys: list) -> float:
    return max(abs(a - b) / abs(a) for a, b in zip(xs, ys))


def ratio(part: dict, key: str, num: str, den: str) -> None:
    """part[key] = num's step time over den's, where both ran."""
    a, b = (part.get(n, {}).get("ms_per_step") for n in (num, den))
    if a and b:
        part[key] = a / b


class Runner:
    """The jobs of one call: where they run, what they gave (parallel_gpu.json, rewritten after every job) and what
    is left of --deadline."""

    def __init__(self, args: argparse.Namespace):
        self.args = args
        self.out = Path(args.out)
        self.out.mkdir(parents=True, exist_ok=True)
        self.work = Path(args.work or tempfile.mkdtemp(prefix="parallel_gpu_"))  # --out holds only the JSON
        self.cache = self.work / "token_cache"
        self.common = [f"training.device={args.device}"] + (TINY_MODEL if args.tiny else [])
        import torch

        from benchmarks.core.records import stamped

        # the environment record of benchmarks/core first: every write of parallel_gpu.json carries the commit
        self.results: dict = stamped({"date": time.strftime("%Y-%m-%d %H:%M"), "parts": {},
                                      "device": torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu",
                                      "torch": torch.__version__}, device=args.device)
        self.t_start = time.time()

    def report(self) -> None:
        report(self.results, self.out, self.t_start)

    def on_term(self, *_) -> None:
        """Killed from outside (a budget's timeout): report what ran, then go."""
        self.report()
        sys.exit(124)

    def job(self, name, size, mode, dist, launcher, steps, extra, skip=3, timeout=None, min_s=None) -> dict:
        args, results = self.args, self.results
        left = args.deadline - (time.time() - self.t_start) if args.deadline else float("inf")
        if left < (min_s or args.min_job_s):  # --deadline: what would not finish is not started
            r = {"name": name, "error": f"not run: {left:.0f} s left of --deadline"}
            results.setdefault("jobs", {})[name] = r
            return r
        r = run_job(overrides(size, mode, dist, 1, steps, self.cache, self.common + extra), 1, self.work / name,
                    launcher=launcher, timeout=min(timeout or args.timeout, left - 2), skip=skip)
        r["name"] = name
        print(json.dumps({k: v for k, v in r.items() if k not in ("ms_all", "losses", "grad_norms", "args")}),
              f"[{time.time() - self.t_start:.0f} s]", flush=True)
        results.setdefault("jobs", {})[name] = r  # written after every job: a run cut short keeps what it had
        (self.out / "parallel_gpu.json").write_text(json.dumps(results, indent=1))
        return r

    def compare(self, part_name: str, runs: dict, tol: float) -> None:
        """runs["eager"] against runs["graphed"]: losses and gradient norms step by step, equal where their largest
        relative difference is below tol."""
        part = {"runs": runs}
        if all("losses" in r for r in runs.values()) and len(runs) == 2:
            e, g = runs["eager"], runs["graphed"]
            part["max_rel_diff_loss"] = max_rel_diff(e["losses"], g["losses"])
            part["max_rel_diff_grad_norm"] = max_rel_diff(e["grad_norms"], g["grad_norms"])
            part["losses_eager"], part["losses_graphed"] = e["losses"], g["losses"]
            part["equal"] = part["max_rel_diff_loss"] < tol and part["max_rel_diff_grad_norm"] < tol
        self.results["parts"][part_name] = part

    def eager_vs_graphed(self, part_name: str, dist: str, small: list, tol: float) -> None:
        """8 steps with accumulation of a small model (torchrun, 1 rank), eager and graphed."""
        small = small + ["model.vocab_size=258", "model.seq_length=512", "model.window=128", "model.suffix_len=1",
                         "ttt.mini_batch_size=128", "model.fused_kernels=true", "training.global_batch_size=4",
                         "training.micro_batch_size=2"]
        if self.args.device == "cuda":
            small.append("model.attention_backend=triton")
        self.compare(part_name, {g: self.job(f"{part_name}_{g}", "125m", "e2e", dist, "torchrun", 8,
                                             small + [f"training.cuda_graph={'true' if g == 'graphed' else 'false'}"],
                                             skip=0)
                                 for g in (("eager", "graphed") if self.args.device == "cuda" else ("eager",))}, tol)


def part_a(run: Runner) -> None:
    """fp32: the same kernels in the same order."""
    run.eager_vs_graphed("a", "ddp", ["model.n_layers=2", "model.d_model=64", "model.n_heads=2",
                                      "model.mlp_width=128", "model.prime_mlp_width=128",
                                      "model.compute_dtype=float32"], 1e-5)


def part_b(run: Runner) -> None:
    part = {}
    for size in run.args.sizes:
        steps = run.args.steps if size == "125m" else max(8, 2 * run.args.steps // 3)
        for mode in ("fa", "e2e"):
            for launcher in ("python", "torchrun"):
                name = f"b_{size}_{mode}_{'single' if launcher == 'python' else 'ddp1'}"
                part[name] = run.job(name, size, mode, "ddp", launcher, steps, [])
        for mode in ("fa", "e2e"):
            ratio(part, f"{size}_{mode}_ddp_over_single", f"b_{size}_{mode}_ddp1", f"b_{size}_{mode}_single")
        for path in ("single", "ddp1"):
            ratio(part, f"{size}_meta_over_pretrain_{path}", f"b_{size}_e2e_{path}", f"b_{size}_fa_{path}")
    run.results["parts"]["b"] = part


def part_c(run: Runner) -> None:
    size = "125m" if run.args.tiny else "3b"
    remat = ["ttt.remat_inner=true", "ttt.remat_prefix=true"]
    part = {"offload": run.job("c_3b_fsdp_offload", size, "e2e", "fsdp", "python", 5,
                               remat + ["training.fsdp_cpu_offload=true"], skip=2)}
    if not run.args.no_3b_without_offload:
        part["no_offload"] = run.job("c_3b_fsdp", size, "e2e", "fsdp", "python", 5, remat, skip=2)
    run.results["parts"]["c"] = part


def part_d(run: Runner) -> None:
    steps = run.args.steps
    part = {"fsdp_eager": run.job("d_125m_e2e_fsdp", "125m", "e2e", "fsdp", "python", min(steps, 12), [])}
    ddp = run.results["parts"].get("b", {}).get("b_125m_e2e_ddp1")
    if ddp is None:
        ddp = part["ddp_graphed"] = run.job("d_125m_e2e_ddp1", "125m", "e2e", "ddp", "torchrun", steps, [])
    if "ms_per_step" in part["fsdp_eager"] and "ms_per_step" in ddp:
        part["fsdp_eager_over_ddp_graphed"] = part["fsdp_eager"]["ms_per_step"] / ddp["ms_per_step"]
    run.results["parts"]["d"] = part


def part_e(run: Runner) -> None:
    """bf16 (the default): rounding only; a dropped micro-batch or stale weights is >1e-2."""
    if run.args.e_125m:  # eager FSDP2 with the graphed path's kernels, against part f's graphed 125M job
        graphed = run.results["parts"].get("f", {}).get("f_125m_fsdp_e2e", {})
        eager = run.job("e_125m_eager", "125m", "e2e", "fsdp", "torchrun", run.args.steps,
                        ["model.fused_kernels=true", "training.cuda_graph=false"])
        run.compare("e", {"eager": eager, "graphed": graphed}, 4e-3)
    else:
        run.eager_vs_graphed("e", "fsdp", ["model.n_layers=4", "model.d_model=128", "model.n_heads=2",
                                           "model.mlp_width=256", "model.prime_mlp_width=256"], 4e-3)


def part_f(run: Runner) -> None:
    part = {}
    for size in run.args.sizes:
        steps = run.args.steps if size == "125m" else max(6, 2 * run.args.steps // 3)
        for name, mode, dist in (("fsdp_e2e", "e2e", "fsdp"), ("ddp_e2e", "e2e", "ddp"), ("fsdp_fa", "fa", "fsdp")):
            if mode == "fa" and run.args.no_fa:
                continue
            part[f"f_{size}_{name}"] = run.job(f"f_{size}_{name}", size, mode, dist, "torchrun", steps, [])
        ratio(part, f"{size}_fsdp_over_ddp_e2e", f"f_{size}_fsdp_e2e", f"f_{size}_ddp_e2e")
        ratio(part, f"{size}_meta_over_pretrain_fsdp", f"f_{size}_fsdp_e2e", f"f_{size}_fsdp_fa")
    run.results["parts"]["f"] = part


def part_g(run: Runner) -> None:
    size = "125m" if run.args.tiny else "3b"
    remat = ["ttt.remat_inner=true", "ttt.remat_prefix=true"]
    part = {}
    for name, mode, graph in (("e2e_graphed", "e2e", "true"), ("fa_graphed", "fa", "true"),
                              ("e2e_eager", "e2e", "false")):
        part[f"g_{size}_{name}"] = run.job(f"g_{size}_{name}", size, mode, "fsdp", "python", run.args.steps_3b,
                                           remat + [f"training.cuda_graph={graph}"], skip=run.args.skip_3b,
                                           timeout=run.args.timeout_3b)
    ratio(part, f"{size}_meta_over_pretrain_graphed", f"g_{size}_e2e_graphed", f"g_{size}_fa_graphed")
    ratio(part, f"{size}_eager_over_graphed_e2e", f"g_{size}_e2e_eager", f"g_{size}_e2e_graphed")
    run.results["parts"]["g"] = part


def j_extra(size: str, how: str) -> list[str]:
    """The overrides of a part j job beyond its size, mode and dist."""
    extra = [f"training.cuda_graph={'true' if how == 'graphed' else 'false'}"]
    extra += ["model.fused_kernels=true"] if how == "eager" else []
    # 3B on one GPU: the inner loop, the prefix and the logits recomputed in the backward
    extra += ["ttt.remat_inner=true", "ttt.remat_prefix=true", "ttt.recompute_logits=true"] if size == "3b" else []
    extra += ["training.fsdp_cpu_offload=true"] if how == "offload" else []
    return extra


def part_j(run: Runner) -> None:
    part = run.results["parts"]["j"] = {}  # filled as the jobs end: a run cut short reports what ran
    for spec in run.args.jobs:
        if spec.startswith("if-oom:"):  # only where an earlier job of that size ran out of memory
            spec = spec[len("if-oom:"):]
            if not any("out of memory" in r.get("error", "") for k, r in part.items()
                       if k.startswith(f"j_{spec.split('/')[0]}_")):
                continue
        size, mode, dist, how, *rest = spec.split("/")
        steps, skip = (int(rest[0]) if rest else 6), (int(rest[1]) if len(rest) > 1 else 2)
        min_s = float(rest[2]) if len(rest) > 2 else None
        name = f"j_{size}_{mode}_{dist}_{how}"
        # FSDP2 as `python train.py` (a 1-rank group), DDP as torchrun with one rank
        part[name] = run.job(name, size, mode, dist, "python" if dist == "fsdp" else "torchrun", steps,
                             j_extra(size, how), skip=skip, min_s=min_s)
    for size in {spec.split(":")[-1].split("/")[0] for spec in run.args.jobs}:
        n = lambda mode, dist, how: f"j_{size}_{mode}_{dist}_{how}"  # noqa: E731
        ratio(part, f"{size}_fsdp_over_ddp_e2e", n("e2e", "fsdp", "graphed"), n("e2e", "ddp", "graphed"))
        ratio(part, f"{size}_meta_over_pretrain_fsdp", n("e2e", "fsdp", "graphed"), n("fa", "fsdp", "graphed"))
        ratio(part, f"{size}_eager_over_graphed_fsdp_e2e", n("e2e", "fsdp", "eager"), n("e2e", "fsdp", "graphed"))
        e, g = part.get(n("e2e", "fsdp", "eager"), {}), part.get(n("e2e", "fsdp", "graphed"), {})
        if "losses" in e and "losses" in g:
            part[f"{size}_eager_vs_graphed_max_rel_diff_loss"] = max_rel_diff(e["losses"], g["losses"])


# In this order: d reads b's DDP job, and e (with --e-125m) f's graphed FSDP2 job.
PARTS = (("a", part_a), ("b", part_b), ("c", part_c), ("d", part_d), ("f", part_f), ("e", part_e), ("g", part_g),
         ("j", part_j))


def main():
    args = parse_args()
    run = Runner(args)
    signal.signal(signal.SIGTERM, run.on_term)
    for letter, part in PARTS:
        if letter in args.parts:
            part(run)
    run.report()


def report(results: dict, out: Path, t_start: float) -> None:
    """parallel_gpu.json, and the table (last: the tail of the output is what comes back)."""
    results["wall_s"] = time.time() - t_start
    (out / "parallel_gpu.json").write_text(json.dumps(results, indent=1))
    print(f"\n{results.get('device')}, torch {results.get('torch')}, {results['date']}, {results['wall_s']:.0f} s; "
          "median ms/step of the trainer's step_time_s (first steps skipped)")
    print("| job | ms/step | tokens/s | peak GiB | note |")
    print("|---|---|---|---|---|")
    for key, part in results["parts"].items():
        for name, r in part.items():
            if isinstance(r, dict) and "runs" not in r and "name" in r:
                if "error" in r:
                    print(f"| {r['name']} | | | | {r['error'][-150:]!r} |")
                else:
                    print(f"| {r['name']} | {r['ms_per_step']:.1f} | {r['tokens_per_s_per_gpu']:.0f} | "
                          f"{r['max_memory_gib']:.1f} | {'graph' if r.get('cuda_graph') else 'eager'} |")
            elif isinstance(r, (float, bool)):
                print(f"| {key}: {name} | {r:.4g} | | | |" if isinstance(r, float)
                      else f"| {key}: {name} | {r} | | | |")
        for name, r in part.get("runs", {}).items():
            print(f"| {key}_{name} | {r.get('ms_per_step', float('nan')):.1f} | | "
                  f"{r.get('max_memory_gib', float('nan')):.1f} | {r.get('error', '')[-150:]!r} |")


if __name__ == "__main__":
    main()
