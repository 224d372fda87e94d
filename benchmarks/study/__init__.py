"""The loss-vs-context study (docs/study.md), by phase: data.py (corpora and tokenizer), runs.py (training all
jobs at once), evaluation.py (loss by position, test-time-only TTT, needle), report.py (tables and plots);
__main__.py runs them in one command: python -m benchmarks.study."""
