"""model.compute_dtype resolved in one place (ttt_e2e/precision.py) for the trainer and inference."""
import pytest
import torch

from ttt_e2e.config import ModelConfig
from ttt_e2e.precision import autocast_dtype

CPU, CUDA = torch.device("cpu"), torch.device("cuda")
bf16, fp32, fp64 = torch.bfloat16, torch.float32, torch.float64


@pytest.mark.parametrize("name, device, weights, want", [
    ("auto", CUDA, None, bf16), ("auto", CPU, None, None), ("auto", CUDA, bf16, bf16), ("auto", CPU, fp32, None),
    ("bfloat16", CPU, None, bf16), ("float16", CUDA, fp32, torch.float16), ("float32", CUDA, None, None),
    ("float32", CUDA, fp32, None), ("float64", CPU, fp64, None),
    ("float32", CUDA, bf16, fp32),  # half weights computed in fp32: autocast to it
])
def test_autocast_dtype(name, device, weights, want):
    assert autocast_dtype(ModelConfig(compute_dtype=name), device, weights) is want
