"""Issue 35's agreement check, as run on 2026-12-07 (H100, docs/results-history/data/
benchmarks_old_vs_new_h100_dec07.json): the new entry points (`python -m benchmarks.train.meta_step`,
`python -m benchmarks.kernels.swa_fwd_vs_cudnn`) and the old scripts of 6cc5823, in one process, alternating, so
that they share the GPU, its clock and the Triton cache. Not part of the package: the old scripts come from git.

    mkdir -p old && for f in meta_step swa_fwd_vs_cudnn timing attention; do
        git show 6cc5823:benchmarks/$f.py > old/$f.py; done && cp docs/results-history/old_vs_new/*.py old/
    python old/run.py OUT && python old/compare.py OUT

Each part after the fourth starts only before its deadline (seconds since the start)."""
import contextlib
import sys
import time
from pathlib import Path

out = Path(sys.argv[1])
sys.path.insert(0, str(Path(__file__).resolve().parent))  # the old scripts import their siblings by name
import meta_step as old_step  # noqa: E402  (.gpu_old/meta_step.py)
import swa_fwd_vs_cudnn as old_swa  # noqa: E402

from benchmarks.kernels import swa_fwd_vs_cudnn as new_swa  # noqa: E402
from benchmarks.train import meta_step as new_step  # noqa: E402

STEP = ["--sizes", "125m", "--modes", "fa", "e2e", "--no-remat-inner", "--steps", "6", "--graph", "--no-phases"]


def old_main(module, argv):
    saved, sys.argv = sys.argv, [module.__file__, *argv]
    try:
        module.main()
    finally:
        sys.argv = saved


def to_file(name, fn):
    with open(out / name, "a") as f, contextlib.redirect_stdout(f):
        fn()


t0 = time.time()
plan = [("step new1", 99, lambda: new_step.main(STEP + ["--out", str(out / "step_new1.json")])),
        ("step old1", 99, lambda: old_main(old_step, STEP + ["--out", str(out / "step_old1.json")])),
        ("swa new", 99, lambda: to_file("swa_new.log", lambda: new_swa.main([]))),
        ("swa old", 99, lambda: to_file("swa_old.log", lambda: old_main(old_swa, []))),
        ("step new2", 60, lambda: new_step.main(STEP + ["--out", str(out / "step_new2.json")])),
        ("step old2", 70, lambda: old_main(old_step, STEP + ["--out", str(out / "step_old2.json")])),
        ("swa new again", 80, lambda: to_file("swa_new.log", lambda: new_swa.main([])))]
for label, latest_start, run in plan:
    if time.time() - t0 > latest_start:
        print(f"[{time.time() - t0:.0f} s] {label}: not run (time)", flush=True)
        continue
    try:
        run()
        print(f"[{time.time() - t0:.0f} s] {label} done", flush=True)
    except BaseException as e:  # noqa: BLE001
        print(f"[{time.time() - t0:.0f} s] {label} FAILED: {type(e).__name__}: {str(e)[:300]}", flush=True)
