"""Benchmarks of ttt-e2e, run as `python -m benchmarks.<area>.<name>` from the repository root (benchmarks/README.md
maps each question to its command)."""
