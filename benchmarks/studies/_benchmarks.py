"""Imported first by the studies: puts benchmarks/ on sys.path, for the maintained scripts' helpers they reuse
(timing.py, attention.py, latency.py)."""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
