"""Every benchmark entry point (a module of benchmarks/<area>/ run as `python -m benchmarks.<area>.<name>`) runs
end to end in its smoke mode: toy shapes, on the CPU with Triton's interpreter, so that none of them rots between
the GPU runs that give their figures. Each runs in this process through its main(argv) (the training-job
benchmarks start their jobs as subprocesses themselves); what they write as JSON carries the environment record
with the commit. A new entry point needs its line in SMOKE (or in COVERED_ELSEWHERE)."""
import importlib
import inspect
import json
import pkgutil
import sys
from pathlib import Path

import pytest

import benchmarks

ROOT = Path(__file__).parents[2]
AREAS = ("kernels", "train", "inference", "eval")
TINY_TRAIN = ["model.n_layers=2", "model.suffix_len=1", "model.d_model=64", "model.n_heads=2", "model.mlp_width=128",
              "model.prime_mlp_width=128", "model.vocab_size=258", "model.seq_length=256", "ttt.mini_batch_size=64"]

# module -> the command lines of its smoke run ({tmp}: the test's temporary folder), and the JSON files they write
SMOKE = {
    "kernels.attention": ([["--tiny", "--json", "{tmp}/att.json"],
                           ["--report", "{tmp}/att.json", "--plot", "{tmp}/att.png"]], ["att.json"]),
    "kernels.attention_share": ([["--size", "tiny", "--contexts", "64", "128", "--reps", "1", "--out",
                                  "{tmp}/share.json"]], ["share.json"]),
    "kernels.fused_projections": ([["--tiny"]], []),
    "kernels.meta_grad_precision": ([["--tiny", "--seeds", "1"]], []),
    "kernels.swa_fwd_tiles": ([["--tiny"]], []),
    "kernels.swa_fwd_versions": ([["--tiny", "--reps", "1"]], []),
    "kernels.swa_fwd_vs_cudnn": ([["--tiny", "--profile-host"]], []),
    "kernels.swa_head_split": ([["--tiny", "--fwd-tile", "table"]], []),
    "kernels.swa_key_parts": ([["--tiny"]], []),
    "train.meta_step": ([["--sizes", "tiny", "--seq", "64", "--mini-batch", "16", "--window", "32", "--steps", "1",
                          "--no-phases", "--graph", "--out", "{tmp}/step.json"]], ["step.json"]),
    "train.op_profile": ([["tiny:e2e:0:0", "--by-node"]], []),
    "train.inner_step_profile": ([["--size", "tiny"], ["--size", "tiny", "--prefix"],
                                  ["--size", "tiny", "--feed", "128", "--ops"]], []),
    "train.step_flops": ([["--sizes", "125m", "--seq", "256", "--mini-batch", "64", "--json", "{tmp}/flops.json"]],
                         ["flops.json"]),
    "train.compare_runs": ([["{tmp}/run_a", "{tmp}/run_b", "--json", "{tmp}/cmp.json", "--plot", "{tmp}/cmp.png"]],
                           []),
    "train.meta_grad_growth": ([["{tmp}/ckpt", "--sequences", "1", "--lengths", "32,64", "--mults", "1", "--out",
                                 "{tmp}/growth.json"]], ["growth.json"]),
    "train.versions": ([[str(ROOT), str(ROOT), "--labels", "a", "b", "--tiny", "--device", "cpu", "--rounds", "1",
                         "--steps", "1", "--targets", "125m fa", "--out", "{tmp}/versions"]],
                       ["versions/versions.json"]),
    "train.parallel_gpu": ([["--out", "{tmp}/pg", "--device", "cpu", "--tiny", "--parts", "d", "--steps", "4"]],
                           ["pg/parallel_gpu.json"]),
    "train.scaling": ([["--sizes", "125m", "--modes", "e2e", "--dists", "ddp", "--gpus", "1", "--steps", "4",
                        "--skip", "1", "--out", "{tmp}/scaling", "--", "training.device=cpu", *TINY_TRAIN]],
                      ["scaling/scaling.json"]),
    "inference.latency_trace": ([["--tiny", "--methods", "ttt", "--contexts", "64", "--short-reps", "1"]], []),
    "inference.prefill_overlap": ([["--tiny", "--contexts", "128", "--reps", "1"]], []),
    "eval.eval_context": ([["--tiny", "--out", "{tmp}/ec", "--reps", "1"]], ["ec/results.json"]),
    "eval.convert_check": ([["--tiny", "--device", "cpu", "--out", "{tmp}/cc"]], ["cc/convert_check.json"]),
}
COVERED_ELSEWHERE = {"inference.latency": "tests/benchmarks/test_latency.py"}
NOT_MINE = {"train.parallel_gpu", "train.scaling"}  # results JSON of their own (not yet through core.records)


def entry_points() -> set[str]:
    """area.name of every module under benchmarks/<area>/ that runs as a script."""
    found = set()
    for area in AREAS:
        for info in pkgutil.iter_modules([str(Path(benchmarks.__file__).parent / area)]):
            path = Path(benchmarks.__file__).parent / area / f"{info.name}.py"
            if path.exists() and 'if __name__ == "__main__":' in path.read_text():
                found.add(f"{area}.{info.name}")
    return found


def test_every_entry_point_has_a_smoke_run():
    missing = entry_points() - set(SMOKE) - set(COVERED_ELSEWHERE)
    assert not missing, f"entry points without a smoke run (add them to SMOKE): {sorted(missing)}"
    assert not set(SMOKE) - entry_points(), "SMOKE names modules that are not entry points"


def _fixtures(name: str, tmp: Path) -> None:
    """What a smoke run reads: two training runs' metrics, a tiny checkpoint."""
    if name == "train.compare_runs":
        for run, shift in (("run_a", 0.0), ("run_b", 1e-6)):
            (tmp / run).mkdir()
            lines = [json.dumps({"step": s, "loss": 5.0 - 0.1 * s + shift, "step_time_s": 0.01}) for s in range(1, 13)]
            (tmp / run / "metrics.jsonl").write_text("\n".join(lines) + "\n")
    if name == "train.meta_grad_growth":
        from ttt_e2e.config import Config, TTTConfig
        from ttt_e2e.model.transformer import Transformer

        from benchmarks.core.models import tiny_config

        cfg = Config(model=tiny_config("e2e", seq_length=64, window=32), ttt=TTTConfig(mini_batch_size=16))
        Transformer(cfg.model, cfg.ttt).save_pretrained(tmp / "ckpt", config=cfg)


@pytest.mark.slow
@pytest.mark.parametrize("name", sorted(SMOKE))
def test_smoke(name, tmp_path, monkeypatch):
    runs, outputs = SMOKE[name]
    _fixtures(name, tmp_path)
    monkeypatch.setenv("OUT", str(tmp_path))  # latency_trace's log
    main = importlib.import_module(f"benchmarks.{name}").main
    for argv in runs:
        argv = [a.replace("{tmp}", str(tmp_path)) for a in argv]
        if inspect.signature(main).parameters:
            code = main(argv)
        else:  # a main() that reads sys.argv
            monkeypatch.setattr(sys, "argv", [name, *argv])
            code = main()
        assert code in (None, 0), f"{name} {argv}: exit {code}"
    for out in outputs:
        record = json.loads((tmp_path / out).read_text())
        if name in NOT_MINE:
            continue
        env = record["environment"]
        assert env["commit"] and env["device"] and env["torch"] and env["date"], env
