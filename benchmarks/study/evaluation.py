"""The study's evaluation phase: held-out loss by position (eval.py's evaluate_checkpoint) on every corpus, the
needle in a haystack (ttt_e2e/eval/needle.py), and test-time-only TTT: a checkpoint trained without the inner
loop evaluated with it switched on (ttt.train_mode=meta) at a grid of inner lrs.

Tasks run in worker processes, --parallel at a time, each worker a chunk of tasks (one interpreter and CUDA
context for several evaluations):

    python -m benchmarks.study.evaluation TASKS.json OUT.json   # one worker: OUT.json rewritten after each task

A task is {"kind": "curve" | "needle", "label", "checkpoint", "overrides": [...], ...}: a curve task also has
"corpus" (a folder of .txt files), "windows", "batch_size"; a needle task "haystack", "lengths", "depths",
"trials", "batch_size". "device" in both.
"""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]

# the inner lrs at which a test-time-only checkpoint is evaluated (ttt.inner_lr; ttt.eval_full_ilr is on); 3 because
# the 2026-12-07 run's best was the old grid's top (docs/study.md): a best at the edge is not known to be the best
TTO_GRID = (0.01, 0.03, 0.1, 0.3, 1.0, 3.0)


def test_time_overrides(inner_lr: float) -> list[str]:
    """A pretrain-mode checkpoint of the e2e architecture, evaluated with its inner loop on at this inner lr."""
    return ["ttt.train_mode=meta", f"ttt.inner_lr={inner_lr:g}"]


def curve_task(label: str, checkpoint: str, corpus: Path, cache: Path, windows: int, batch_size: int, device: str,
               overrides: list[str] = ()) -> dict:
    # the whole folder is held out: val_fraction 0.99 makes (nearly) all of it the validation split
    return {"kind": "curve", "label": label, "checkpoint": checkpoint, "corpus": str(corpus), "windows": windows,
            "batch_size": batch_size, "device": device,
            "overrides": [f"data.source={corpus}", "data.val_fraction=0.99", f"data.cache_dir={cache}", *overrides]}


def needle_task(label: str, checkpoint: str, haystack: Path, cache: Path, lengths: list[int], depths: list[float],
                trials: int, batch_size: int, device: str, overrides: list[str] = ()) -> dict:
    return {"kind": "needle", "label": label, "checkpoint": checkpoint, "haystack": str(haystack), "lengths": lengths,
            "depths": depths, "trials": trials, "batch_size": batch_size, "device": device,
            "overrides": [f"data.cache_dir={cache}", *overrides]}


def run_task(task: dict) -> dict:
    if task["kind"] == "curve":
        from ttt_e2e.eval.context_curve import evaluate_checkpoint

        r = evaluate_checkpoint(task["checkpoint"], task["overrides"], task["windows"], task["batch_size"],
                                task["device"])
        return {"loss": r["loss"], "tokens": r["tokens"], "windows": r["windows"], "step": r["step"],
                "train_mode": r["train_mode"],
                "loss_by_position": [None if x is None else round(x, 4) for x in r["loss_by_position"]]}
    if task["kind"] == "needle":
        from ttt_e2e.eval.needle import evaluate_needle

        return evaluate_needle(task["checkpoint"], task["haystack"], task["lengths"], task["depths"], task["trials"],
                               task["batch_size"], task["device"], task["overrides"])
    raise ValueError(f"unknown evaluation task kind {task['kind']!r}")


def worker(tasks_json: str, out_json: str) -> int:
    tasks = json.loads(Path(tasks_json).read_text())
    out, done = Path(out_json), []
    for task in tasks:
        t0 = time.time()
        try:
            result = run_task(task)
        except Exception as e:  # one failed evaluation must not lose the others: recorded, and the rest go on
            result = {"error": f"{type(e).__name__}: {str(e).strip().splitlines()[0] if str(e).strip() else ''}"}
        done.append({**task, "result": result, "seconds": time.time() - t0})
        print(f"{task['kind']} {task['label']} {task.get('corpus', task.get('haystack'))} "
              f"{' '.join(task['overrides'][3:] if task['kind'] == 'curve' else task['overrides'][1:])}: "
              f"{result.get('error') or 'done'} ({time.time() - t0:.1f}s)", flush=True)
        tmp = out.with_suffix(".tmp")
        tmp.write_text(json.dumps(done))
        tmp.replace(out)
    return 0 if all("error" not in d["result"] for d in done) else 1


if __name__ == "__main__":
    if len(sys.argv) != 3:
        print("usage: python -m benchmarks.study.evaluation TASKS.json OUT.json", file=sys.stderr)
        sys.exit(2)
    sys.exit(worker(sys.argv[1], sys.argv[2]))


class Evaluation:
    """Schedules the evaluation of a study's trained jobs (`study` gives the arguments, data, work folder, progress
    lines and results.json): every evaluated job's loss by position on every corpus, a test-time-only job's also
    with its inner loop on at each inner lr of the grid, then the needle for the per-seed jobs (a test-time-only
    one at its best inner lr on code_val)."""

    def __init__(self, study):
        self.st = study
        self.a = study.a

    def curves(self, runs: list[dict]) -> list[dict]:
        a, st = self.a, self.st
        tasks = []
        for r in runs:
            for corpus in a.corpora.split(","):
                tasks.append(curve_task(r["name"], r["checkpoint"], st.data / corpus, st.cache, a.windows,
                                        a.eval_batch, a.device))
                if r["test_time_grid"]:
                    tasks += [curve_task(f"{r['name']}@{lr:g}", r["checkpoint"], st.data / corpus, st.cache,
                                         a.windows, a.eval_batch, a.device, test_time_overrides(lr))
                              for lr in a.tto_grid]
        return tasks

    def needles(self, runs: list[dict], best_lr: dict) -> list[dict]:
        a, st = self.a, self.st
        lengths, depths = [int(x) for x in a.needle_lengths.split(",")], [float(x) for x in a.needle_depths.split(",")]
        tasks = []
        for r in runs:
            if not r["per_seed"]:
                continue
            lr = best_lr.get(r["kind"]) if r["test_time_grid"] else None
            if r["test_time_grid"] and lr is None:
                continue  # no curve at any inner lr: nothing to choose the needle's lr by
            tasks.append(needle_task(r["name"] if lr is None else f"{r['name']}@{lr:g}", r["checkpoint"],
                                     st.data / "code_val", st.cache, lengths, depths, a.needle_trials, a.eval_batch,
                                     a.device, test_time_overrides(lr) if lr is not None else []))
        return tasks

    def run(self, tasks: list[dict], deadline: float, what: str) -> list[dict]:
        """The tasks in --parallel worker processes (a round-robin share each, so every worker gets the most
        important tasks first); what is not done by the deadline is killed. Returns the finished tasks."""
        st, n = self.st, max(1, min(self.a.parallel, len(tasks)))
        folder = st.work / what
        folder.mkdir(parents=True, exist_ok=True)
        procs = []
        for w in range(n):
            (folder / f"tasks_{w}.json").write_text(json.dumps(tasks[w::n]))
            log = open(st.work / f"{what}_{w}.log", "w")
            procs.append(subprocess.Popen([sys.executable, "-m", "benchmarks.study.evaluation",
                                           str(folder / f"tasks_{w}.json"), str(folder / f"out_{w}.json")],
                                          cwd=REPO, env=st.env, stdout=log, stderr=subprocess.STDOUT,
                                          start_new_session=True))
            st.procs.append(procs[-1])
        while any(p.poll() is None for p in procs) and time.time() < deadline:
            time.sleep(0.5)
        for w, p in enumerate(procs):
            if p.poll() is None:
                os.killpg(p.pid, signal.SIGKILL)
                p.wait()
                st.say(f"{what}: worker {w} killed at the deadline")
        done = []
        for w in range(n):
            f = folder / f"out_{w}.json"
            done += json.loads(f.read_text()) if f.exists() else []
        failed = [d for d in done if "error" in d["result"]]
        st.say(f"{what}: {len(done)} of {len(tasks)} tasks done in {n} workers" +
               "".join(f"; {d['label']} {d['kind']} failed: {d['result']['error']}" for d in failed[:5]))
        return done

    def evaluate(self, runs: list[dict], deadline: float) -> None:
        from .report import best_test_time_lr

        runs = [r for r in runs if r["checkpoint"] and r["evaluated"]]
        # a needle task takes about as long as a curve task; the needles get the share of the time their count has
        tasks = sorted(self.curves(runs), key=lambda t: (not t["corpus"].endswith("code_val"), "@" in t["label"]))
        n_needles = sum(1 for r in runs if r["per_seed"])
        cut = time.time() + (deadline - time.time()) * len(tasks) / max(1, len(tasks) + n_needles)
        self.st.say(f"eval: {len(tasks)} loss-by-position tasks for {len(runs)} checkpoints, then {n_needles} needle "
                    f"tasks, {self.a.parallel} workers")
        curves = [d for d in self.run(tasks, cut, "eval_curves") if "error" not in d["result"]]
        for r in runs:
            r["eval"] = {Path(d["corpus"]).name: d["result"] for d in curves if d["label"] == r["name"]}
            if r["test_time_grid"]:
                r["test_time"] = {f"{lr:g}": {Path(d["corpus"]).name: d["result"] for d in curves
                                              if d["label"] == f"{r['name']}@{lr:g}"} for lr in self.a.tto_grid}
        best = {k: best_test_time_lr(runs, k) for k in {r["kind"] for r in runs if r["test_time_grid"]}}
        self.st.results["test_time_best_lr"] = best
        self.st.save()
        needles = [d for d in self.run(self.needles(runs, best), deadline, "eval_needle") if "error" not in d["result"]]
        for r in runs:
            d = next((d for d in needles if d["label"].split("@")[0] == r["name"]), None)
            # a test-time-only run's needle was taken at one inner lr of the grid: recorded with it
            r["needle"] = None if d is None else {**d["result"], **({"inner_lr": float(d["label"].split("@")[1])}
                                                                   if "@" in d["label"] else {})}
        self.st.save()
