"""Run the SWA kernel tests through the Triton interpreter when there is no GPU.

`triton.jit` picks interpreter or compiler when a kernel is defined, so TRITON_INTERPRET must be set before the
kernel modules are imported. If something imported them earlier in this session (without the variable), reload
them so the tests exercise the Triton path rather than the materialized fallback.
"""

import importlib
import os
import sys

import torch

if not torch.cuda.is_available():
    os.environ["TRITON_INTERPRET"] = "1"
    _swa = "ttt_e2e.kernels.swa"
    if _swa in sys.modules and not sys.modules[_swa + ".common"].INTERPRET:
        for name in ("common", "tiles", "forward", "backward", "double_backward", "function"):
            importlib.reload(sys.modules[f"{_swa}.{name}"])
        importlib.reload(sys.modules[_swa])
