"""benchmarks/train/versions.py: the summary of per-process repeats and its table (the GPU run is the coordinator's;
`python -m benchmarks.train.versions A B --tiny --device cpu` runs every code path at toy sizes in ~3 minutes)."""
import pytest

from benchmarks.train import versions as versions_module


@pytest.fixture(scope="module")
def versions():
    return versions_module


def test_medians_and_spreads(versions):
    step = lambda runs: {"unit": "ms", "runs": runs}  # noqa: E731
    procs = {"base": [{"times": {"125m e2e": step([10.0, 11.0, 12.0])}}, {"times": {"125m e2e": step([13.0])}}],
             "new": [{"times": {"125m e2e": step([9.0, 10.0, 10.0])}},
                     {"times": {"125m e2e": {"error": "OutOfMemoryError: ..."}}}]}
    s = versions.summarize(procs, ["base", "new"])["125m e2e"]
    assert s["base"]["process_medians"] == [11.0, 13.0] and s["base"]["median"] == 12.0
    assert s["base"]["between_processes"] == pytest.approx(2 / 12)
    assert s["base"]["within_process"] == pytest.approx(2 / 11)
    assert s["new"]["median"] == 10.0 and s["new"]["between_processes"] == 0.0
    table = versions.table({"125m e2e": s}, ["base", "new"]).splitlines()
    assert table[-1].startswith("| 125m e2e | 12 ms | 10 ms | 0.833 |"), table[-1]


def test_a_target_that_failed_everywhere_shows_its_error(versions):
    procs = {"base": [{"times": {"1b e2e": {"error": "OutOfMemoryError: x"}}}], "new": []}
    s = versions.summarize(procs, ["base", "new"])
    assert s["1b e2e"]["base"] == {"error": "OutOfMemoryError: x"}
    assert "OutOfMemoryError" in versions.table(s, ["base", "new"])
