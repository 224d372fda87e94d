"""Evaluation benchmarks: the streaming evaluation path and the JAX checkpoint conversion round trip."""
