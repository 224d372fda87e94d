"""Training-step benchmarks: the meta step, its FLOPs and profile, data/model parallelism and scaling."""
