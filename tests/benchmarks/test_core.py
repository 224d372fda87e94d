"""benchmarks/core: the environment record names the commit (from git, or from TTT_E2E_COMMIT in a copy of the tree
without git), every result JSON carries it, and the table printer's cells."""
import json
import subprocess

from benchmarks.core import env as env_module
from benchmarks.core.records import write_json
from benchmarks.core.table import markdown


def test_the_record_names_the_checkouts_commit(monkeypatch):
    monkeypatch.delenv(env_module.COMMIT_VARIABLE, raising=False)
    head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=env_module.REPO, capture_output=True, text=True)
    record = env_module.environment("cpu")
    assert record["commit"] == head.stdout.strip() and record["commit_from"] == "git"
    assert isinstance(record["dirty"], bool) and record["torch"] and record["date"].endswith("UTC")


def test_the_variable_names_the_commit_over_git_and_dirty_is_unknown(monkeypatch):
    monkeypatch.setenv(env_module.COMMIT_VARIABLE, "abc1234\n")  # a copy of the tree, maybe inside another checkout
    assert env_module.git_state() == {"commit": "abc1234", "dirty": None, "commit_from": env_module.COMMIT_VARIABLE}
    assert "commit abc1234," in env_module.describe(env_module.environment("cpu"))


def test_a_tree_inside_another_checkout_does_not_take_its_head(monkeypatch, tmp_path):
    monkeypatch.delenv(env_module.COMMIT_VARIABLE, raising=False)
    answers = {"--show-toplevel": str(tmp_path), "HEAD": "f" * 40}  # git answers for the enclosing checkout
    monkeypatch.setattr(env_module, "_run", lambda cmd: answers.get(cmd[-1]))
    assert env_module.git_state() == {"commit": None, "dirty": None, "commit_from": None}
    answers["--show-toplevel"] = str(env_module.REPO)
    assert env_module.git_state()["commit"] == "f" * 40


def test_write_json_stamps_the_environment_first(tmp_path):
    path = write_json(tmp_path / "sub" / "r.json", {"rows": [1, 2]}, env={"commit": "x", "device": "d"})
    record = json.loads(path.read_text())
    assert list(record) == ["environment", "rows"] and record["environment"]["commit"] == "x"


def test_markdown_cells():
    assert markdown(["a", "b"], [[1.23456, None], ["x", 2.0]]).splitlines() == [
        "| a | b |", "|---|---|", "| 1.235 | - |", "| x | 2 |"]
