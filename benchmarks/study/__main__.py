"""The loss-vs-context study (docs/study.md), end to end in one command: fa, swa, e2e and tto (the e2e
architecture trained without the inner loop) with their seeds, all trained at once as separate processes on one
GPU; then the held-out loss by token position on every corpus, tto also with its inner loop switched on at a grid
of inner lrs (test-time-only TTT), the needle in a haystack, and results.json, a table (study.md) and plots
written into --out. Optional: a Hydra multirun sweep of e2e (--sweep-ilr, --sweep-b) and issue 26's spike check
(--spike-policies).

    python -m benchmarks.study.data                              # once, here: data/study/ (carry it to the GPU)
    python -m benchmarks.study --out $OUT/study --minutes 8.8     # on one H100 or H200
    python -m benchmarks.study --tiny --out /tmp/study           # the whole pipeline on a CPU, tiny models
    python -m benchmarks.study --render results.json --out DIR   # redo the table and plots from results.json

Time: everything ends by --minutes after the start: training by --train-share of it (runs still going are
stopped and evaluated at their last checkpoint), then the evaluation, then the report. Progress is printed and
results.json rewritten after each phase, so a killed call still leaves what was done.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import sys
import time
from pathlib import Path

from benchmarks.core.env import environment

from .evaluation import TTO_GRID, Evaluation
from .report import render
from .runs import KINDS, REPO, Training


class Study:
    def __init__(self, a):
        self.a = a
        self.t0 = time.time()
        self.end = self.t0 + a.minutes * 60
        self.out = Path(a.out)
        self.out.mkdir(parents=True, exist_ok=True)
        self.work = Path(a.work)
        for old in ("probe", "train", "eval_curves", "eval_needle"):  # an earlier call's run dirs would be resumed
            shutil.rmtree(self.work / old, ignore_errors=True)
        self.work.mkdir(parents=True, exist_ok=True)
        self.log_file = open(self.out / "progress.log", "a")
        self.procs = []  # every process started, stopped on the way out
        # the environment record of benchmarks/core (the commit: TTT_E2E_COMMIT on a copy without git history)
        env = environment(None if a.device == "auto" else a.device)
        self.results: dict = {"environment": env, "args": vars(a),
                              "started": time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime()),
                              "commit": env.get("commit"), "device": env.get("device"), "phases": {}}
        self.env = dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false",
                        PYTHONUNBUFFERED="1", PYTHONPATH=str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""))

    def say(self, msg: str) -> None:
        line = f"[{time.time() - self.t0:6.1f}s] {msg}"
        print(line, flush=True)
        self.log_file.write(line + "\n")
        self.log_file.flush()

    def save(self) -> None:
        tmp = self.out / "results.json.tmp"
        tmp.write_text(json.dumps(self.results, default=str, separators=(",", ":")))
        tmp.replace(self.out / "results.json")

    def stop_all(self) -> None:
        for p in self.procs:
            if p.poll() is None:
                try:
                    os.killpg(p.pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
                p.wait()

    def save_logs(self) -> None:
        """The last lines of every subprocess's log, in one file in the work folder (what to read when something
        failed there; the failed runs' tails are also in results.json)."""
        parts = []
        for f in sorted(self.work.glob("*.log")):
            lines = f.read_text(errors="replace").splitlines()
            parts.append(f"==> {f.name} ({len(lines)} lines) <==\n" + "\n".join(lines[-40:]))
        (self.work / "logs.txt").write_text("\n\n".join(parts) + "\n")

    def prepare_data(self) -> None:
        data = Path(self.a.data)
        if self.a.tiny and not (data / "manifest.json").exists():
            from .data import build

            build(data, tiny=True, vocab_size=512, min_chars=4000, val_fraction=0.08, max_mib=0.5,
                  repeat_chars=(200, 500))
        if not (data / "manifest.json").exists():
            raise SystemExit(f"error: no study corpus at {data}: run python -m benchmarks.study.data --out {data}")
        self.data = data.resolve()
        self.cache = (self.work / "cache").resolve()
        manifest = json.loads((data / "manifest.json").read_text())
        self.results["data"] = {k: {kk: v for kk, v in m.items() if kk != "files"} if isinstance(m, dict) else m
                                for k, m in manifest.items()}
        # Tokenize every corpus once, here, so that the runs (all started at once) hit the cache.
        from ttt_e2e.config import DataConfig
        from ttt_e2e.data import build_tokenizer, token_stream

        tok = build_tokenizer(str(self.data / "tokenizer"))
        for corpus in (self.a.train_corpus, *self.a.corpora.split(",")):
            n = len(token_stream(DataConfig(source=str(self.data / corpus), tokenizer=str(self.data / "tokenizer"),
                                            cache_dir=str(self.cache)), tok))
            self.say(f"data: {corpus} {n:,} tokens")

    def data_overrides(self) -> list[str]:
        return [f"data.source={self.data / self.a.train_corpus}", f"data.tokenizer={self.data / 'tokenizer'}",
                f"data.cache_dir={self.cache}"]


def parse(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", default="study_out", help="results.json, study.md, plots, progress.log")
    p.add_argument("--work", default=None, help="run dirs, checkpoints, token cache (default: /tmp/ttt_study)")
    p.add_argument("--data", default=None, help="benchmarks/study/data.py's folder (default data/study; tiny: "
                                                "built under --work if missing)")
    p.add_argument("--tiny", action="store_true", help="tiny models on the CPU (builds a tiny corpus if missing)")
    p.add_argument("--minutes", type=float, default=None, help="wall time for everything (default 8.8; tiny 3)")
    p.add_argument("--train-share", type=float, default=None, help="share of --minutes that training may use "
                                                                   "(default 0.72; tiny 0.6)")
    p.add_argument("--steps", default="auto", help="steps per run, or auto: probe, then what fits")
    p.add_argument("--min-steps", type=int, default=None)
    p.add_argument("--max-steps", type=int, default=None)
    p.add_argument("--probe-steps", type=int, default=8, help="steps each run logs in the probe")
    p.add_argument("--probe-s", type=float, default=None, help="longest probe (default 150 s; tiny 60 s)")
    p.add_argument("--kinds", default="fa,swa,e2e,tto", help=f"the per-seed jobs, among {', '.join(KINDS)}")
    p.add_argument("--seeds", type=int, default=None, help="seeds of each kind (default 2; tiny 1)")
    p.add_argument("--train-corpus", default="code_train_rep", help="the corpus folder the runs train on")
    p.add_argument("--corpora", default="code_val,code_val_rep,docs_val", help="held-out corpus folders")
    p.add_argument("--tto-grid", default=",".join(f"{x:g}" for x in TTO_GRID),
                   help="inner lrs at which tto is evaluated with its inner loop on")
    p.add_argument("--sweep-ilr", default=None, help="a Hydra multirun of e2e over these ttt.inner_lr values "
                                                     "(0: the ablation; default none; tiny 0)")
    p.add_argument("--sweep-b", default=None, help="... and these ttt.mini_batch_size values (default 16,64; tiny 16)")
    p.add_argument("--device", default="auto")
    p.add_argument("--spike-policies", default=None, help="issue 26's 128-inner-step run, once per "
                   "optim.spike_policy listed (default none; tiny rollback)")
    p.add_argument("--windows", type=int, default=None, help="held-out windows per curve (default 128; tiny 2)")
    p.add_argument("--eval-batch", type=int, default=None, help="(default 16; tiny 2)")
    p.add_argument("--parallel", type=int, default=None, help="evaluation worker processes (default 8; tiny 2)")
    p.add_argument("--needle-lengths", default=None, help="(default 128,256,512; tiny 128,256)")
    p.add_argument("--needle-depths", default=None, help="(default 0.1,0.3,0.5,0.7,0.9; tiny 0.25,0.75)")
    p.add_argument("--needle-trials", type=int, default=None, help="(default 16; tiny 2)")
    p.add_argument("--render-s", type=float, default=15.0, help="seconds kept for writing the results")
    p.add_argument("--report-every", type=float, default=20.0, help="seconds between progress lines")
    p.add_argument("--render", default=None, help="only redo study.md and the plots from this results.json")
    a = p.parse_args(argv)
    t = a.tiny
    for k, big, small in (("minutes", 8.8, 3.0), ("train_share", 0.72, 0.6), ("min_steps", 50, 2),
                          ("max_steps", 5000, 6), ("probe_s", 150.0, 60.0), ("seeds", 2, 1), ("sweep_ilr", "", "0"),
                          ("sweep_b", "16,64", "16"), ("windows", 128, 2), ("eval_batch", 16, 2), ("parallel", 8, 2),
                          ("needle_lengths", "128,256,512", "128,256"),
                          ("needle_depths", "0.1,0.3,0.5,0.7,0.9", "0.25,0.75"), ("needle_trials", 16, 2),
                          ("spike_policies", "", "rollback")):
        if getattr(a, k) is None:
            setattr(a, k, small if t else big)
    a.work = a.work or "/tmp/ttt_study"
    a.data = a.data or str(Path(a.work) / "data_tiny" if t else REPO / "data" / "study")
    bad = [k for k in filter(None, a.kinds.split(",")) if k not in KINDS or not KINDS[k].per_seed]
    try:
        a.tto_grid = [float(x) for x in a.tto_grid.split(",") if x]
    except ValueError:
        p.error(f"--tto-grid must be comma-separated inner lrs, got {a.tto_grid!r}")
    if bad:
        p.error(f"--kinds: {bad} are not per-seed kinds ({', '.join(k for k, v in KINDS.items() if v.per_seed)})")
    if a.steps != "auto" and not a.steps.isdigit():
        p.error(f"--steps must be auto or a number of steps, got {a.steps!r}")
    return a


def main(argv=None) -> int:
    a = parse(argv)
    if a.render:
        results = json.loads(Path(a.render).read_text())
        Path(a.out).mkdir(parents=True, exist_ok=True)
        render(results, Path(a.out))
        print(f"wrote {Path(a.out) / 'study.md'} and the plots")
        return 0
    st = Study(a)
    st.say(f"study: {'tiny, ' if a.tiny else ''}{a.minutes:g} minutes, out {a.out}, work {a.work}, "
           f"{st.results['device']}, commit {st.results['commit']}")
    try:
        st.prepare_data()
        runs = Training(st).train(st.t0 + a.minutes * 60 * a.train_share)
        st.results["runs"] = runs
        st.save()
        Evaluation(st).evaluate(runs, st.end - a.render_s)
        render(st.results, st.out)
    except BaseException as e:
        import traceback

        st.say(f"stopped: {type(e).__name__}: {e}\n{traceback.format_exc()}")
        raise
    finally:
        st.stop_all()
        st.save()
        st.save_logs()
    st.say("summary: " + json.dumps({k: {c: d[c]["mean"] for c in d} for k, d in
                                     st.results["summary"]["comparisons"].items()}))
    st.say(f"done in {time.time() - st.t0:.0f}s: {st.out}")
    print((st.out / "study.md").read_text())
    return 0 if all(r["checkpoint"] for r in st.results["runs"] if r["evaluated"]) else 1


if __name__ == "__main__":
    sys.exit(main())
