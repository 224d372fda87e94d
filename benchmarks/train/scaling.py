"""Weak scaling of the user's training path: `torchrun train.py`-equivalent jobs at 1..N GPUs, one sequence per GPU.

    python -m benchmarks.train.scaling --sizes 125m 1b --modes fa e2e --dists ddp fsdp --gpus 1 2 4 8 --out DIR
    python -m benchmarks.train.scaling ... --gpus 8 --baseline DIR_OF_A_1_GPU_RUN/scaling.json   # 1-GPU figures reused

Each configuration is one torchrun job (--standalone, N processes) of this file in --worker mode, which composes
conf/ + experiment/<size>/pretrain/<mode> with Hydra exactly as train.py does and calls
`ttt_e2e.train.trainer.train`: the same code a user launches (CUDA graphs by default under DDP and FSDP2).
The data are the Python stdlib's bytes (data.source=stdlib, always present; the token values do not change a
step's time), no validation, no checkpoints. Step times are the trainer's own `step_time_s` records (rank 0's is
the job's; every rank's is reported too), median after --skip steps (the capture and the first allocations).
Reported per configuration and GPU count: ms/step, tokens/s per GPU, weak-scaling efficiency t(1 GPU) / t(N GPUs)
at the same per-GPU batch, every rank's median step time and peak memory. Writes scaling.json and scaling.png
under --out (the jobs' run dirs go to --work), and prints a table last.

Needs hydra-core and omegaconf (train.py's own dependencies).
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]  # the jobs run here, so `-m benchmarks...` and ttt_e2e are this checkout's


def overrides(size: str, mode: str, dist: str, n_gpus: int, steps: int, cache: Path, extra: list[str]) -> list[str]:
    """The train.py command line of one benchmark job: the experiment as the README launches it, with synthetic-
    enough data, no eval and no checkpoints, one sequence per GPU."""
    return [f"+experiment={size}/pretrain/{mode}", "data=stdlib", "data.max_docs=400", f"data.cache_dir={cache}",
            "data.val_fraction=0", "logger=none", f"training.steps={steps}", f"training.global_batch_size={n_gpus}",
            "training.micro_batch_size=1", "training.save_checkpoints=false", "training.progress=false",
            f"training.distributed={dist}", *extra]


def compose(args: list[str]):
    from hydra import compose as hydra_compose, initialize_config_dir
    from omegaconf import OmegaConf

    from ttt_e2e.train.hydra_store import register_configs

    register_configs()
    with initialize_config_dir(config_dir=str(REPO / "conf"), version_base="1.3"):
        return OmegaConf.to_object(hydra_compose(config_name="config", overrides=args))


def _log_every_rank(out: Path, rank: int) -> None:
    """Every rank builds the same metric records (its own step time included) but only rank 0 writes them; here
    the other ranks write theirs too, to metrics_rank<r>.jsonl (benchmark-only: the trainer is left as it is)."""
    from ttt_e2e.train import metrics, trainer

    build = trainer.build_loggers

    def every_rank(cfg, run_dir, resume_step, is_main):
        loggers = build(cfg, run_dir, resume_step, is_main)
        if not is_main:
            loggers.sinks.append(metrics.JsonlLogger(out / f"metrics_rank{rank}.jsonl", None))
        return loggers

    trainer.build_loggers = every_rank


def worker(args: list[str], out: Path) -> None:
    """One rank of a benchmark job (under torchrun, or alone): train, then write this rank's figures."""
    import torch

    from ttt_e2e.train.trainer import train

    cfg = compose(args)
    rank = int(os.environ.get("RANK", "0"))
    _log_every_rank(out, rank)
    t0 = time.perf_counter()
    error = None
    try:
        train(cfg, out / "run")
    except torch.OutOfMemoryError as e:
        error = f"out of memory: {str(e).splitlines()[0][:200]}"
    peak = torch.cuda.max_memory_allocated() / 2**30 if torch.cuda.is_available() else None
    (out / f"rank{rank}.json").write_text(json.dumps({"rank": rank, "peak_mem_gib": peak, "error": error,
                                                      "wall_s": time.perf_counter() - t0}))


def run_job(args: list[str], n_gpus: int, out: Path, launcher: str = "torchrun", timeout: float = 600,
            skip: int = 3) -> dict:
    """One training job of this file's worker: launcher "torchrun" (n_gpus processes) or "python" (one process,
    no process group: the plain `python train.py` path). Returns its figures (or its error)."""
    out.mkdir(parents=True, exist_ok=True)
    me = ["-m", "benchmarks.train.scaling", "--worker", "--out", str(out), "--", *args]
    if launcher == "torchrun":
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={n_gpus}", *me]
    else:
        cmd = [sys.executable, *me]
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "HF_HUB_OFFLINE": "1"}
    t0 = time.time()
    try:
        p = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout)
        tail = (p.stdout + p.stderr)[-3000:]
        rc = p.returncode
    except subprocess.TimeoutExpired as e:
        tail, rc = f"timed out after {timeout} s: {str(e.stdout or '')[-1000:]}", "timeout"
    result = {"launcher": launcher, "gpus": n_gpus, "args": args, "wall_s": time.time() - t0, "rc": rc}
    ranks = [json.loads(f.read_text()) for f in sorted(out.glob("rank*.json"))]
    result["peak_mem_gib_by_rank"] = [r["peak_mem_gib"] for r in ranks]
    errors = [r["error"] for r in ranks if r["error"]]
    metrics = out / "run" / "metrics.jsonl"
    records = [json.loads(line) for line in metrics.read_text().splitlines() if line] if metrics.exists() else []
    records = [r for r in records if "step_time_s" in r]
    if errors or rc != 0 or len(records) <= skip:
        result["error"] = errors[0] if errors else f"exit {rc}: {tail}"
        return result
    times = [r["step_time_s"] * 1e3 for r in records[skip:]]
    others = [[json.loads(line)["step_time_s"] * 1e3 for line in f.read_text().splitlines() if line][skip:]
              for f in sorted(out.glob("metrics_rank*.jsonl"), key=lambda f: int(f.stem[len("metrics_rank"):]))]
    result["ms_per_step_by_rank"] = [statistics.median(t) if t else None for t in [times, *others]]
    T = records[0]["tokens"] / records[0]["step"] / n_gpus  # tokens per GPU per step
    med = statistics.median(times)
    result.update(ms_per_step=med, ms_all=times, tokens_per_s_per_gpu=T / med * 1e3,
                  losses=[r["loss"] for r in records], grad_norms=[r["grad_norm"] for r in records],
                  max_memory_gib=max(r.get("max_memory_gib", 0.0) for r in records),
                  cuda_graph=records[-1].get("cuda_graph"))  # whether the step replayed a graph
    return result


def plot(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for key in sorted({(r["size"], r["mode"], r["dist"]) for r in rows}):
        pts = sorted((r["gpus"], r["efficiency"]) for r in rows
                     if (r["size"], r["mode"], r["dist"]) == key and r.get("efficiency"))
        if pts:
            ax.plot(*zip(*pts), marker="o", label=" ".join(key))
    ax.axhline(0.9, color="gray", ls="--", lw=0.8)
    ax.set_xscale("log", base=2)
    gpus = sorted({r["gpus"] for r in rows})
    ax.set_xticks(gpus, [str(g) for g in gpus])
    ax.set_xlabel("GPUs (1 sequence each)")
    ax.set_ylabel("weak-scaling efficiency t1 / tN")
    ax.set_ylim(0, 1.1)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--sizes", nargs="+", default=["125m", "1b"])
    ap.add_argument("--modes", nargs="+", default=["fa", "e2e"], choices=["fa", "e2e", "swa"])
    ap.add_argument("--dists", nargs="+", default=["ddp", "fsdp"], choices=["ddp", "fsdp"])
    ap.add_argument("--gpus", nargs="+", type=int, default=[1, 2, 4, 8])
    ap.add_argument("--steps", type=int, default=20, help="optimizer steps per job (the first --skip not timed)")
    ap.add_argument("--skip", type=int, default=3)
    ap.add_argument("--baseline", default=None, help="scaling.json of an earlier run: its 1-GPU figures")
    ap.add_argument("--timeout", type=float, default=600, help="per job, seconds")
    ap.add_argument("--out", required=True, help="scaling.json and scaling.png (worker: its job dir)")
    ap.add_argument("--work", default=None, help="the jobs' run dirs and token cache (default: a temporary dir)")
    ap.add_argument("extra", nargs="*", help="after --: more train.py overrides (worker: all of them)")
    args = ap.parse_args()
    out = Path(args.out)
    if args.worker:
        worker(args.extra, out)
        return
    import torch

    from benchmarks.core.records import write_json

    out.mkdir(parents=True, exist_ok=True)
    work = Path(args.work or tempfile.mkdtemp(prefix="scaling_"))
    base = {}
    if args.baseline:
        base = {(r["size"], r["mode"], r["dist"]): r for r in json.loads(Path(args.baseline).read_text())["rows"]
                if r["gpus"] == 1 and "ms_per_step" in r}
    rows = []
    for size in args.sizes:
        for mode in args.modes:
            for dist in args.dists:
                for n in args.gpus:
                    key = (size, mode, dist)
                    if n == 1 and key in base:
                        continue
                    tag = f"{size}_{mode}_{dist}_{n}gpu"
                    r = run_job(overrides(size, mode, dist, n, args.steps, work / "token_cache", args.extra), n,
                                work / tag, timeout=args.timeout, skip=args.skip)
                    r.update(size=size, mode=mode, dist=dist)
                    if n == 1 and "ms_per_step" in r:
                        base[key] = r
                    if key in base and "ms_per_step" in r:
                        r["efficiency"] = base[key]["ms_per_step"] / r["ms_per_step"]
                    rows.append(r)
                    print(json.dumps({k: v for k, v in r.items() if k not in ("ms_all", "losses", "grad_norms",
                                                                              "args")}), flush=True)
    device = torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"
    write_json(out / "scaling.json", {"device": device, "torch": torch.__version__, "date": time.strftime("%Y-%m-%d"),
                                      "rows": rows}, device="cuda" if torch.cuda.is_available() else "cpu")
    plot(rows, out / "scaling.png")
    print(f"\n{device}, torch {torch.__version__}, {time.strftime('%Y-%m-%d')}; median ms/step after {args.skip}")
    print("| size | mode | dist | GPUs | ms/step | tokens/s/GPU | efficiency | ms/step by rank | peak GiB by rank |")
    print("|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        if "error" in r:
            print(f"| {r['size']} | {r['mode']} | {r['dist']} | {r['gpus']} | {r['error'][:120]!r} | | | | |")
            continue
        eff = f"{100 * r['efficiency']:.1f}%" if "efficiency" in r else ""
        mem = ", ".join(f"{m:.1f}" for m in r["peak_mem_gib_by_rank"] if m is not None)
        by_rank = ", ".join(f"{m:.1f}" for m in r["ms_per_step_by_rank"] if m is not None)
        print(f"| {r['size']} | {r['mode']} | {r['dist']} | {r['gpus']} | {r['ms_per_step']:.1f} | "
              f"{r['tokens_per_s_per_gpu']:.0f} | {eff} | {by_rank} | {mem} |")


if __name__ == "__main__":
    main()
