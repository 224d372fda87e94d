"""Evaluation of trained checkpoints (eval.py): held-out loss by token position."""
