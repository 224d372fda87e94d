"""The package's imports run one way (docs/ARCHITECTURE.md): no module imports one that imports it back, function-
level imports included, and the model imports nothing above it (no weight format, no trainer)."""
import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[2] / "ttt_e2e"


def _modules() -> dict[str, Path]:
    out = {}
    for f in PACKAGE.rglob("*.py"):
        parts = f.relative_to(PACKAGE.parent).with_suffix("").parts
        out[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = f
    return out


def import_graph() -> dict[str, set[str]]:
    """Module -> the package modules it imports anywhere in its file. `from pkg import name` counts pkg.name where
    that is a module, else pkg."""
    mods = _modules()
    graph = {m: set() for m in mods}
    for m, f in mods.items():
        package = m if f.name == "__init__.py" else m.rpartition(".")[0]
        for node in ast.walk(ast.parse(f.read_text())):
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    up = package.split(".")[:len(package.split(".")) - node.level + 1]
                    base = ".".join(up + ([base] if base else []))
                targets = [f"{base}.{a.name}" if f"{base}.{a.name}" in mods else base for a in node.names]
            else:
                continue
            graph[m] |= {t for t in targets if t in mods and t != m}
    return graph


def find_cycle(graph):
    state, path = {}, []

    def visit(u):
        state[u] = "open"
        path.append(u)
        for v in sorted(graph[u]):
            if state.get(v) == "open":
                return path[path.index(v):] + [v]
            if v not in state and (found := visit(v)):
                return found
        state[u] = "done"
        path.pop()
        return None

    for m in sorted(graph):
        if m not in state and (found := visit(m)):
            return found
    return None


def test_no_import_circle():
    assert find_cycle(import_graph()) is None


def test_the_cycle_finder_finds_one():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]


def test_the_model_imports_nothing_above_it():
    above = ("ttt_e2e.convert", "ttt_e2e.pretrained", "ttt_e2e.train", "ttt_e2e.inference", "ttt_e2e.eval",
             "ttt_e2e.ttt", "ttt_e2e.data")
    graph = import_graph()
    for m, targets in graph.items():
        if m.startswith("ttt_e2e.model"):
            assert not [t for t in targets if t.startswith(above)], m
