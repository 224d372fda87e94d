"""The kernel tests must exercise the Triton path: on a machine without CUDA that is the interpreter, switched on
by tests/conftest.py before any kernel module is imported."""
import torch

if not torch.cuda.is_available():
    from ttt_e2e.kernels.swa import common

    assert common.INTERPRET, "TRITON_INTERPRET=1 must be set before ttt_e2e.kernels is imported (tests/conftest.py)"
