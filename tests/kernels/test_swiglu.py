"""SwiGLU gate kernels vs the PyTorch reference in float64: forward, backward, double backward, on fresh random
inputs with ragged sizes and more than one block, the halves taken along the last dim (the MLP's fused (W1; W3)
output) or an inner one (the MLP''s per-sequence (B, 2 hidden, T) product) (the interpreter on a CPU, compiled on a
GPU)."""
import pytest
import torch

from ttt_e2e.kernels.swiglu import swiglu_gate, swiglu_gate_reference

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
TOL = dict(rtol=2e-5, atol=2e-5)  # fp32 kernels against a float64 reference; an indexing slip gives O(1) errors
# (ab's shape, dim): ragged tails; several blocks of 1024; halves along dim 1 of (B, 2 h, T), inner = h T
CASES = [((74,), 0), ((3, 5, 260), -1), ((2, 2062), -1), ((4, 1400), -1), ((2, 10, 131), 1), ((3, 8, 5, 7), 1)]
_seed = [199]


def _randn(*shape, scale=1.0):
    _seed[0] += 1
    g = torch.Generator().manual_seed(_seed[0])
    return (torch.randn(*shape, generator=g, dtype=torch.float64) * scale).to(DEVICE)


def _half_shape(shape, dim):
    s = list(shape)
    s[dim] //= 2
    return tuple(s)


@pytest.mark.parametrize("shape, dim", CASES)
def test_forward_and_backward(shape, dim):
    ab, dy = _randn(*shape, scale=3.0), _randn(*_half_shape(shape, dim))
    ab32, ab64 = ab.float().requires_grad_(), ab.clone().requires_grad_()
    y = swiglu_gate(ab32, dim, use_kernel=True)
    ref = swiglu_gate_reference(ab64, dim)
    assert y.dtype == torch.float32 and y.shape == ref.shape and y.is_contiguous()
    torch.testing.assert_close(y.double(), ref, **TOL)
    got, = torch.autograd.grad(y, ab32, dy.float())
    want, = torch.autograd.grad(ref, ab64, dy)
    torch.testing.assert_close(got.double(), want, **TOL)


@pytest.mark.parametrize("shape, dim", CASES)
@pytest.mark.parametrize("probe", ["ua and ub", "ua only", "ub only"])
def test_double_backward(shape, dim, probe):
    """The meta-gradient pattern: an inner gradient taken with create_graph, then differentiated again (the probe
    leaves out the a or b half of the gradient's cotangent)."""
    ab, dy = _randn(*shape, scale=3.0), _randn(*_half_shape(shape, dim))
    pa, pb = _randn(*_half_shape(shape, dim)), _randn(*_half_shape(shape, dim))
    probe_ab = torch.cat((pa if "ua" in probe else 0 * pa, pb if "ub" in probe else 0 * pb), dim)

    def second(ab, dy, kernel):
        ab, dy = ab.clone().requires_grad_(), dy.clone().requires_grad_()
        y = swiglu_gate(ab, dim, use_kernel=True) if kernel else swiglu_gate_reference(ab, dim)
        dab, = torch.autograd.grad(y, ab, dy, create_graph=True)
        return torch.autograd.grad((dab * probe_ab.to(dab.dtype)).sum(), (ab, dy))

    got = second(ab.float(), dy.float(), True)
    want = second(ab, dy, False)
    for g, w in zip(got, want):
        torch.testing.assert_close(g.double(), w, rtol=1e-4, atol=1e-4)


def test_under_torch_func_grad():
    """The inner loop takes its gradient with torch.func.grad (through functional_call) and the meta-gradient
    differentiates it with autograd: needs the new-style forward + setup_context."""
    ab, probe = _randn(5, 134, scale=2.0), _randn(5, 134)

    def meta(ab, kernel):
        ab = ab.clone().requires_grad_()

        def inner(ab):
            y = swiglu_gate(ab, use_kernel=True) if kernel else swiglu_gate_reference(ab)
            return (y * y).sum()

        dab = torch.func.grad(inner)(ab)
        return torch.autograd.grad((dab * probe.to(dab.dtype)).sum() + (dab * dab).sum(), ab)

    for g, w in zip(meta(ab.float(), True), meta(ab, False)):
        torch.testing.assert_close(g.double(), w, rtol=1e-4, atol=1e-4)


def test_half_precision_input_keeps_its_dtype():
    ab = _randn(9, 260, scale=3.0).half()
    y = swiglu_gate(ab, use_kernel=True)
    assert y.dtype == torch.float16
    ref = swiglu_gate_reference(ab.double())  # the exact value for the same fp16 inputs
    torch.testing.assert_close(y.double(), ref, rtol=2 ** -10, atol=1e-4)  # one fp16 rounding (and fp32 math)


def test_no_third_derivative():
    ab, dy = _randn(74).float().requires_grad_(), _randn(37).float().requires_grad_()
    dab, = torch.autograd.grad(swiglu_gate(ab, use_kernel=True), ab, dy, create_graph=True)
    g, = torch.autograd.grad((dab * dab).sum(), ab, create_graph=True)
    with pytest.raises(RuntimeError, match="not have been used|once_differentiable"):
        torch.autograd.grad(g.sum(), ab)


def test_odd_split_is_refused():
    with pytest.raises(ValueError, match=r"\(3, 7\) must split in two equal halves along dim 1"):
        swiglu_gate(_randn(3, 7).float(), use_kernel=True)


def test_non_contiguous_input():
    """A transposed ab is made contiguous first: the same values as the reference."""
    ab = _randn(40, 6, scale=2.0).float().T  # (6, 40), halves along dim 1
    torch.testing.assert_close(swiglu_gate(ab, 1, use_kernel=True).double(),
                               swiglu_gate_reference(ab.double(), 1), **TOL)


@pytest.mark.gpu
def test_bf16_cuda_against_fp32_reference():
    ab = _randn(1, 1024, 2 * 1664, scale=3.0).to(torch.bfloat16)
    y = swiglu_gate(ab)  # the kernel by default on CUDA
    assert y.dtype == torch.bfloat16
    ref = swiglu_gate_reference(ab.float())
    torch.testing.assert_close(y.float(), ref, rtol=1e-2, atol=1e-2)
