"""Every benchmark entry point (a module of benchmarks/<area>/ run as `python -m benchmarks.<area>.<name>`) runs
end to end in its smoke mode (benchmarks/smoke.py: toy shapes, here on the CPU with Triton's interpreter), so that
none of them rots between the GPU runs that give their figures. Each runs in this process through its main(argv)
(the training-job benchmarks start their jobs as subprocesses themselves); what they write as JSON carries the
environment record with the commit."""
import importlib
import json
import pkgutil
import re
from pathlib import Path

import pytest
import torch

import benchmarks
from benchmarks import smoke

AREAS = ("kernels", "train", "inference", "eval")


def entry_points() -> set[str]:
    """area.name of every module under benchmarks/<area>/ that runs as a script."""
    found = set()
    for area in AREAS:
        folder = Path(benchmarks.__file__).parent / area
        for info in pkgutil.iter_modules([str(folder)]):
            if 'if __name__ == "__main__":' in (folder / f"{info.name}.py").read_text():
                found.add(f"{area}.{info.name}")
    return found


def test_every_entry_point_has_a_smoke_run():
    missing = entry_points() - set(smoke.SMOKE) - set(smoke.COVERED_ELSEWHERE) - set(smoke.GPU_ONLY)
    assert not missing, f"entry points without a smoke run (add them to benchmarks/smoke.py): {sorted(missing)}"
    assert not set(smoke.SMOKE) - entry_points(), "benchmarks/smoke.py names modules that are not entry points"


@pytest.mark.slow
@pytest.mark.parametrize("name", sorted(smoke.SMOKE))
def test_smoke(name, tmp_path, monkeypatch):
    monkeypatch.setenv("OUT", str(tmp_path))  # latency_trace's log
    smoke.run(name, tmp_path)
    for out in smoke.SMOKE[name][1]:
        env = json.loads((tmp_path / out).read_text())["environment"]
        assert env["commit"] and env["device"] and env["torch"] and env["date"], env


@pytest.mark.skipif(torch.cuda.is_available(), reason="on a GPU the GPU-only entry points run for real")
@pytest.mark.parametrize("name", sorted(smoke.GPU_ONLY))
def test_gpu_only_entry_points_refuse_the_cpu_in_one_line(name, capsys):
    main = importlib.import_module(f"benchmarks.{name}").main
    assert main(smoke.GPU_ONLY[name][0]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "needs a CUDA GPU" in err, err


def test_no_benchmark_edits_sys_path():
    """The package imports its modules by name (`python -m benchmarks...`); the study scripts are the study's."""
    root = Path(benchmarks.__file__).parent
    edit = re.compile(r"sys\.path\s*(\.\s*(insert|append|extend)|\[|=|\+=)|syspath_prepend")
    edits = [str(p.relative_to(root)) for p in root.rglob("*.py")
             if edit.search(p.read_text()) and not p.name.startswith("study") and "study" not in p.parts]
    assert not edits, edits


def test_the_readme_names_every_entry_point():
    readme = (Path(benchmarks.__file__).parent / "README.md").read_text()
    unnamed = [name for name in entry_points() if name.split(".")[1] not in readme]
    assert not unnamed, f"benchmarks/README.md does not say what these answer: {unnamed}"
