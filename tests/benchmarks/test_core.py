"""benchmarks/core: the environment record names the commit (from git, or from TTT_E2E_COMMIT in a copy of the tree
without git), every result JSON carries it, and the table printer's cells."""
import json
import subprocess

from benchmarks.core import env as env_module
from benchmarks.core.records import write_json
from benchmarks.core.table import markdown


def test_the_record_names_the_checkouts_commit():
    head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=env_module.REPO, capture_output=True, text=True)
    record = env_module.environment("cpu")
    assert record["commit"] == head.stdout.strip() and record["commit_from"] == "git"
    assert isinstance(record["dirty"], bool) and record["torch"] and record["date"].endswith("UTC")


def test_without_git_the_commit_comes_from_the_variable_and_dirty_is_unknown(monkeypatch):
    monkeypatch.setattr(env_module, "_run", lambda cmd: None)  # no git, no nvidia-smi
    monkeypatch.delenv(env_module.COMMIT_VARIABLE, raising=False)
    assert env_module.git_state() == {"commit": None, "dirty": None, "commit_from": None}
    monkeypatch.setenv(env_module.COMMIT_VARIABLE, "abc1234\n")
    assert env_module.git_state() == {"commit": "abc1234", "dirty": None, "commit_from": env_module.COMMIT_VARIABLE}
    assert "commit abc1234," in env_module.describe(env_module.environment("cpu"))


def test_write_json_stamps_the_environment_first(tmp_path):
    path = write_json(tmp_path / "sub" / "r.json", {"rows": [1, 2]}, env={"commit": "x", "device": "d"})
    record = json.loads(path.read_text())
    assert list(record) == ["environment", "rows"] and record["environment"]["commit"] == "x"


def test_markdown_cells():
    assert markdown(["a", "b"], [[1.23456, None], ["x", 2.0]]).splitlines() == [
        "| a | b |", "|---|---|", "| 1.235 | - |", "| x | 2 |"]
