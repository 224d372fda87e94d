"""The loss-vs-context study (docs/study.md), end to end in one command: fa, swa and e2e (seeds), a Hydra
multirun sweep of e2e over the inner lr and the mini-batch size (inner lr 0 is the ablation), all trained at
once as separate processes on one GPU; then the held-out loss by token position (eval.py) on held-out code and
on a prose corpus, the needle-in-a-haystack evaluation (ttt_e2e/eval/needle.py), and results.json, a table
(study.md) and plots written into --out.

    python benchmarks/study_data.py                           # once, here: data/study/ (carry it to the GPU)
    python benchmarks/study.py --out $OUT/study --minutes 8   # on one H100
    python benchmarks/study.py --tiny --out /tmp/study        # the whole pipeline on a CPU, tiny models
    python benchmarks/study.py --render results.json --out DIR   # redo the table and plots from results.json

Time: everything ends by --minutes after the start. With --steps auto (the default), every run is first started
for a short probe that measures its step time while all of them share the GPU (and fills Triton's cache); then
they restart from scratch with one common step count, the most that the slowest run (e2e) finishes by the
training deadline. A run still going at its deadline is killed and evaluated at its last checkpoint (its steps
are in the results). Progress is printed and results.json rewritten after each phase, so a killed call still
leaves what was done.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import signal
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from ttt_e2e.train.checkpoint import latest_checkpoint  # noqa: E402
METHODS = ("fa", "swa", "e2e")

# The tiny pipeline: model and run sizes that keep every code path but take seconds on a CPU.
TINY = {
    "common": ["model.vocab_size=512", "model.d_model=32", "model.n_heads=2", "model.n_layers=2", "model.suffix_len=1",
               "model.seq_length=256", "ttt.mini_batch_size=16", "training.global_batch_size=2",
               "training.micro_batch_size=1"],
    "fa": ["model.mlp_width=64"],
    "swa": ["model.mlp_width=64", "model.window=64"],
    "e2e": ["model.mlp_width=48", "model.prime_mlp_width=48", "model.window=64"],
}

# Issue 26's tiny e2e run (byte tokens from this Python's stdlib, d 256, 6 layers, 2 suffix blocks, T 8192, W 512,
# b 64: 128 inner steps per sequence, lr 2e-3, inner-lr warm-up over 30 steps, 120 steps), which stopped at a
# non-finite meta-gradient; here once per policy of --spike-policies.
SPIKE_CHECK = {
    "gpu": ["data.source=stdlib", "data.tokenizer=bytes", "model.vocab_size=258", "model.d_model=256",
            "model.n_heads=4", "model.n_layers=6", "model.suffix_len=2", "model.mlp_width=768",
            "model.prime_mlp_width=768", "model.seq_length=8192", "model.window=512", "ttt.mini_batch_size=64",
            "optim.lr=2e-3", "ttt.ilr_warmup_steps=30", "training.steps=120", "training.micro_batch_size=2",
            "training.checkpoint_every=0"],
    "tiny": ["data.source=stdlib", "data.tokenizer=bytes", "data.max_docs=20", "model.vocab_size=258",
             *TINY["common"], *TINY["e2e"], "training.steps=4", "training.checkpoint_every=0"],
}


@dataclass
class Run:
    name: str
    method: str  # fa | swa | e2e | sweep
    seed: int
    overrides: list[str]
    dir: Path
    proc: Optional[subprocess.Popen] = None
    started: float = 0.0
    first_step_at: Optional[float] = None
    returncode: Optional[int] = None
    killed: bool = False
    sweep: dict = field(default_factory=dict)  # inner_lr, mini_batch_size of a sweep job


class Study:
    def __init__(self, a):
        self.a = a
        self.t0 = time.time()
        self.end = self.t0 + a.minutes * 60
        self.out = Path(a.out)
        self.out.mkdir(parents=True, exist_ok=True)
        self.work = Path(a.work)
        for old in ("probe", "train", "eval", "needle"):  # run dirs of an earlier call would be resumed: start anew
            shutil.rmtree(self.work / old, ignore_errors=True)
        self.work.mkdir(parents=True, exist_ok=True)
        self.log_file = open(self.out / "progress.log", "a")
        self.procs: list[subprocess.Popen] = []  # every process started, stopped on the way out
        self.results: dict = {"args": vars(a), "started": time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime()),
                              "phases": {}}
        self.env = dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false",
                        PYTHONUNBUFFERED="1", PYTHONPATH=str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""))

    # -- bookkeeping ------------------------------------------------------------------------------------------

    def say(self, msg: str) -> None:
        line = f"[{time.time() - self.t0:6.1f}s] {msg}"
        print(line, flush=True)
        self.log_file.write(line + "\n")
        self.log_file.flush()

    def save(self) -> None:
        tmp = self.out / "results.json.tmp"
        tmp.write_text(json.dumps(self.results, indent=1, default=str))
        tmp.replace(self.out / "results.json")
        self.save_logs()

    def stop_all(self) -> None:
        for p in self.procs:
            if p.poll() is None:
                try:
                    os.killpg(p.pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
                p.wait()

    def save_logs(self) -> None:
        """The last lines of every subprocess's log, in one file (what to read when something failed there)."""
        parts = []
        for f in sorted(self.work.glob("*.log")):
            lines = f.read_text(errors="replace").splitlines()
            parts.append(f"==> {f.name} ({len(lines)} lines) <==\n" + "\n".join(lines[-40:]))
        (self.out / "logs.txt").write_text("\n\n".join(parts) + "\n")

    # -- data -------------------------------------------------------------------------------------------------

    def prepare_data(self) -> None:
        data = Path(self.a.data)
        if self.a.tiny and not (data / "manifest.json").exists():
            sys.path.insert(0, str(REPO / "benchmarks"))
            import study_data

            study_data.build(data, tiny=True, vocab_size=512, min_chars=4000, val_fraction=0.08, max_mib=0.5)
        if not (data / "manifest.json").exists():
            raise SystemExit(f"error: no study corpus at {data}: run python benchmarks/study_data.py --out {data}")
        self.data = data.resolve()
        self.cache = (self.work / "cache").resolve()
        manifest = json.loads((data / "manifest.json").read_text())
        self.results["data"] = {k: {kk: v for kk, v in m.items() if kk != "files"} if isinstance(m, dict) else m
                                for k, m in manifest.items()}
        # Tokenize every corpus once, here, so that the runs (all started at once) hit the cache.
        from ttt_e2e.config import DataConfig
        from ttt_e2e.data import build_tokenizer, token_stream

        tok = build_tokenizer(str(self.data / "tokenizer"))
        for corpus in ("code_train", "code_val", "docs_val"):
            n = len(token_stream(DataConfig(source=str(self.data / corpus), tokenizer=str(self.data / "tokenizer"),
                                            cache_dir=str(self.cache)), tok))
            self.say(f"data: {corpus} {n:,} tokens")

    def data_overrides(self) -> list[str]:
        return [f"data.source={self.data / 'code_train'}", f"data.tokenizer={self.data / 'tokenizer'}",
                f"data.cache_dir={self.cache}"]

    # -- training ---------------------------------------------------------------------------------------------

    def plan(self, phase: str) -> tuple[list[Run], list[str]]:
        """The single runs, and the sweep's multirun overrides."""
        runs = []
        for method in METHODS:
            for seed in range(self.a.seeds):
                name = f"{method}_s{seed}"
                extra = TINY["common"] + TINY[method] if self.a.tiny else []
                runs.append(Run(name, method, seed, [f"+experiment=study/{method}", f"training.seed={seed}",
                                                    f"data.seed={seed}", *extra],
                                self.work / phase / name))
        swept = {"ttt.inner_lr": self.a.sweep_ilr, "ttt.mini_batch_size": self.a.sweep_b}
        tiny = [o for o in TINY["common"] + TINY["e2e"] if o.split("=")[0] not in swept] if self.a.tiny else []
        return runs, ["+experiment=study/e2e", *(f"{k}={v}" for k, v in swept.items()), *tiny]

    def common(self, steps: int) -> list[str]:
        return [*self.data_overrides(), f"training.steps={steps}", f"ttt.ilr_warmup_steps={max(1, steps // 5)}",
                f"training.checkpoint_every={max(1, steps // 8)}", "training.keep_last=1", "training.progress=false",
                f"training.device={self.a.device}", "logger=none"]

    def start(self, phase: str, steps: int) -> list[Run]:
        runs, sweep = self.plan(phase)
        for r in runs:
            self._spawn(r, ["train.py", *r.overrides, *self.common(steps), f"hydra.run.dir={r.dir}"])
        n_jobs = len(self.a.sweep_ilr.split(",")) * len(self.a.sweep_b.split(","))
        sweep_dir = self.work / phase / "sweep"
        multirun = Run("sweep", "sweep", 0, sweep, sweep_dir)
        # the sweep comes last on the command line: its overrides win over the common ones where both set a key
        self._spawn(multirun, ["train.py", "-m", "launcher=joblib", f"hydra.launcher.n_jobs={n_jobs}",
                               *self.common(steps), f"hydra.sweep.dir={sweep_dir}", *sweep])
        self.multirun = multirun
        for policy in filter(None, self.a.spike_policies.split(",")):
            # issue 26's run that stopped at a non-finite meta-gradient (128 inner steps per sequence), once per
            # spike policy: which of them trains to its end, and to what loss. Its own fixed steps; not evaluated.
            check = Run(f"spikecheck_{policy}", "spikecheck", 0, [], self.work / phase / f"spikecheck_{policy}")
            args = ["+experiment=study/e2e", *self.common(steps), *SPIKE_CHECK["tiny" if self.a.tiny else "gpu"],
                    f"optim.spike_policy={policy}", f"data.cache_dir={self.cache}", f"hydra.run.dir={check.dir}"]
            self._spawn(check, ["train.py", *args])
            runs.append(check)
        jobs = [Run(f"sweep_{i}", "sweep", 0, [], sweep_dir / str(i)) for i in range(n_jobs)]
        for j in jobs:
            j.started = multirun.started
        self.say(f"{phase}: started {len(runs)} runs and a {n_jobs}-job Hydra multirun sweep ({steps} steps each)")
        return runs + jobs

    def _spawn(self, r: Run, args: list[str]) -> None:
        # one value per key, the last one given (Hydra refuses a key overridden twice)
        flags, kv = [a for a in args if "=" not in a or a.startswith("-")], {}
        for a in args:
            if "=" in a and not a.startswith("-"):
                kv.pop(a.split("=")[0], None)
                kv[a.split("=")[0]] = a
        args = flags + list(kv.values())
        r.dir.parent.mkdir(parents=True, exist_ok=True)
        logf = open(self.work / f"{r.dir.parent.name}_{r.name}.log", "w")
        r.proc = subprocess.Popen([sys.executable, *args], cwd=REPO, env=self.env, stdout=logf,
                                  stderr=subprocess.STDOUT, start_new_session=True)
        self.procs.append(r.proc)
        r.started = time.time()

    @staticmethod
    def records(r: Run) -> list[dict]:
        f = r.dir / "metrics.jsonl"
        if not f.exists():
            return []
        out = []
        for line in f.read_text().splitlines():
            try:
                rec = json.loads(line)
            except ValueError:  # a line being written
                continue
            if "step_time_s" in rec:
                out.append(rec)
        return out

    def alive(self, r: Run) -> bool:
        proc = self.multirun.proc if r.method == "sweep" else r.proc
        return proc is not None and proc.poll() is None

    def poll(self, runs: list[Run]) -> None:
        for r in runs:
            recs = self.records(r)
            if recs and r.first_step_at is None:
                r.first_step_at = time.time()
            if r.method != "sweep" and r.proc is not None and r.returncode is None and r.proc.poll() is not None:
                r.returncode = r.proc.returncode
                if r.returncode != 0 and not r.killed:
                    self.say(f"{r.name} exited with status {r.returncode}: {self.tail(r)}")

    def tail(self, r: Run, n: int = 3) -> str:
        name = self.multirun.name if r.method == "sweep" else r.name
        f = self.work / f"{r.dir.parent.name if r.method != 'sweep' else r.dir.parent.parent.name}_{name}.log"
        lines = f.read_text(errors="replace").strip().splitlines() if f.exists() else []
        return " | ".join(lines[-n:])

    def kill(self, runs: list[Run]) -> None:
        procs = {id(p): p for p in [r.proc for r in runs] + [self.multirun.proc] if p is not None}
        for p in procs.values():
            if p.poll() is None:
                try:
                    os.killpg(p.pid, signal.SIGTERM)
                except ProcessLookupError:
                    pass
        deadline = time.time() + 10
        for p in procs.values():
            try:
                p.wait(max(0.1, deadline - time.time()))
            except subprocess.TimeoutExpired:
                os.killpg(p.pid, signal.SIGKILL)
                p.wait()
        for r in runs:
            r.killed = True

    def probe(self) -> int:
        """Start everything, measure each run's step time while all share the device, stop, choose the steps."""
        runs = self.start("probe", 100_000)
        until = time.time() + min(self.a.probe_s, max(30.0, 0.35 * (self.train_deadline - time.time())))
        while time.time() < until:
            time.sleep(1.0)
            self.poll(runs)
            # the sweep's jobs start later (Hydra, then joblib's workers): they contend meanwhile, but the probe
            # waits only for the single runs, whose e2e has the sweep jobs' step time (or more, at b = 64)
            if all(len(self.records(r)) >= self.a.probe_steps for r in runs if r.method in METHODS):
                break
            if not any(self.alive(r) for r in runs):
                break
        self.kill(runs)
        step_times, startup = {}, []
        for r in runs:
            recs = self.records(r)
            if not recs:
                if r.method in METHODS:
                    self.say(f"probe: {r.name} logged no step: {self.tail(r)}")
                continue
            if len(recs) < 2:  # the first step compiles and captures: alone it says nothing of the step time
                continue
            step_times[r.name] = statistics.median(x["step_time_s"] for x in recs[1:])
            startup.append((r.first_step_at or time.time()) - r.started)
        if not step_times:
            raise SystemExit("error: no run made a step in the probe (see the run logs in results.json)")
        unmeasured = [r.name for r in runs if r.method in METHODS and r.name not in step_times]
        # the single runs set the pace (the sweep's jobs have e2e's step time; the check has its own steps): on the
        # first H100 call a sweep job's one compile-bound step was taken for its step time (docs/study.md)
        slowest = max((step_times[r.name] for r in runs if r.method in METHODS and r.name in step_times), default=0)
        budget = self.train_deadline - time.time() - max(startup)
        steps = int(0.9 * budget / slowest) if slowest else self.a.min_steps
        self.results["phases"]["probe"] = {"step_time_s": step_times, "startup_s": max(startup), "budget_s": budget,
                                           "steps_fit": steps}
        self.say(f"probe: step times (s, all sharing the device) " +
                 ", ".join(f"{k} {v:.3f}" for k, v in step_times.items()) +
                 f"; startup {max(startup):.0f}s; {steps} steps fit in {budget:.0f}s")
        if unmeasured:
            self.say(f"probe: no step time for {unmeasured}: falling back to --min-steps {self.a.min_steps}")
            return self.a.min_steps
        return max(self.a.min_steps, min(self.a.max_steps, steps))

    def train(self) -> list[Run]:
        self.train_deadline = self.t0 + self.a.minutes * 60 * self.a.train_share
        steps = self.probe() if self.a.steps == "auto" else int(self.a.steps)
        self.results["steps"] = steps
        self.save()
        runs = self.start("train", steps)
        last_report = 0.0
        while any(self.alive(r) for r in runs) and time.time() < self.train_deadline:
            time.sleep(1.0)
            self.poll(runs)
            if time.time() - last_report >= self.a.report_every:
                last_report = time.time()
                self.say("train: " + ", ".join(f"{r.name} {self._progress(r, steps)}" for r in runs))
                self.results["runs"] = [self.run_summary(r) for r in runs]
                self.save()
        if any(self.alive(r) for r in runs):
            self.say("train: deadline reached; stopping the runs still going (their last checkpoint is evaluated)")
            self.kill([r for r in runs if self.alive(r)])
        self.poll(runs)
        if self.multirun.proc is not None:
            self.multirun.returncode = self.multirun.proc.wait()
        for r in runs:
            if r.method == "sweep":
                r.returncode = self.multirun.returncode
                c = self.config(r)
                if c is not None:
                    r.sweep = {"inner_lr": float(c.ttt.inner_lr), "mini_batch_size": int(c.ttt.mini_batch_size)}
                    r.name = f"e2e_ilr{r.sweep['inner_lr']:g}_b{r.sweep['mini_batch_size']}"
        self.results["runs"] = [self.run_summary(r) for r in runs]
        self.say("train: done: " + ", ".join(f"{r.name} {self._progress(r, steps)}" for r in runs))
        self.save()
        return runs

    @staticmethod
    def config(r: Run):
        from omegaconf import OmegaConf

        return OmegaConf.load(r.dir / "config.yaml") if (r.dir / "config.yaml").exists() else None

    def _progress(self, r: Run, steps: int) -> str:
        recs = self.records(r)
        if not recs:
            return "-"
        last = recs[-1]
        return f"{last['step']}/{steps} loss {last['loss']:.3f}"

    def run_summary(self, r: Run) -> dict:
        recs = self.records(r)
        timed = [x for x in recs[1:]] or recs
        ckpt = latest_checkpoint(r.dir / "checkpoints") if (r.dir / "checkpoints").is_dir() else None
        c = self.config(r)
        setting = {} if c is None else {"inner_lr": float(c.ttt.inner_lr), "mini_batch_size": int(c.ttt.mini_batch_size),
                                        "window": c.model.window, "seq_length": int(c.model.seq_length)}
        return {"name": r.name, "method": r.method if r.method != "sweep" else "e2e", "seed": r.seed, **setting,
                "sweep": r.sweep or None, "dir": str(r.dir), "steps": recs[-1]["step"] if recs else 0,
                "checkpoint": str(ckpt) if ckpt else None, "returncode": r.returncode, "killed": r.killed,
                "tokens_per_s": statistics.median(x["tokens_per_s"] for x in timed) if timed else None,
                "step_time_s": statistics.median(x["step_time_s"] for x in timed) if timed else None,
                "train_loss_first": recs[0]["loss"] if recs else None,
                "train_loss_last": statistics.mean(x["loss"] for x in recs[-5:]) if recs else None,
                "skipped_steps": recs[-1].get("skipped_steps", 0) if recs else 0,
                "rollbacks": recs[-1].get("rollbacks", 0) if recs else 0,
                "inner_lr_last": recs[-1].get("ilr") if recs else None,  # after the warm-up and any back-off
                "loss_by_step": [x["loss"] for x in recs] if r.method == "spikecheck" else None,
                "grad_norm_by_step": [x["grad_norm"] for x in recs] if r.method == "spikecheck" else None,
                "grad_norm_max": max((x["grad_norm"] for x in recs if isinstance(x["grad_norm"], float)),
                                     default=None),
                "grad_norm_over_100": sum(1 for x in recs if not isinstance(x["grad_norm"], float)
                                          or x["grad_norm"] > 100),
                "wall_s": (time.time() - r.started) if r.started else None,
                "log_tail": self.tail(r, 5) if (r.returncode not in (0, None) and not r.killed) else None}

    # -- evaluation -------------------------------------------------------------------------------------------

    def run_jobs(self, jobs: list[tuple[str, list[str]]], deadline: float, what: str) -> dict[str, int]:
        """Run (name, args) jobs, at most --parallel at a time, killing what is left at the deadline."""
        pending, running, status = list(jobs), {}, {}
        while (pending or running) and time.time() < deadline:
            while pending and len(running) < self.a.parallel:
                name, args = pending.pop(0)
                logf = open(self.work / f"{name}.log", "w")
                running[name] = subprocess.Popen([sys.executable, *args], cwd=REPO, env=self.env, stdout=logf,
                                                 stderr=subprocess.STDOUT, start_new_session=True)
                self.procs.append(running[name])
            time.sleep(0.5)
            for name, p in list(running.items()):
                if p.poll() is not None:
                    status[name] = p.returncode
                    del running[name]
                    log = (self.work / f"{name}.log").read_text(errors="replace").strip().splitlines()
                    self.say(f"{what}: {name} {'done' if p.returncode == 0 else f'failed ({p.returncode})'}"
                             f"{'' if p.returncode == 0 else ': ' + ' | '.join(log[-3:])}")
        for name, p in running.items():
            os.killpg(p.pid, signal.SIGKILL)
            p.wait()
            status[name] = "killed at the deadline"
            self.say(f"{what}: {name} killed at the deadline")
        for name, _ in pending:
            status[name] = "not started before the deadline"
        return status

    def evaluate(self, runs: list[dict]) -> None:
        done = [r for r in runs if r["checkpoint"] and r["method"] in METHODS]
        a = self.a
        # the main runs' chunks first, then the sweep's; within each, code_val curves, docs_val curves, needle:
        # what the study needs most is done first if the deadline comes
        main = [r for r in done if not r["sweep"]]
        sweep = [r for r in done if r["sweep"]]
        chunks = [part[i:i + a.eval_chunk] for part in (main, sweep) for i in range(0, len(part), a.eval_chunk)]
        jobs = []
        for k, chunk in enumerate(chunks):
            for corpus in ("code_val", "docs_val"):
                jobs.append((f"eval_{corpus}_{k}", [
                    "eval.py", *[f"checkpoint={r['checkpoint']}" for r in chunk], *[f"label={r['name']}" for r in chunk],
                    f"out={self.work / 'eval' / f'{corpus}_{k}'}", f"windows={a.windows}", f"batch_size={a.eval_batch}",
                    f"device={a.device}", f"data.source={self.data / corpus}", "data.val_fraction=0.99",
                    f"data.cache_dir={self.cache}"]))
            jobs.append((f"needle_{k}", [
                "-m", "ttt_e2e.eval.needle", *[f"checkpoint={r['checkpoint']}" for r in chunk],
                *[f"label={r['name']}" for r in chunk], f"haystack={self.data / 'code_val'}",
                f"lengths={a.needle_lengths}", f"depths={a.needle_depths}", f"trials={a.needle_trials}",
                f"batch_size={a.eval_batch}", f"device={a.device}", f"out={self.work / 'needle' / f'{k}.json'}",
                f"data.cache_dir={self.cache}"]))
        n_main = sum(1 for c in chunks if not c[0]["sweep"])
        jobs.sort(key=lambda j: (int(j[0].rsplit("_", 1)[1]) >= n_main, ("code_val" not in j[0]) + (j[0][:6] == "needle")))
        self.say(f"eval: {len(jobs)} jobs (loss by position on code_val and docs_val with eval.py, needle), "
                 f"{a.parallel} at a time, {len(done)} checkpoints")
        status = self.run_jobs(jobs, self.end - a.render_s, "eval")
        self.results["eval_jobs"] = status
        curves, needles = {}, {}
        for corpus in ("code_val", "docs_val"):
            for f in sorted((self.work / "eval").glob(f"{corpus}_*/eval.json")):
                for c in json.loads(f.read_text())["checkpoints"]:
                    curves.setdefault(c["label"], {})[corpus] = {
                        "loss": c["loss"], "tokens": c["tokens"], "windows": c["windows"], "step": c["step"],
                        "loss_by_position": c["loss_by_position"]}
        for f in sorted((self.work / "needle").glob("*.json")):
            for c in json.loads(f.read_text())["checkpoints"]:
                needles[c["label"]] = c
        for r in runs:
            if r["method"] in METHODS:
                r["eval"] = curves.get(r["name"], {})
                r["needle"] = needles.get(r["name"])
        self.results["runs"] = runs
        self.save()


# -- summaries, table and plots (also: --render results.json) --------------------------------------------------

def quarter_means(curve: list) -> list[Optional[float]]:
    n = len(curve)
    out = []
    for q in range(4):
        vals = [v for v in curve[q * n // 4:(q + 1) * n // 4] if v is not None]
        out.append(sum(vals) / len(vals) if vals else None)
    return out


def summarize(results: dict) -> dict:
    runs = results.get("runs", [])
    for r in runs:
        for c in r.get("eval", {}).values():
            c["quarters"] = quarter_means(c["loss_by_position"])
    main = [r for r in runs if not r.get("sweep")]
    summary: dict = {"methods": {}, "e2e_minus_swa_last_quarter": {}, "sweep": []}
    for m in METHODS:
        rs = [r for r in main if r["method"] == m]
        entry = {"seeds": len(rs), "steps": [r["steps"] for r in rs],
                 "tokens_per_s": [r["tokens_per_s"] for r in rs], "skipped_steps": [r["skipped_steps"] for r in rs]}
        for corpus in ("code_val", "docs_val"):
            last = [r["eval"][corpus]["quarters"][3] for r in rs if corpus in r.get("eval", {})]
            mean = [r["eval"][corpus]["loss"] for r in rs if corpus in r.get("eval", {})]
            entry[corpus] = {"loss": mean, "last_quarter": last}
        summary["methods"][m] = entry
    for corpus in ("code_val", "docs_val"):
        diffs = []
        for seed in sorted({r["seed"] for r in main}):
            pair = {r["method"]: r for r in main if r["seed"] == seed}
            if all(m in pair and corpus in pair[m].get("eval", {}) for m in ("e2e", "swa")):
                diffs.append(pair["e2e"]["eval"][corpus]["quarters"][3] - pair["swa"]["eval"][corpus]["quarters"][3])
        summary["e2e_minus_swa_last_quarter"][corpus] = {
            "by_seed": diffs, "mean": statistics.mean(diffs) if diffs else None,
            "spread": (max(diffs) - min(diffs)) if len(diffs) > 1 else None}
    for r in runs:
        if r["method"] == "e2e":
            summary["sweep"].append({"name": r["name"], "inner_lr": r.get("inner_lr"),
                                     "mini_batch_size": r.get("mini_batch_size"), "steps": r["steps"],
                                     "skipped_steps": r["skipped_steps"], "rollbacks": r.get("rollbacks", 0),
                                     "inner_lr_last": r.get("inner_lr_last"),
                                     **{f"{c}_last_quarter": r["eval"][c]["quarters"][3]
                                        for c in ("code_val", "docs_val") if c in r.get("eval", {})}})
    summary["spike_check"] = [{k: r.get(k) for k in ("name", "steps", "returncode", "killed", "skipped_steps",
                                                      "rollbacks", "inner_lr_last", "grad_norm_max",
                                                      "grad_norm_over_100", "train_loss_first", "train_loss_last",
                                                      "log_tail")} for r in runs if r["method"] == "spikecheck"]
    return summary


def _fmt(xs, nd=3) -> str:
    xs = [x for x in (xs if isinstance(xs, list) else [xs]) if x is not None]
    return " / ".join(f"{x:.{nd}f}" if isinstance(x, float) else str(x) for x in xs) if xs else "n/a"


def _table(header: list[str], rows: list[list]) -> list[str]:
    return (["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
            + ["| " + " | ".join(str(x) for x in row) + " |" for row in rows])


def render(results: dict, out: Path) -> None:
    s = results["summary"] = summarize(results)
    lines = [f"# Loss-vs-context study: results ({results.get('started', '')})", "",
             f"Steps per run: {results.get('steps')}. Values per seed, separated by '/'. Loss in nats per token.", "",
             "| method | steps | tokens/s (all runs sharing the device) | skipped steps | code_val loss | code_val "
             "last quarter | docs_val loss | docs_val last quarter |", "|---|---|---|---|---|---|---|---|"]
    for m, e in s["methods"].items():
        lines.append(f"| {m} | {_fmt(e['steps'])} | {_fmt(e['tokens_per_s'], 0)} | {_fmt(e['skipped_steps'])} | "
                     f"{_fmt(e['code_val']['loss'])} | {_fmt(e['code_val']['last_quarter'])} | "
                     f"{_fmt(e['docs_val']['loss'])} | {_fmt(e['docs_val']['last_quarter'])} |")
    lines += ["", "e2e - swa over the last quarter of the context (per seed pair; spread = max - min):", ""]
    for corpus, d in s["e2e_minus_swa_last_quarter"].items():
        lines.append(f"- {corpus}: {_fmt(d['by_seed'], 4)} (mean {_fmt(d['mean'], 4)}, spread {_fmt(d['spread'], 4)})")
    lines += ["", "Sweep (Hydra multirun; inner lr 0 is the ablation) and the main e2e runs (inner lr 1):", ""]
    lines += _table(["run", "inner lr", "b", "steps", "skipped", "rollbacks", "inner lr at the end",
                     "code_val last quarter", "docs_val last quarter"],
                    [[j["name"], _fmt(j["inner_lr"]), _fmt(j["mini_batch_size"]), j["steps"], j["skipped_steps"],
                      j.get("rollbacks", 0), _fmt(j.get("inner_lr_last")), _fmt(j.get("code_val_last_quarter")),
                      _fmt(j.get("docs_val_last_quarter"))] for j in s["sweep"]])
    if s["spike_check"]:
        lines += ["", "Spike check (issue 26's 128-inner-step run), one run per optim.spike_policy:", ""]
        lines += _table(["run", "steps", "exit", "skipped", "rollbacks", "inner lr at the end",
                         "norm > 100 or non-finite", "max finite norm", "train loss first -> last 5"],
                        [[c["name"], c["steps"], f"{c['returncode']}{' (killed)' if c['killed'] else ''}",
                          c["skipped_steps"], c.get("rollbacks", 0), _fmt(c.get("inner_lr_last")),
                          c["grad_norm_over_100"], _fmt(c["grad_norm_max"], 1),
                          f"{_fmt(c['train_loss_first'])} -> {_fmt(c['train_loss_last'])}"] for c in s["spike_check"]])
    needle_runs = [r for r in results.get("runs", []) if r.get("needle")]
    if needle_runs:
        n0 = needle_runs[0]["needle"]
        lines += ["", f"Needle in a haystack (code_val haystack, {n0['trials']} trials per cell): answer loss "
                      f"(nats/token, mean over depths {n0['depths']}) / hit rate, and the no-needle control:", "",
                  "| run | " + " | ".join(f"length {n}" for n in n0["lengths"]) + " | control |",
                  "|---|" + "---|" * (len(n0["lengths"]) + 1)]
        for r in needle_runs:
            n = r["needle"]
            cells = [f"{statistics.mean(lo):.2f} / {statistics.mean(h):.2f}"
                     for lo, h in zip(n["answer_loss"], n["hit_rate"])]
            lines.append(f"| {r['name']} | " + " | ".join(cells) + f" | {_fmt(n['control_loss'], 2)} |")
    (out / "study.md").write_text("\n".join(lines) + "\n")
    _plots(results, out)


def _plots(results: dict, out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from ttt_e2e.eval.context_curve import binned

    runs = [r for r in results.get("runs", []) if r.get("eval")]
    colors = {"fa": "black", "swa": "tab:blue", "e2e": "tab:red"}
    fig, axes = plt.subplots(2, 2, figsize=(12, 8), sharex="col")
    for col, corpus in enumerate(("code_val", "docs_val")):
        fa = [r["eval"][corpus]["loss_by_position"] for r in runs
              if r["method"] == "fa" and not r.get("sweep") and corpus in r["eval"]]
        ref = None
        if fa:
            ref = [statistics.mean(v) if all(x is not None for x in v) else None for v in zip(*fa)]
        for r in runs:
            if corpus not in r["eval"]:
                continue
            curve = r["eval"][corpus]["loss_by_position"]
            sweep = r.get("sweep")
            style = dict(color=colors[r["method"]] if not sweep else None, lw=1.5 if not sweep else 0.8,
                         ls="-" if not sweep else ":", label=r["name"])
            xs, ys = binned(curve, 32)
            axes[0, col].plot(xs, ys, **style)
            if ref is not None:
                diff = [None if a is None or b is None else a - b for a, b in zip(curve, ref)]
                xs, ys = binned(diff, 32)
                axes[1, col].plot(xs, ys, **style)
        axes[0, col].set_title(f"held-out {corpus}: loss by position")
        axes[1, col].set_title(f"{corpus}: loss minus full attention's (mean over fa seeds)")
        axes[1, col].axhline(0, color="black", lw=0.8)
        axes[1, col].set_xlabel("token position in the context")
        for ax in axes[:, col]:
            ax.grid(alpha=0.3)
    axes[0, 0].set_ylabel("loss (nats/token, binned)")
    axes[1, 0].set_ylabel("loss - fa loss")
    axes[0, 1].legend(fontsize=7, ncol=2)
    fig.tight_layout()
    fig.savefig(out / "loss_by_position.png", dpi=110)
    plt.close(fig)
    needle_runs = [r for r in results.get("runs", []) if r.get("needle") and not r.get("sweep")]
    if needle_runs:
        n0 = needle_runs[0]["needle"]
        fig, axes = plt.subplots(1, len(n0["lengths"]), figsize=(4 * len(n0["lengths"]), 3.5), sharey=True,
                                 squeeze=False)
        for i, length in enumerate(n0["lengths"]):
            ax = axes[0, i]
            for r in needle_runs:
                ax.plot(r["needle"]["depths"], r["needle"]["answer_loss"][i], marker="o", color=colors[r["method"]],
                        label=r["name"])
                ax.axhline(r["needle"]["control_loss"][i], color=colors[r["method"]], ls=":", lw=0.8)
            ax.set_title(f"needle, context {length}")
            ax.set_xlabel("depth of the needle")
            ax.grid(alpha=0.3)
        axes[0, 0].set_ylabel("answer loss (nats/token); dotted: no needle")
        axes[0, -1].legend(fontsize=7)
        fig.tight_layout()
        fig.savefig(out / "needle.png", dpi=110)
        plt.close(fig)
    checks = [r for r in results.get("runs", []) if r["method"] == "spikecheck" and r.get("loss_by_step")]
    if checks:
        fig, axes = plt.subplots(1, 2, figsize=(12, 3.8))
        for r in checks:
            steps = range(1, len(r["loss_by_step"]) + 1)
            axes[0].plot(steps, r["loss_by_step"], label=r["name"])
            norms = [x if isinstance(x, float) and math.isfinite(x) else float("nan") for x in r["grad_norm_by_step"]]
            axes[1].semilogy(steps, norms, label=r["name"])
        axes[0].set_title("spike check: training loss by step")
        axes[1].set_title("spike check: outer gradient norm (before the clip)")
        for ax in axes:
            ax.set_xlabel("step")
            ax.grid(alpha=0.3)
        axes[0].legend(fontsize=8)
        fig.tight_layout()
        fig.savefig(out / "spike_check.png", dpi=110)
        plt.close(fig)


def parse(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", default="study_out", help="results.json, study.md, plots, progress.log")
    p.add_argument("--work", default=None, help="run dirs, checkpoints, token cache (default: /tmp/ttt_study)")
    p.add_argument("--data", default=None, help="benchmarks/study_data.py's folder (default data/study; tiny: "
                                                "built under --work if missing)")
    p.add_argument("--tiny", action="store_true", help="tiny models on the CPU (builds a tiny corpus if missing)")
    p.add_argument("--minutes", type=float, default=None, help="wall time for everything (default 8; tiny 2)")
    p.add_argument("--train-share", type=float, default=0.7, help="share of --minutes that training may use")
    p.add_argument("--steps", default="auto", help="steps per run, or auto: probe, then what fits")
    p.add_argument("--min-steps", type=int, default=None)
    p.add_argument("--max-steps", type=int, default=None)
    p.add_argument("--probe-steps", type=int, default=4, help="steps each run logs in the probe")
    p.add_argument("--probe-s", type=float, default=None, help="longest probe (default 150 s; tiny 40 s)")
    p.add_argument("--seeds", type=int, default=None, help="seeds of fa, swa and e2e each (default 2; tiny 1)")
    p.add_argument("--sweep-ilr", default="0,3", help="the sweep's ttt.inner_lr values (0: the ablation)")
    p.add_argument("--sweep-b", default=None, help="the sweep's ttt.mini_batch_size values (default 64,128)")
    p.add_argument("--device", default="auto")
    p.add_argument("--spike-policies", default=None, help="issue 26's 128-inner-step run, once per "
                   "optim.spike_policy listed ('' leaves it out; default rollback,stop; tiny rollback)")
    p.add_argument("--windows", type=int, default=None, help="held-out windows per curve (default 48; tiny 2)")
    p.add_argument("--eval-batch", type=int, default=None, help="(default 8; tiny 2)")
    p.add_argument("--eval-chunk", type=int, default=None, help="checkpoints per eval.py process (default 2; tiny 5)")
    p.add_argument("--parallel", type=int, default=None, help="eval processes at once (default 8; tiny 2)")
    p.add_argument("--needle-lengths", default=None, help="(default 1024,2048,4096; tiny 128,256)")
    p.add_argument("--needle-depths", default="0.1,0.3,0.5,0.7,0.9")
    p.add_argument("--needle-trials", type=int, default=None, help="(default 8; tiny 2)")
    p.add_argument("--render-s", type=float, default=20.0, help="seconds kept for writing the results")
    p.add_argument("--report-every", type=float, default=20.0, help="seconds between progress lines")
    p.add_argument("--render", default=None, help="only redo study.md and the plots from this results.json")
    a = p.parse_args(argv)
    t = a.tiny
    for k, big, small in (("minutes", 8.0, 2.5), ("min_steps", 50, 2), ("max_steps", 5000, 6), ("probe_s", 150.0, 60.0),
                          ("seeds", 2, 1), ("sweep_b", "64,128", "16"), ("windows", 48, 2), ("eval_batch", 8, 2),
                          ("parallel", 8, 3), ("eval_chunk", 2, 5), ("needle_lengths", "1024,2048,4096", "128,256"),
                          ("needle_trials", 8, 2), ("spike_policies", "rollback,stop", "rollback")):
        if getattr(a, k) is None:
            setattr(a, k, small if t else big)
    if t and a.sweep_ilr == "0,3":
        a.sweep_ilr = "0,1"
    if t and a.needle_depths == "0.1,0.3,0.5,0.7,0.9":
        a.needle_depths = "0.25,0.75"
    a.work = a.work or "/tmp/ttt_study"
    a.data = a.data or str(Path(a.work) / "data_tiny" if t else REPO / "data" / "study")
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
    st.say(f"study: {'tiny, ' if a.tiny else ''}{a.minutes:g} minutes, out {a.out}, work {a.work}")
    try:
        st.prepare_data()
        st.train()
        st.evaluate(st.results["runs"])
        render(st.results, st.out)
    except BaseException as e:
        import traceback

        st.say(f"stopped: {type(e).__name__}: {e}\n{traceback.format_exc()}")
        raise
    finally:
        st.stop_all()
        st.save()
    st.say("summary: " + json.dumps(st.results["summary"]["e2e_minus_swa_last_quarter"]))
    st.say(f"done in {time.time() - st.t0:.0f}s: {st.out / 'results.json'}, study.md, loss_by_position.png, "
           f"needle.png")
    print((st.out / "study.md").read_text())
    return 0 if all(r["checkpoint"] for r in st.results["runs"]) else 1


if __name__ == "__main__":
    sys.exit(main())
