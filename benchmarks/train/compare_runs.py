"""Compare the loss curves of two training runs (metrics.jsonl of each run dir): e.g. eager vs CUDA graph.

    python -m benchmarks.train.compare_runs RUN_A RUN_B [--labels eager graph] [--plot curve.png] [--json out.json]

Prints per-step losses side by side with the largest absolute difference, and the median step time of each
run from step 11 on (the first steps compile and capture).
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

from benchmarks.core.records import write_json


def load(run: str) -> list[dict]:
    path = Path(run) / "metrics.jsonl"
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    return [r for r in rows if "loss" in r]


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("runs", nargs=2)
    p.add_argument("--labels", nargs=2, default=["a", "b"])
    p.add_argument("--plot")
    p.add_argument("--json")
    args = p.parse_args(argv)
    a, b = (load(r) for r in args.runs)
    if [r["step"] for r in a] != [r["step"] for r in b]:
        sys.exit(f"the runs logged different steps: {len(a)} vs {len(b)} records")
    diffs = [abs(x["loss"] - y["loss"]) for x, y in zip(a, b)]
    rel = [d / abs(x["loss"]) for d, x in zip(diffs, a)]
    times = [statistics.median(r["step_time_s"] for r in rows[10:] or rows) for rows in (a, b)]
    summary = {"steps": len(a), "max_abs_loss_diff": max(diffs), "max_rel_loss_diff": max(rel),
               "first_loss": [a[0]["loss"], b[0]["loss"]], "last_loss": [a[-1]["loss"], b[-1]["loss"]],
               "median_step_s": times, "labels": args.labels}
    for x, y in zip(a, b):
        print(f"step {x['step']:5d}  {args.labels[0]} {x['loss']:.6f}  {args.labels[1]} {y['loss']:.6f}")
    print(json.dumps(summary))
    if args.json:
        write_json(args.json, {"summary": summary, "a": a, "b": b}, device="cpu")
    if args.plot:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        fig, ax = plt.subplots(figsize=(6, 4))
        for rows, label, style in ((a, args.labels[0], "-"), (b, args.labels[1], "--")):
            ax.plot([r["step"] for r in rows], [r["loss"] for r in rows], style, label=label)
        ax.set_xlabel("step")
        ax.set_ylabel("train loss")
        ax.set_title(f"max |loss difference| {max(diffs):.2e}")
        ax.legend()
        fig.tight_layout()
        fig.savefig(args.plot, dpi=120)


if __name__ == "__main__":
    main()
