"""Inference benchmarks: prefill and decode latency of the TTT engine against the baselines, and its traces."""
