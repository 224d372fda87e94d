"""The study's training phase: one job type (Job) with a kind, all jobs started at once as train.py processes
on one device; the Hydra multirun sweep's jobs are Jobs of kind sweep that share their launcher's process.

With --steps auto every job is first started for a short probe that measures its step time while all share the
device (and fills Triton's cache); then all restart from scratch with one common step count, the most that the
slowest job finishes by the training deadline. A job still going at its deadline is stopped and evaluated at
its last checkpoint (its steps are in the results).
"""
from __future__ import annotations

import json
import os
import signal
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

REPO = Path(__file__).resolve().parents[2]


@dataclass(frozen=True)
class Kind:
    experiment: str  # conf/experiment/study/<experiment>.yaml
    evaluated: bool = True  # loss by position and the needle
    per_seed: bool = True  # one job per seed, in the main comparison
    test_time_grid: bool = False  # also evaluated with the inner loop on, at each inner lr of the grid


KINDS = {
    "fa": Kind("fa"),
    "swa": Kind("swa"),
    "e2e": Kind("e2e"),
    "tto": Kind("tto", test_time_grid=True),  # the e2e architecture trained without the inner loop
    "sweep": Kind("e2e", per_seed=False),  # the Hydra multirun's jobs, named by their swept values
    "spikecheck": Kind("e2e", evaluated=False, per_seed=False),  # issue 26's run, once per spike policy
}
MAIN = tuple(k for k, v in KINDS.items() if v.per_seed)

# The tiny pipeline: model and run sizes that keep every code path but take seconds on a CPU.
TINY = {
    "common": ["model.vocab_size=512", "model.d_model=32", "model.n_heads=2", "model.n_layers=2", "model.suffix_len=1",
               "model.seq_length=256", "ttt.mini_batch_size=16", "training.global_batch_size=2",
               "training.micro_batch_size=1"],
    "fa": ["model.mlp_width=64"],
    "swa": ["model.mlp_width=64", "model.window=32"],
    "e2e": ["model.mlp_width=48", "model.prime_mlp_width=48", "model.window=32"],
    "tto": ["model.mlp_width=48", "model.prime_mlp_width=48", "model.window=32"],
}

# Issue 26's tiny e2e run (byte tokens from this Python's stdlib, d 256, 6 layers, 2 suffix blocks, T 8192, W 512,
# b 64: 128 inner steps per sequence, lr 2e-3, inner-lr warm-up over 30 steps, 120 steps), which stopped at a
# non-finite meta-gradient; here once per policy of --spike-policies.
SPIKE_CHECK = {
    "gpu": ["data.source=stdlib", "data.tokenizer=bytes", "model.vocab_size=258", "model.d_model=256",
            "model.n_heads=4", "model.n_layers=6", "model.suffix_len=2", "model.mlp_width=768",
            "model.prime_mlp_width=768", "model.seq_length=8192", "model.window=512", "ttt.mini_batch_size=64",
            "optim.lr=2e-3", "ttt.ilr_warmup_steps=30", "training.steps=120", "training.micro_batch_size=2",
            "training.global_batch_size=8", "training.checkpoint_every=0"],
    "tiny": ["data.source=stdlib", "data.tokenizer=bytes", "data.max_docs=20", "model.vocab_size=258",
             *TINY["common"], *TINY["e2e"], "training.steps=4", "training.checkpoint_every=0"],
}


@dataclass
class Job:
    name: str
    kind: str
    seed: int
    dir: Path
    args: list[str] = field(default_factory=list)  # train.py's arguments (a sweep job's are its launcher's)
    proc: Optional[subprocess.Popen] = None  # a sweep job's is the multirun's
    started: float = 0.0
    first_step_at: Optional[float] = None
    returncode: Optional[int] = None
    killed: bool = False
    swept: dict = field(default_factory=dict)  # a sweep job's inner_lr and mini_batch_size

    @property
    def spec(self) -> Kind:
        return KINDS[self.kind]

    def records(self) -> list[dict]:
        """The step records of its metrics.jsonl (a line being written is skipped)."""
        f = self.dir / "metrics.jsonl"
        out = []
        for line in (f.read_text().splitlines() if f.exists() else []):
            try:
                rec = json.loads(line)
            except ValueError:
                continue
            if "step_time_s" in rec:
                out.append(rec)
        return out

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def config(self):
        from omegaconf import OmegaConf

        return OmegaConf.load(self.dir / "config.yaml") if (self.dir / "config.yaml").exists() else None


def unique_overrides(args: list[str]) -> list[str]:
    """One value per key, the last one given (Hydra refuses a key overridden twice); flags first."""
    flags, kv = [a for a in args if "=" not in a or a.startswith("-")], {}
    for a in args:
        if "=" in a and not a.startswith("-"):
            kv.pop(a.split("=")[0], None)
            kv[a.split("=")[0]] = a
    return flags + list(kv.values())


class Training:
    """Plans, starts, watches and stops the jobs of one study call (`study` gives the arguments, the work folder,
    the data overrides, progress lines and results.json)."""

    def __init__(self, study):
        self.st = study
        self.a = study.a

    def common(self, steps: int) -> list[str]:
        # every checkpoint kept (ten per run): the evaluation takes each job at the same step (common_step)
        return [*self.st.data_overrides(), f"training.steps={steps}", f"ttt.ilr_warmup_steps={max(1, steps // 5)}",
                f"training.checkpoint_every={max(1, steps // 10)}", "training.keep_last=100",
                "training.progress=false", f"training.device={self.a.device}", "logger=none"]

    def plan(self, phase: str, steps: int) -> tuple[list[Job], Optional[Job], list[Job]]:
        """(the single jobs, the sweep's launcher (None without a sweep), the sweep's jobs)."""
        a, root = self.a, self.st.work / phase
        jobs = []
        for kind in filter(None, a.kinds.split(",")):
            for seed in range(a.seeds):
                tiny = TINY["common"] + TINY[kind] if a.tiny else []
                job = Job(f"{kind}_s{seed}", kind, seed, root / f"{kind}_s{seed}")
                job.args = ["train.py", f"+experiment=study/{KINDS[kind].experiment}", *self.common(steps),
                            f"training.seed={seed}", f"data.seed={seed}", *tiny, f"hydra.run.dir={job.dir}"]
                jobs.append(job)
        for policy in filter(None, a.spike_policies.split(",")):
            # its own fixed steps and sizes: only which policy trains to its end, and to what loss
            job = Job(f"spikecheck_{policy}", "spikecheck", 0, root / f"spikecheck_{policy}")
            job.args = ["train.py", "+experiment=study/e2e", *self.common(steps),
                        *SPIKE_CHECK["tiny" if a.tiny else "gpu"], f"optim.spike_policy={policy}",
                        f"data.cache_dir={self.st.cache}", f"hydra.run.dir={job.dir}"]
            jobs.append(job)
        swept = {"ttt.inner_lr": a.sweep_ilr, "ttt.mini_batch_size": a.sweep_b}
        if not all(swept.values()):
            return jobs, None, []
        n = len(a.sweep_ilr.split(",")) * len(a.sweep_b.split(","))
        launcher = Job("sweep", "sweep", 0, root / "sweep")
        tiny = [o for o in TINY["common"] + TINY["e2e"] if o.split("=")[0] not in swept] if a.tiny else []
        # the swept values come last: they win over the common ones where both set a key
        launcher.args = ["train.py", "-m", "launcher=joblib", f"hydra.launcher.n_jobs={n}", *self.common(steps),
                         f"hydra.sweep.dir={launcher.dir}", "+experiment=study/e2e", *tiny,
                         *(f"{k}={v}" for k, v in swept.items())]
        return jobs, launcher, [Job(f"sweep_{i}", "sweep", 0, launcher.dir / str(i)) for i in range(n)]

    def spawn(self, job: Job, log: Path) -> None:
        job.dir.parent.mkdir(parents=True, exist_ok=True)
        job.proc = subprocess.Popen([sys.executable, *unique_overrides(job.args)], cwd=REPO, env=self.st.env,
                                    stdout=open(log, "w"), stderr=subprocess.STDOUT, start_new_session=True)
        self.st.procs.append(job.proc)
        job.started = time.time()

    def start(self, phase: str, steps: int) -> list[Job]:
        jobs, launcher, sweep = self.plan(phase, steps)
        for job in jobs:
            self.spawn(job, self.log(job))
        if launcher is not None:
            self.spawn(launcher, self.st.work / f"{phase}_sweep.log")
            for job in sweep:
                job.proc, job.started = launcher.proc, launcher.started
        self.st.say(f"{phase}: started {len(jobs)} jobs" + (f" and a {len(sweep)}-job Hydra multirun sweep"
                                                              if sweep else "") + f" ({steps} steps each)")
        return jobs + sweep

    def log(self, job: Job) -> Path:
        phase = job.dir.parent.name if job.kind != "sweep" else job.dir.parent.parent.name
        return self.st.work / f"{phase}_{job.name if job.kind != 'sweep' else 'sweep'}.log"

    def tail(self, job: Job, n: int = 3) -> str:
        f = self.log(job)
        return " | ".join(f.read_text(errors="replace").strip().splitlines()[-n:]) if f.exists() else ""

    def poll(self, jobs: list[Job]) -> None:
        for job in jobs:
            if job.first_step_at is None and job.records():
                job.first_step_at = time.time()
            if job.returncode is None and job.proc is not None and job.proc.poll() is not None:
                job.returncode = job.proc.returncode
                if job.returncode != 0 and not job.killed and job.kind != "sweep":
                    self.st.say(f"{job.name} exited with status {job.returncode}: {self.tail(job)}")

    def kill(self, jobs: list[Job]) -> None:
        procs = {id(j.proc): j.proc for j in jobs if j.proc is not None}
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
        for job in jobs:
            job.killed = True

    def probe(self, deadline: float) -> int:
        """Start everything, measure each job's step time while all share the device, stop, choose the steps."""
        a = self.a
        jobs = self.start("probe", 100_000)
        until = time.time() + min(a.probe_s, max(30.0, 0.35 * (deadline - time.time())))
        paced = [j for j in jobs if j.spec.per_seed]  # the sweep's jobs have e2e's step time; the check its own steps
        while time.time() < until:
            time.sleep(1.0)
            self.poll(jobs)
            if all(len(j.records()) >= a.probe_steps for j in paced) or not any(j.alive() for j in jobs):
                break
        self.kill(jobs)
        step_times, startup = {}, []
        for job in jobs:
            recs = job.records()
            if len(recs) < 2:  # the first step compiles and captures: alone it says nothing of the step time
                if job in paced:
                    self.st.say(f"probe: {job.name} logged {len(recs)} steps: {self.tail(job)}")
                continue
            # the later half: e2e's first steps still compile and capture, and counting them overestimates its step
            # time, so the runs would finish long before their deadline (docs/study.md, round 2)
            step_times[job.name] = statistics.median(x["step_time_s"] for x in recs[max(1, len(recs) // 2):])
            startup.append((job.first_step_at or time.time()) - job.started)
        if not step_times:
            raise SystemExit("error: no job made two steps in the probe (see progress.log and the run logs)")
        slowest = max((step_times[j.name] for j in paced if j.name in step_times), default=0)
        budget = deadline - time.time() - max(startup)
        steps = int(0.9 * budget / slowest) if slowest else a.min_steps
        self.st.results["phases"]["probe"] = {"step_time_s": step_times, "startup_s": max(startup),
                                              "budget_s": budget, "steps_fit": steps}
        self.st.say("probe: step times (s, all sharing the device) " +
                    ", ".join(f"{k} {v:.3f}" for k, v in step_times.items()) +
                    f"; startup {max(startup):.0f}s; {steps} steps fit in {budget:.0f}s")
        unmeasured = [j.name for j in paced if j.name not in step_times]
        if unmeasured:
            self.st.say(f"probe: no step time for {unmeasured}: falling back to --min-steps {a.min_steps}")
            return a.min_steps
        return max(a.min_steps, min(a.max_steps, steps))

    def train(self, deadline: float) -> list[dict]:
        steps = self.probe(deadline) if self.a.steps == "auto" else int(self.a.steps)
        self.st.results["steps"] = steps
        self.st.save()
        jobs = self.start("train", steps)
        last_report = 0.0
        while any(j.alive() for j in jobs) and time.time() < deadline:
            time.sleep(1.0)
            self.poll(jobs)
            if time.time() - last_report >= self.a.report_every:
                last_report = time.time()
                self.st.say("train: " + ", ".join(f"{j.name} {self.progress(j, steps)}" for j in jobs))
                self.st.results["runs"] = [self.summary(j) for j in jobs]
                self.st.save()
        if any(j.alive() for j in jobs):
            self.st.say("train: deadline reached; stopping the jobs still going (their last checkpoint is evaluated)")
            self.kill([j for j in jobs if j.alive()])
        for job in jobs:
            if job.proc is not None:
                job.proc.wait()
        self.poll(jobs)
        for job in jobs:
            if job.kind == "sweep":
                c = job.config()
                if c is not None:
                    job.swept = {"inner_lr": float(c.ttt.inner_lr), "mini_batch_size": int(c.ttt.mini_batch_size)}
                    job.name = f"e2e_ilr{job.swept['inner_lr']:g}_b{job.swept['mini_batch_size']}"
        runs = [self.summary(j) for j in jobs]
        self.st.say("train: done: " + ", ".join(f"{j.name} {self.progress(j, steps)}" for j in jobs))
        step = common_step(runs)
        self.st.results["evaluated_step"] = step
        if step is not None and any(r["checkpoint_step"] != step for r in runs if r["evaluated"] and r["checkpoint"]):
            self.st.say(f"train: every job is evaluated at step {step}, the last checkpoint all per-seed jobs reached")
        return runs

    @staticmethod
    def progress(job: Job, steps: int) -> str:
        recs = job.records()
        return f"{recs[-1]['step']}/{steps} loss {recs[-1]['loss']:.3f}" if recs else "-"

    def summary(self, job: Job) -> dict:
        from ttt_e2e.train.checkpoint import latest_checkpoint

        recs = job.records()
        timed = recs[1:] or recs
        ckpt = latest_checkpoint(job.dir / "checkpoints") if (job.dir / "checkpoints").is_dir() else None
        c = job.config()
        setting = {} if c is None else {"inner_lr": float(c.ttt.inner_lr), "mini_batch_size": int(c.ttt.mini_batch_size),
                                        "window": c.model.window, "seq_length": int(c.model.seq_length),
                                        "tokens_per_step": int(c.training.global_batch_size * c.model.seq_length)}
        finite = [x["grad_norm"] for x in recs if isinstance(x["grad_norm"], float)]
        n_mb = len(recs[0]["minibatch_losses"]) if recs else 0
        return {"name": job.name, "kind": job.kind, "seed": job.seed, "evaluated": job.spec.evaluated,
                "per_seed": job.spec.per_seed, "test_time_grid": job.spec.test_time_grid, **setting,
                "swept": job.swept or None,
                "dir": str(job.dir), "steps": recs[-1]["step"] if recs else 0,
                "checkpoint": str(ckpt) if ckpt else None, "checkpoint_step": _step_of(ckpt) if ckpt else None,
                "returncode": job.returncode, "killed": job.killed,
                "tokens_per_s": statistics.median(x["tokens_per_s"] for x in timed) if timed else None,
                "step_time_s": statistics.median(x["step_time_s"] for x in timed) if timed else None,
                "max_memory_gib": recs[-1].get("max_memory_gib") if recs else None,
                "train_loss_first": recs[0]["loss"] if recs else None,
                "train_loss_last": statistics.mean(x["loss"] for x in recs[-5:]) if recs else None,
                # the training loss over the last quarter of the context, every step: fa - swa over training
                "train_last_quarter": [round(statistics.mean(x["minibatch_losses"][n_mb * 3 // 4:]), 4)
                                       for x in recs] if job.spec.per_seed else None,
                "skipped_steps": recs[-1].get("skipped_steps", 0) if recs else 0,
                "rollbacks": recs[-1].get("rollbacks", 0) if recs else 0,
                "inner_lr_last": recs[-1].get("ilr") if recs else None,  # after the warm-up and any back-off
                "loss_by_step": [x["loss"] for x in recs] if job.kind == "spikecheck" else None,
                "grad_norm_by_step": [x["grad_norm"] for x in recs] if job.kind == "spikecheck" else None,
                "grad_norm_max": max(finite, default=None),
                "grad_norm_over_100": sum(1 for x in recs if not isinstance(x["grad_norm"], float)
                                          or x["grad_norm"] > 100),
                "wall_s": (time.time() - job.started) if job.started else None,
                "log_tail": self.tail(job, 5) if (job.returncode not in (0, None) and not job.killed) else None}


def _step_of(step_dir: Path) -> int:
    return int(Path(step_dir).name.rsplit("_", 1)[-1])


def common_step(runs: list[dict]) -> Optional[int]:
    """The last checkpoint step that every per-seed job reached; each evaluated job's "checkpoint" is set to its
    checkpoint of that step where it has one, so that all are compared after the same training tokens even when
    one (e2e, the slowest) was stopped at the deadline. None when no per-seed job has a checkpoint."""
    from ttt_e2e.train.checkpoint import step_dir_name

    reached = [r["checkpoint_step"] for r in runs if r["per_seed"] and r["checkpoint"]]
    if not reached:
        return None
    step = min(reached)
    for r in runs:
        at = Path(r["dir"]) / "checkpoints" / step_dir_name(step)
        if r["evaluated"] and r["checkpoint"] and (at / "model.pt").is_file():
            r["checkpoint"], r["checkpoint_step"] = str(at), step
    return step
