"""The trainer's precision: `ttt_e2e/precision.py`, the one place that resolves model.compute_dtype."""
from ttt_e2e.precision import autocast, autocast_dtype, param_dtype

__all__ = ["autocast", "autocast_dtype", "param_dtype"]
