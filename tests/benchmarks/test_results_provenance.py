"""benchmarks/RESULTS.md's opening table: every result file (JSON) that a row's section cites carries the
environment record of benchmarks/core (device, date, commit), and some of them the commit the row names."""
import gzip
import json
import re
from pathlib import Path

ROOT = Path(__file__).parents[2]
RESULTS = ROOT / "benchmarks" / "RESULTS.md"


def opening_rows(text: str) -> list[dict]:
    lines = text[text.index("| target | current figure | date, code | section below |"):].splitlines()[2:]
    rows = []
    for line in lines:
        if not line.startswith("|"):
            break
        target, _, code, section = [c.strip() for c in line.strip("|").split("|")]
        rows.append({"target": target, "commits": re.findall(r"\b[0-9a-f]{7,40}\b", code), "section": section})
    return rows


def section(text: str, name: str) -> str:
    start = re.search(rf"^## {re.escape(name)}.*$", text, re.M)
    assert start, f"no section '## {name}...'"
    end = re.search(r"^## ", text[start.end():], re.M)
    return text[start.end():start.end() + end.start() if end else len(text)]


def cited_records(body: str) -> list[Path]:
    """The JSON result files a section cites (`a_{json,txt}` and `a*` forms expanded)."""
    paths = []
    for name in re.findall(r"docs/results-history/data/([\w.*{},-]+)", body):
        m = re.search(r"\{([^}]*)\}", name)
        for variant in [name[:m.start()] + e + name[m.end():] for e in m.group(1).split(",")] if m else [name]:
            paths += sorted((ROOT / "docs/results-history/data").glob(variant))
    return [p for p in paths if p.name.endswith((".json", ".json.gz"))]


def environment_of(path: Path) -> dict:
    with (gzip.open if path.suffix == ".gz" else open)(path, "rt") as f:
        return json.load(f).get("environment", {})


def test_every_opening_row_cites_records_that_name_its_commit():
    text = RESULTS.read_text()
    rows = opening_rows(text)
    assert len(rows) >= 5, rows
    for row in rows:
        files = cited_records(section(text, row["section"]))
        assert files, f"{row['target']}: its section cites no result file"
        envs = {p.name: environment_of(p) for p in files}
        unstamped = [n for n, e in envs.items() if not (e.get("commit") and e.get("device") and e.get("date"))]
        assert not unstamped, f"{row['target']}: no environment record (benchmarks.core.records) in {unstamped}"
        assert any(e["commit"].startswith(c) or c.startswith(e["commit"]) for e in envs.values()
                   for c in row["commits"]), f"{row['target']}: none of {sorted(envs)} names {row['commits']}"


def test_benchmarks_readme_names_sections_that_exist():
    """benchmarks/README.md's table maps each question to a RESULTS.md section: each named section must exist."""
    headings = re.findall(r"^## (.+)$", RESULTS.read_text(), re.M)
    table = (ROOT / "benchmarks" / "README.md").read_text()
    named = [line.rstrip().rstrip("|").rsplit("|", 1)[-1].strip() for line in table.splitlines()
             if line.startswith("| ") and not line.startswith(("| question", "|---"))]
    missing = [n for n in named if not n.startswith(("(", "-", "the diary")) and not any(
        h.startswith(n.split(" (")[0]) for h in headings)]
    assert named and not missing, missing
