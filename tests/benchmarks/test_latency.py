"""benchmarks/inference/latency.py: its CPU smoke run end to end, and the one RESULTS.md section it rewrites."""
import json

from benchmarks.inference import latency


def test_latency_benchmark_smoke(tmp_path, capsys):
    """--tiny runs every method end to end on the CPU (the 3B run needs the GPU)."""
    out = tmp_path / "lat.json"
    latency.main(["--tiny", "--methods", "ttt", "swa", "fa-cudnn", "--contexts", "64", "128", "--decode", "16",
                  "--short-reps", "3", "--out", str(out)])
    record = json.loads(out.read_text())
    rows = record["rows"]
    methods = ("ttt", "swa", "fa-cudnn")
    assert [(r["method"], r["context"]) for r in rows] == [(m, n) for m in methods for n in (64, 128)]
    assert all("error" not in r and r["decode_tokens"] in (8, 16) for r in rows)
    # short contexts: three prefills (one with decoding), their median reported and the fastest beside it
    assert all(len(r["prefill_runs_s"]) == 3 and r["prefill_s"] == r["prefill_runs_s"][1] and
               r["prefill_min_per_token_us"] <= r["prefill_per_token_us"] for r in rows)
    assert "## " not in capsys.readouterr().out  # the smoke run prints the section body, never writes RESULTS.md
    assert {"commit", "dirty", "device", "torch", "date"} <= set(record["environment"])


def test_results_section_is_the_only_one_written(tmp_path):
    path = tmp_path / "RESULTS.md"
    path.write_text("# R\n\n## Attention\nA\n\n## Inference latency\nold\n\n## Training\nT\n")
    latency.write_results("new\n", path)
    assert path.read_text() == "# R\n\n## Attention\nA\n\n## Inference latency\n\nnew\n\n## Training\nT\n"
    path.write_text("# R\n\n## Attention\nA\n")
    latency.write_results("new\n", path)
    assert path.read_text() == "# R\n\n## Attention\nA\n\n## Inference latency\n\nnew\n"
