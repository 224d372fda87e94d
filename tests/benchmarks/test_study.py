"""benchmarks/study.py --tiny: the whole study pipeline (corpus and tokenizer built from this Python's files,
probe, concurrent runs, the Hydra joblib sweep, the spike check, eval.py curves, the needle, the table and plots)
on tiny models, so that the GPU study cannot silently rot."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]


@pytest.mark.slow
def test_tiny_study_end_to_end(tmp_path):
    out, work = tmp_path / "out", tmp_path / "work"
    p = subprocess.run([sys.executable, "benchmarks/study.py", "--tiny", "--out", str(out), "--work", str(work)],
                       cwd=REPO, capture_output=True, text=True, timeout=400)
    assert p.returncode == 0, (p.stdout[-3000:], p.stderr[-3000:], (out / "logs.txt").read_text()[-5000:]
                               if (out / "logs.txt").exists() else "")
    assert sorted(f.name for f in out.iterdir()) == ["logs.txt", "loss_by_position.png", "needle.png",
                                                      "progress.log", "results.json", "spike_check.png", "study.md"]
    r = json.loads((out / "results.json").read_text())
    runs = {x["name"]: x for x in r["runs"]}
    # the single runs, the sweep's jobs named by their swept values (read back from their run dirs), the check
    assert set(runs) == {"fa_s0", "swa_s0", "e2e_s0", "e2e_ilr0_b16", "e2e_ilr1_b16", "spikecheck_rollback"}
    assert runs["e2e_ilr0_b16"]["inner_lr"] == 0.0 and runs["e2e_ilr1_b16"]["inner_lr"] == 1.0
    assert runs["fa_s0"]["window"] is None and runs["swa_s0"]["window"] == 64
    steps = r["steps"]
    assert 2 <= steps <= 6 and r["phases"]["probe"]["step_time_s"]["e2e_s0"] > 0
    for name, x in runs.items():
        assert x["returncode"] == 0 and not x["killed"], (name, x["log_tail"])
        if name == "spikecheck_rollback":
            assert x["steps"] == 4 and "eval" not in x and len(x["loss_by_step"]) == 4
            continue
        assert x["steps"] == steps and x["tokens_per_s"] > 0
        for corpus in ("code_val", "docs_val"):
            curve = x["eval"][corpus]["loss_by_position"]
            assert len(curve) == 256 and all(v is not None and 3 < v < 9 for v in curve)  # ln 512 = 6.2
        n = x["needle"]
        assert n["lengths"] == [128, 256] and len(n["answer_loss"]) == 2 and len(n["answer_loss"][0]) == 2
    # inner lr 0 never updates MLP': its curve differs from the inner-lr-1 job's (same seed and data)
    assert runs["e2e_ilr0_b16"]["eval"]["code_val"]["loss"] != runs["e2e_ilr1_b16"]["eval"]["code_val"]["loss"]
    s = r["summary"]
    d = s["e2e_minus_swa_last_quarter"]["code_val"]
    e2e, swa = runs["e2e_s0"]["eval"]["code_val"]["quarters"][3], runs["swa_s0"]["eval"]["code_val"]["quarters"][3]
    assert d["by_seed"] == [pytest.approx(e2e - swa)]
    md = (out / "study.md").read_text()
    assert "| e2e |" in md and "e2e_ilr0_b16" in md and "Spike check" in md and "length 256" in md
    # --render redoes the table from results.json alone
    again = tmp_path / "again"
    subprocess.run([sys.executable, "benchmarks/study.py", "--render", str(out / "results.json"), "--out",
                    str(again)], cwd=REPO, check=True, capture_output=True, timeout=120)
    assert (again / "study.md").read_text() == md
