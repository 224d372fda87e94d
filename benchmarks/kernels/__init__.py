"""Kernel benchmarks: sliding-window attention against cuDNN/FlashAttention/flex (forward, backward, double
backward), its share of inference, tile and layout studies, the meta-gradient precision of the kernel path."""
