"""Every `train.py` command of the README composes: its experiment and overrides exist in conf/ and pass the typed
schema and each config's validate(), so the commands a user copies do not drift from the configs. (Running them
needs data and GPUs; composing needs neither.)"""
import re
import shlex
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]


def readme_train_commands() -> list[list[str]]:
    """The overrides of each `train.py` command in the README's code blocks (continuation lines joined, comments
    dropped), without the launcher's own settings (-m, hydra.*, launcher=, which need their plugins)."""
    blocks, inside = [], False
    for line in (REPO / "README.md").read_text().splitlines():
        if line.startswith("```"):
            inside = not inside
            blocks.append("") if inside else None
        elif inside:
            blocks[-1] += line + "\n"
    commands = []
    for block in blocks:
        for line in block.replace("\\\n", " ").splitlines():
            line = line.split(" #")[0] if not line.lstrip().startswith("#") else ""
            if " train.py" not in f" {line}":
                continue
            args = shlex.split(re.sub(r"<[^>]*>", "PLACEHOLDER", line))  # `<pretrain run>`: a path to fill in
            args = args[[i for i, a in enumerate(args) if a.endswith("train.py")][0] + 1:]
            commands.append([a for a in args if a != "-m" and not a.startswith(("hydra.", "launcher="))])
    return commands


COMMANDS = readme_train_commands()


def test_the_readme_has_train_commands():
    assert len(COMMANDS) >= 10, COMMANDS


@pytest.mark.parametrize("args", COMMANDS, ids=[" ".join(c) or "(defaults)" for c in COMMANDS])
def test_readme_train_command_composes(args, compose):
    if any(a.startswith("+experiment=hf/") for a in args):
        pytest.skip("reads its architecture from a converted checkpoint (tests/convert/test_from_hf.py runs it)")
    sweep = [a for a in args if "," in a.split("=", 1)[-1] and not a.startswith("+")]
    args = [a.split(",")[0] if a in sweep else a for a in args]  # a multirun's sweep: its first value
    cfg = compose(*args)
    assert cfg.training.steps > 0
