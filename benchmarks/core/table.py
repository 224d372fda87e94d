"""The table printer: markdown tables (what RESULTS.md holds), headed by the environment line."""
from __future__ import annotations

from benchmarks.core.env import describe


def cell(x, digits: int = 4) -> str:
    """A number to `digits` significant figures, None as "-", anything else as its str."""
    if x is None:
        return "-"
    if isinstance(x, float):
        return f"{x:.{digits}g}"
    return str(x)


def markdown(headers: list[str], rows: list[list], digits: int = 4) -> str:
    lines = ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
    lines += ["| " + " | ".join(cell(x, digits) for x in row) + " |" for row in rows]
    return "\n".join(lines)


def print_table(headers: list[str], rows: list[list], env: dict | None = None, note: str = "",
                digits: int = 4) -> str:
    """Print (and return) the environment line, an optional note and the table, flushed: the last lines a
    benchmark prints."""
    head = describe(env) if env else ""
    text = "\n".join(x for x in (head + (f"; {note}" if note else "") if head else note,
                                 markdown(headers, rows, digits)) if x)
    print("\n" + text, flush=True)
    return text
