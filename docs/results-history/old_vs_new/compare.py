"""Issue 35's agreement table from run.py's output (see run.py): python old/compare.py OUT_DIR"""
import json
import re
import statistics
import sys
from pathlib import Path

out = Path(sys.argv[1])


def steps(path):
    if not path.exists():
        return {}
    d = json.loads(path.read_text())
    rows = d["results"] if isinstance(d, dict) else d
    res = {}
    for r in rows:
        g = r.get("graphed")
        if g:
            res[r["name"].split()[1]] = g["ms_all"]
    return res


def fmt(xs):
    return f"{statistics.median(xs):.2f} ({min(xs):.2f}-{max(xs):.2f})" if xs else "-"


runs = {"new 1": steps(out / "step_new1.json"), "old 1": steps(out / "step_old1.json"),
        "new 2": steps(out / "step_new2.json"), "old 2": steps(out / "step_old2.json")}
env = json.loads((out / "step_new1.json").read_text()).get("environment", {}) if (out / "step_new1.json").exists() else {}
print(f"\n{env.get('device')}, driver {env.get('driver')}, torch {env.get('torch')}, triton {env.get('triton')}, "
      f"commit {str(env.get('commit'))[:10]} ({env.get('commit_from')}), {env.get('date')}")
print("125M step, CUDA-graph replays, ms: median (min-max)")
print("| mode | new 1 | old 1 (6cc5823) | new 2 | old 2 (6cc5823) | old / new | difference | spread | agree |")
print("|---|---|---|---|---|---|---|---|---|")


def rel_range(xs):
    return (max(xs) - min(xs)) / statistics.median(xs)


for mode in ("fa", "e2e"):
    xs = {k: v.get(mode, []) for k, v in runs.items()}
    new = [statistics.median(xs[k]) for k in ("new 1", "new 2") if xs[k]]
    old = [statistics.median(xs[k]) for k in ("old 1", "old 2") if xs[k]]
    cells = ["-"] * 4
    if new and old:
        # spread: the largest relative range of one code's repeats, within a run (replays) or between its runs
        spread = max([rel_range(v) for v in xs.values() if v] + [rel_range(m) for m in (new, old) if len(m) > 1])
        diff = abs(statistics.median(old) - statistics.median(new)) / statistics.median(new)
        cells = [f"{statistics.median(old) / statistics.median(new):.4f}", f"{100 * diff:.2f}%",
                 f"{100 * spread:.2f}%", "yes" if diff <= spread else "NO"]
    print(f"| {mode} | {fmt(xs['new 1'])} | {fmt(xs['old 1'])} | {fmt(xs['new 2'])} | {fmt(xs['old 2'])} | "
          + " | ".join(cells) + " |")

pat = re.compile(r"^(causal 8K|inner step 1K/9K): (.*)$")
swa = {}
for label in ("new", "old"):
    p = out / f"swa_{label}.log"
    for line in p.read_text().splitlines() if p.exists() else []:
        m = pat.match(line)
        if m:
            for part in m.group(2).split(", "):
                name, us = re.match(r"(\S+) (\d+) us", part).groups()
                swa.setdefault((m.group(1), name), {}).setdefault(label, []).append(int(us))
print("\nSWA forward vs cuDNN at 3B heads (32 x 80), do_bench mean us (new: two runs)")
print("| shape | kernel | new | old 6cc5823 | old / new | difference | spread (new runs) |")
print("|---|---|---|---|---|---|---|")
for (shape, name), v in swa.items():
    new, old = v.get("new", []), v.get("old", [])
    cells = ["-"] * 3
    if new and old:
        mid = statistics.median(new)
        cells = [f"{statistics.median(old) / mid:.3f}", f"{100 * abs(statistics.median(old) - mid) / mid:.1f}%",
                 f"{100 * (max(new) - min(new)) / mid:.1f}%"]
    print(f"| {shape} | {name} | {', '.join(map(str, new)) or '-'} | {', '.join(map(str, old)) or '-'} | "
          + " | ".join(cells) + " |")
