"""The study (benchmarks/study/): its renderer and summaries on made-up results, the repeated-span corpora, the
command line's refusals, and `python -m benchmarks.study --tiny`, the whole pipeline (corpus and tokenizer built
from this Python's files, probe, concurrent jobs of every kind, the Hydra joblib sweep, the spike check, the
loss-by-position curves, test-time-only TTT over its grid, the needle, the table and plots) on tiny models, so
that the GPU study cannot silently rot."""
from __future__ import annotations

import json
import random
import subprocess
import sys
from pathlib import Path

import pytest

from benchmarks.study.__main__ import parse
from benchmarks.study.data import with_repeats
from benchmarks.study.report import render_markdown, summarize
from benchmarks.study.runs import common_step

REPO = Path(__file__).resolve().parents[2]


def _curve(level: float, slope: float, n: int = 8) -> dict:
    return {"loss_by_position": [level + slope * i for i in range(n)], "loss": level}


def _needle(loss: float) -> dict:
    return {"lengths": [64, 128], "depths": [0.5], "trials": 2, "answer_loss": [[loss], [loss + 1]],
            "hit_rate": [[1.0], [0.5]], "control_loss": [5.0, 5.0]}


def _results() -> dict:
    """Two seeds of fa, swa, e2e and tto on one corpus; tto's grid is best at inner lr 0.1. Last quarters
    (positions 6, 7 of 8): fa 3.65 + s, swa 4.0 + s, e2e 3.0 + 2s, tto without TTT 4.1, tto at 0.1 3.35 + s."""
    runs = []
    for s in (0, 1):
        for kind, level, slope in (("fa", 4.0, -0.05), ("swa", 4.0, 0.0), ("e2e", 3.0, 0.0)):
            runs.append({"name": f"{kind}_s{s}", "kind": kind, "seed": s, "per_seed": True, "steps": 10,
                         "eval": {"code_val": _curve(level + (2 if kind == "e2e" else 1) * s * 0.1, slope)},
                         "needle": _needle(level), "tokens_per_step": 100,
                         "train_last_quarter": [level + slope * i for i in range(20)]})
        grid = {"0.01": 4.0, "0.1": 3.35 + 0.1 * s, "1": 3.9}
        runs.append({"name": f"tto_s{s}", "kind": "tto", "seed": s, "per_seed": True, "test_time_grid": True,
                     "steps": 10, "eval": {"code_val": _curve(4.1, 0.0)},
                     "test_time": {lr: {"code_val": _curve(v, 0.0)} for lr, v in grid.items()},
                     "needle": {**_needle(3.5), "inner_lr": 0.1}})
    runs.append(dict(runs[0]))  # a run listed twice is still one row of the needle table
    return {"started": "now", "steps": 10, "runs": runs}


def test_summary_compares_e2e_with_test_time_only_ttt_at_its_best_inner_lr():
    s = summarize(_results())
    assert s["test_time_best_lr"] == {"code_val": 0.1}
    c = s["comparisons"]
    assert c["e2e - tto"]["code_val"]["by_seed"] == pytest.approx([3.0 - 3.35, 3.2 - 3.45])
    assert c["e2e - tto"]["code_val"]["spread"] == pytest.approx(0.1)
    assert c["tto - tto0"]["code_val"]["by_seed"] == pytest.approx([3.35 - 4.1, 3.45 - 4.1])
    assert c["fa - swa"]["code_val"]["by_seed"] == pytest.approx([-0.325, -0.325])
    assert s["test_time_grid"]["1"]["code_val"] == pytest.approx([3.9, 3.9])
    gap = s["training_gap"]["fa - swa"]["s0"]
    assert gap["tokens"][-1] == 2000 and gap["gap"][0] == pytest.approx(0.0) and gap["gap"][-1] < -0.9


def test_needle_table_lists_each_run_once():
    md = render_markdown(_results())
    table = md[md.index("Needle in a haystack"):].splitlines()
    rows = [line for line in table if line.startswith("| ") and not line.startswith("| run")]
    assert [r.split(" | ")[0] for r in rows] == ["| fa_s0", "| swa_s0", "| e2e_s0", "| tto_s0 (inner lr 0.1)",
                                                 "| fa_s1", "| swa_s1", "| e2e_s1", "| tto_s1 (inner lr 0.1)"]
    assert rows[0] == "| fa_s0 | 4.00 / 1.00 | 5.00 / 0.50 | 5.00 / 5.00 |"
    assert "| e2e - tto | -0.3500 / -0.2500 (mean -0.3000, spread 0.1000) |" in md


def test_repeated_spans_copy_whole_lines_from_beyond_the_window():
    text = "".join(f"line {i} of a file\n" for i in range(400))
    out = with_repeats(text, 100, 300, 0.5, random.Random(1))
    # replaying the same draws: spans of 100-300 characters ending at a line's end, each one or twice
    rng, rebuilt, pos, spans, copies = random.Random(1), [], 0, 0, 0
    while pos < len(text):
        j = text.find("\n", pos + rng.randint(100, 300))
        j = len(text) if j < 0 else j + 1
        span = text[pos:j]
        repeated = rng.random() < 0.5
        spans, copies = spans + 1, copies + repeated
        assert span.endswith("\n") and (100 < len(span) <= 300 + 20 or j == len(text))
        rebuilt.append(span * (2 if repeated else 1))
        pos = j
    assert "".join(rebuilt) == out and 0 < copies < spans and len(out) > len(text)


def test_every_job_is_evaluated_at_the_last_step_all_per_seed_jobs_reached(tmp_path):
    runs = []
    for name, steps, per_seed in (("fa_s0", (100, 200, 300), True), ("e2e_s0", (100, 200), True),
                                  ("e2e_ilr0_b16", (100,), False)):
        for step in steps:
            (tmp_path / name / "checkpoints" / f"step_{step:08d}").mkdir(parents=True)
            (tmp_path / name / "checkpoints" / f"step_{step:08d}" / "model.pt").touch()
        runs.append({"name": name, "dir": str(tmp_path / name), "per_seed": per_seed, "evaluated": True,
                     "checkpoint_step": steps[-1], "checkpoint": str(tmp_path / name / "checkpoints" /
                                                                     f"step_{steps[-1]:08d}")})
    assert common_step(runs) == 200  # e2e stopped at the deadline after its step-200 checkpoint
    assert [Path(r["checkpoint"]).name for r in runs] == ["step_00000200", "step_00000200", "step_00000100"]
    assert [r["checkpoint_step"] for r in runs] == [200, 200, 100]  # a sweep job short of it keeps its last


@pytest.mark.parametrize("argv", [["--kinds", "fa,sweep"], ["--kinds", "nope"], ["--steps", "many"],
                                  ["--tto-grid", "0.1,x"]])
def test_bad_arguments_exit_2(argv):
    with pytest.raises(SystemExit) as e:
        parse(argv)
    assert e.value.code == 2


@pytest.mark.slow
def test_tiny_study_end_to_end(tmp_path):
    out, work = tmp_path / "out", tmp_path / "work"
    p = subprocess.run([sys.executable, "-m", "benchmarks.study", "--tiny", "--out", str(out), "--work", str(work)],
                       cwd=REPO, capture_output=True, text=True, timeout=400)
    logs = work / "logs.txt"
    assert p.returncode == 0, (p.stdout[-3000:], p.stderr[-3000:], logs.read_text()[-5000:] if logs.exists() else "")
    assert sorted(f.name for f in out.iterdir()) == ["loss_by_position.png", "needle.png", "progress.log",
                                                      "results.json", "spike_check.png", "study.md",
                                                      "training_gap.png"]
    r = json.loads((out / "results.json").read_text())
    runs = {x["name"]: x for x in r["runs"]}
    # the per-seed jobs, the sweep's job named by its swept values (read back from its run dir), the check
    assert set(runs) == {"fa_s0", "swa_s0", "e2e_s0", "tto_s0", "e2e_ilr0_b16", "spikecheck_rollback"}
    assert runs["e2e_ilr0_b16"]["inner_lr"] == 0.0 and runs["fa_s0"]["window"] is None
    assert runs["swa_s0"]["window"] == 32 and runs["tto_s0"]["window"] == 32
    steps = r["steps"]
    assert r["evaluated_step"] == steps  # all finished: their last checkpoints
    assert 2 <= steps <= 6 and r["phases"]["probe"]["step_time_s"]["e2e_s0"] > 0
    for name, x in runs.items():
        assert x["returncode"] == 0 and not x["killed"], (name, x["log_tail"])
        if name == "spikecheck_rollback":
            assert x["steps"] == 4 and "eval" not in x and len(x["loss_by_step"]) == 4
            continue
        assert x["steps"] == steps and x["tokens_per_s"] > 0
        for corpus in ("code_val", "code_val_rep", "docs_val"):
            curve = x["eval"][corpus]["loss_by_position"]
            assert len(curve) == 256 and all(v is not None and 3 < v < 9 for v in curve)  # ln 512 = 6.2
    tto = runs["tto_s0"]
    assert tto["eval"]["code_val"]["train_mode"] == "pretrain"
    assert set(tto["test_time"]) == {"0.01", "0.03", "0.1", "0.3", "1", "3"}
    grid = [tto["test_time"][lr]["code_val"] for lr in ("0.01", "1")]
    # the inner loop switched on at evaluation: meta mode, and the inner lr changes the curve
    assert all(g["train_mode"] == "meta" for g in grid) and grid[0]["loss"] != grid[1]["loss"]
    assert tto["needle"]["inner_lr"] == r["summary"]["test_time_best_lr"]["code_val"]
    for name in ("fa_s0", "swa_s0", "e2e_s0", "tto_s0"):
        n = runs[name]["needle"]
        assert n["lengths"] == [128, 256] and len(n["answer_loss"]) == 2 and len(n["answer_loss"][0]) == 2
    # inner lr 0 never updates MLP': its curve differs from e2e's own (same seed and data)
    assert runs["e2e_ilr0_b16"]["eval"]["code_val"]["loss"] != runs["e2e_s0"]["eval"]["code_val"]["loss"]
    d = r["summary"]["comparisons"]["e2e - swa"]["code_val"]
    e2e, swa = (runs[k]["eval"]["code_val"]["loss_by_position"][192:] for k in ("e2e_s0", "swa_s0"))
    assert d["by_seed"] == [pytest.approx(sum(e2e) / 64 - sum(swa) / 64)]
    md = (out / "study.md").read_text()
    assert "| e2e |" in md and "e2e_ilr0_b16" in md and "Spike check" in md and "length 256" in md
    assert "| e2e - tto |" in md and "Test-time-only TTT" in md
    # --render redoes the table from results.json alone
    again = tmp_path / "again"
    subprocess.run([sys.executable, "-m", "benchmarks.study", "--render", str(out / "results.json"), "--out",
                    str(again)], cwd=REPO, check=True, capture_output=True, timeout=120)
    assert (again / "study.md").read_text() == md
