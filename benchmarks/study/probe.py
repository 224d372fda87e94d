"""Choosing the study's configuration on the GPU in about two minutes: does full attention start using its
context (fa below swa late in the context) on natural code, or on code with repeated spans, within the tokens a
study run can train? Trains fa and swa on both corpora, e2e and tto on the repeated one, all at once on one GPU,
stops them at --seconds, then evaluates every last checkpoint on the held-out code (natural and with repeats) and
tto with its inner loop switched on. Prints the step times, memory, fa - swa over training (last quarter of the
context, training loss) and over held-out code.

    python -m benchmarks.study.probe --data DIR --out DIR --seconds 90
"""
from __future__ import annotations

import argparse
import json
import os
import signal
import statistics
import subprocess
import sys
import time
from pathlib import Path

from benchmarks.core.records import stamped

from .evaluation import curve_task, run_task, test_time_overrides
from .runs import Job, unique_overrides

REPO = Path(__file__).resolve().parents[2]

CANDIDATES = {  # name: (experiment, overrides)
    "fa_nat": ("fa", ["data.source={data}/code_train"]),
    "swa_nat": ("swa", ["data.source={data}/code_train"]),
    "fa_rep": ("fa", ["data.source={data}/code_train_rep"]),
    "swa_rep": ("swa", ["data.source={data}/code_train_rep"]),
    "e2e_rep": ("e2e", ["data.source={data}/code_train_rep"]),
    "tto_rep": ("tto", ["data.source={data}/code_train_rep"]),
}


def metrics(run_dir: Path) -> list[dict]:
    return Job(run_dir.name, "fa", 0, run_dir).records()


def last_quarter(xs: list) -> float:
    xs = [x for x in xs[len(xs) * 3 // 4:] if x is not None]
    return sum(xs) / len(xs) if xs else float("nan")


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--data", required=True)
    p.add_argument("--out", required=True)
    p.add_argument("--work", default="/tmp/ttt_probe")
    p.add_argument("--seconds", type=float, default=90.0, help="training time, all runs at once")
    p.add_argument("--runs", default=",".join(CANDIDATES))
    p.add_argument("--windows", type=int, default=32)
    p.add_argument("--override", action="append", default=[], help="key=value for every run (a CPU smoke test)")
    return p.parse_args(argv)


def tokenize(data: Path, cache: Path, t0: float) -> None:
    """Every corpus into the token cache once, before the runs (all started at once) read it."""
    from ttt_e2e.config import DataConfig
    from ttt_e2e.data import build_tokenizer, token_stream

    tok = build_tokenizer(str(data / "tokenizer"))
    for corpus in ("code_train", "code_train_rep", "code_val", "code_val_rep"):
        n = len(token_stream(DataConfig(source=str(data / corpus), tokenizer=str(data / "tokenizer"),
                                        cache_dir=str(cache)), tok))
        print(f"[{time.time() - t0:5.1f}s] {corpus}: {n:,} tokens", flush=True)


def train(names: list[str], data: Path, work: Path, cache: Path, override: list[str], seconds: float) -> None:
    """Every run at once, each in its own process group, stopped after `seconds` (or when all have ended)."""
    env = dict(os.environ, OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false", PYTHONUNBUFFERED="1",
               PYTHONPATH=str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    procs = {}
    for name in names:
        exp, extra = CANDIDATES[name]
        args = [f"+experiment=study/{exp}", *(o.format(data=data) for o in extra), f"data.tokenizer={data}/tokenizer",
                f"data.cache_dir={cache}", "training.checkpoint_every=20", "training.keep_last=1",
                "training.progress=false", "logger=none", *override, f"hydra.run.dir={work / name}"]
        procs[name] = subprocess.Popen([sys.executable, "train.py", *unique_overrides(args)], cwd=REPO, env=env,
                                       stdout=open(work / f"{name}.log", "w"), stderr=subprocess.STDOUT,
                                       start_new_session=True)
    until = time.time() + seconds
    while time.time() < until and any(p.poll() is None for p in procs.values()):
        time.sleep(2)
    for p in procs.values():
        if p.poll() is None:
            os.killpg(p.pid, signal.SIGTERM)
    for p in procs.values():
        try:
            p.wait(15)
        except subprocess.TimeoutExpired:
            os.killpg(p.pid, signal.SIGKILL)


def summarize_training(names: list[str], work: Path) -> dict:
    """The report's runs (from each run's metrics, or its log's tail where it logged none) and fa - swa by step."""
    report = {"runs": {}, "gap_by_step": {}, "eval": {}}
    for name in names:
        recs = metrics(work / name)
        log = (work / f"{name}.log").read_text(errors="replace").strip().splitlines()
        report["runs"][name] = {
            "steps": recs[-1]["step"] if recs else 0, "tokens": recs[-1]["tokens"] if recs else 0,
            "step_time_s": statistics.median(r["step_time_s"] for r in recs[1:]) if len(recs) > 1 else None,
            "max_memory_gib": recs[-1].get("max_memory_gib") if recs else None,
            "skipped": recs[-1].get("skipped_steps") if recs else None,
            "train_last_quarter": [last_quarter(r["minibatch_losses"]) for r in recs],
            "log_tail": log[-3:] if not recs else None}
    for data_name in ("nat", "rep"):
        fa, swa = report["runs"].get(f"fa_{data_name}"), report["runs"].get(f"swa_{data_name}")
        if fa and swa:
            diffs = [x - y for x, y in zip(fa["train_last_quarter"], swa["train_last_quarter"])]
            report["gap_by_step"][data_name] = [(i + 20, statistics.mean(diffs[i:i + 20]))
                                                for i in range(0, len(diffs) - 19, 20)]
    return report


def print_training(report: dict) -> None:
    print("\nrun | steps | tokens | step s (shared) | max mem GiB | skipped | train loss, last quarter (end)")
    for name, r in report["runs"].items():
        end = r["train_last_quarter"][-5:]
        print(f"{name} | {r['steps']} | {r['tokens']:,} | {r['step_time_s'] or float('nan'):.3f} | "
              f"{r['max_memory_gib'] or float('nan'):.1f} | {r['skipped']} | "
              f"{statistics.mean(end) if end else float('nan'):.3f}" + (f" | {r['log_tail']}" if r["log_tail"] else ""))
    for data_name, rows in report["gap_by_step"].items():
        print(f"fa - swa, training loss over the last quarter, {data_name}: " +
              ", ".join(f"{s}: {g:+.3f}" for s, g in rows))


def evaluate(report: dict, names: list[str], data: Path, work: Path, cache: Path, windows: int, t0: float) -> None:
    """report["eval"]: every run's last checkpoint on the held-out code; tto also with its inner loop on."""
    from ttt_e2e.train.checkpoint import latest_checkpoint

    for name in names:
        ckpts = work / name / "checkpoints"
        ckpt = latest_checkpoint(ckpts) if ckpts.is_dir() else None
        if ckpt is None:
            continue
        variants = [("", [])]
        if name.startswith("tto"):
            variants += [(f"@ilr{lr:g}", test_time_overrides(lr)) for lr in (0.1, 1.0)]
        for suffix, overrides in variants:
            for corpus in ("code_val", "code_val_rep"):
                t = time.time()
                key = f"{name}{suffix} {corpus}"
                try:
                    r = run_task(curve_task(name + suffix, str(ckpt), data / corpus, cache, windows, 8, "auto",
                                            overrides))
                    report["eval"][key] = {"step": r["step"], "loss": r["loss"],
                                           "last_quarter": last_quarter(r["loss_by_position"])}
                except Exception as e:  # reported; the others go on
                    report["eval"][key] = {"error": f"{type(e).__name__}: {e}"[:300]}
                print(f"[{time.time() - t0:5.1f}s] eval {key} ({time.time() - t:.1f}s): "
                      f"last quarter {report['eval'][key].get('last_quarter', float('nan')):.3f}", flush=True)


def print_eval(report: dict) -> None:
    print("\nheld-out | step | loss | last quarter")
    for k, r in report["eval"].items():
        print(f"{k} | {r.get('step')} | {r.get('loss', float('nan')):.3f} | {r.get('last_quarter', float('nan')):.3f}"
              + (f" | {r['error']}" if "error" in r else ""))


def main(argv=None) -> int:
    a = parse_args(argv)
    data, work, out = Path(a.data).resolve(), Path(a.work), Path(a.out)
    names = a.runs.split(",")
    if not (data / "manifest.json").exists() or set(names) - set(CANDIDATES):
        print(f"error: need a study corpus at {data} and runs among {list(CANDIDATES)}", file=sys.stderr)
        return 2
    out.mkdir(parents=True, exist_ok=True)
    work.mkdir(parents=True, exist_ok=True)
    cache = work / "cache"
    t0 = time.time()
    import torch

    print(f"probe: {torch.cuda.get_device_name() if torch.cuda.is_available() else 'cpu'}, "
          f"{time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}, torch {torch.__version__}", flush=True)
    tokenize(data, cache, t0)
    train(names, data, work, cache, a.override, a.seconds)
    print(f"[{time.time() - t0:5.1f}s] training stopped", flush=True)
    report = stamped(summarize_training(names, work))  # the environment record (benchmarks/core) first
    print_training(report)
    (out / "probe.json").write_text(json.dumps(report, indent=1))
    evaluate(report, names, data, work, cache, a.windows, t0)
    (out / "probe.json").write_text(json.dumps(report, indent=1))
    print_eval(report)
    print(f"done in {time.time() - t0:.0f}s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
