"""benchmarks/kernels/attention_share.py: the attention speed-up its flatness figure quotes, and which kernels it counts
as attention."""
import re
from pathlib import Path
from types import SimpleNamespace

import torch

from benchmarks.core.timing import kernel_launches
from benchmarks.kernels import attention_share

ROOT = Path(__file__).parents[2]


def _ratio(first, steady, x):
    """steady / first us per token with the attention x times faster."""
    a, A = first["attention_us"], steady["attention_us"]
    return (steady["wall_us"] - A + A / x) / (first["wall_us"] - a + a / x)


def test_required_speedup_gives_the_target_ratio():
    share = attention_share
    first, steady = {"attention_us": 5.1, "wall_us": 22.2}, {"attention_us": 10.1, "wall_us": 27.4}
    x = share.required_speedup(first, steady, 1.15)
    assert x > 1 and abs(_ratio(first, steady, x) - 1.15) < 1e-12
    assert _ratio(first, steady, 0.99 * x) > 1.15 > _ratio(first, steady, 1.01 * x)
    # The rest alone costs more than the target allows: no attention speed reaches it
    assert share.required_speedup({"attention_us": 5.0, "wall_us": 15.0}, {"attention_us": 10.0, "wall_us": 30.0},
                                  1.15) is None


def test_attention_is_every_swa_kernel_and_nothing_else():
    share = attention_share
    kernels = {}
    for path in (ROOT / "kernels").rglob("*.py"):
        for name in re.findall(r"^def (_\w+_kernel)\(", path.read_text(), re.M):
            kernels[name] = path.parent.name
    assert sum(op == "swa" for op in kernels.values()) >= 6 and len(kernels) > 12, kernels
    for name, op in kernels.items():
        assert share.is_attention(name) == (op == "swa"), (name, op)


def test_kernel_launches_groups_gpu_kernels_by_name():
    cuda, cpu = torch.autograd.DeviceType.CUDA, torch.autograd.DeviceType.CPU
    events = [SimpleNamespace(device_type=cuda, name="_swa_fwd_kernel", device_time=2.0),
              SimpleNamespace(device_type=cuda, name="gemm<bf16, 128>", device_time=1.0),
              SimpleNamespace(device_type=cpu, name="aten::mm", device_time=9.0),
              SimpleNamespace(device_type=cuda, name="gemm<bf16, 64>", device_time=3.0),
              SimpleNamespace(device_type=cuda, name="_swa_fwd_kernel", device_time=4.0)]
    launches = kernel_launches(SimpleNamespace(events=lambda: events))
    assert launches == {"_swa_fwd_kernel": [2.0, 4.0], "gemm": [1.0, 3.0]}
