"""Suite-wide: tests marked `gpu` are skipped on a machine without CUDA (markers are declared in pyproject), and
without CUDA the Triton kernels run in Triton's interpreter.

`triton.jit` chooses interpreter or compiler when a kernel is defined, so TRITON_INTERPRET must be set before
anything imports the kernel modules: here, before any test module is collected.
"""
import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ["TRITON_INTERPRET"] = "1"


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)
