"""SwiGLU gate kernels vs the PyTorch reference in float64: forward, backward, double backward, on fresh random
inputs with ragged sizes and more than one block (the interpreter on a CPU, compiled on a GPU)."""
import pytest
import torch

from ttt_e2e.kernels.swiglu import swiglu_gate, swiglu_gate_reference

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
TOL = dict(rtol=2e-5, atol=2e-5)  # fp32 kernels against a float64 reference; an indexing slip gives O(1) errors
SHAPES = [(37,), (3, 5, 130), (2, 1031), (4, 700)]  # ragged tails; the last two span several blocks of 1024
_seed = [199]


def _randn(*shape, scale=1.0):
    _seed[0] += 1
    g = torch.Generator().manual_seed(_seed[0])
    return (torch.randn(*shape, generator=g, dtype=torch.float64) * scale).to(DEVICE)


@pytest.mark.parametrize("shape", SHAPES)
def test_forward_and_backward(shape):
    a, b, dy = _randn(*shape, scale=3.0), _randn(*shape), _randn(*shape)
    a32, b32 = a.float().requires_grad_(), b.float().requires_grad_()
    a64, b64 = a.clone().requires_grad_(), b.clone().requires_grad_()
    y = swiglu_gate(a32, b32, use_kernel=True)
    ref = swiglu_gate_reference(a64, b64)
    assert y.dtype == torch.float32 and y.shape == ref.shape
    torch.testing.assert_close(y.double(), ref, **TOL)
    got = torch.autograd.grad(y, (a32, b32), dy.float())
    want = torch.autograd.grad(ref, (a64, b64), dy)
    for g, w in zip(got, want):
        torch.testing.assert_close(g.double(), w, **TOL)


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("probe", ["ua and ub", "ua only", "ub only"])
def test_double_backward(shape, probe):
    """The meta-gradient pattern: an inner gradient taken with create_graph, then differentiated again (the probe
    leaves out da or db to exercise the kernel without that cotangent)."""
    a, b, dy = _randn(*shape, scale=3.0), _randn(*shape), _randn(*shape)
    probe_a, probe_b = _randn(*shape), _randn(*shape)

    def second(a, b, dy, kernel):
        a, b, dy = (t.clone().requires_grad_() for t in (a, b, dy))
        y = swiglu_gate(a, b, use_kernel=True) if kernel else swiglu_gate_reference(a, b)
        da, db = torch.autograd.grad(y, (a, b), dy, create_graph=True)
        terms = {"ua": (da * probe_a.to(da.dtype)).sum(), "ub": (db * probe_b.to(db.dtype)).sum()}
        grads = torch.autograd.grad(sum(terms[k] for k in ("ua", "ub") if k in probe), (a, b, dy),
                                    allow_unused=True)  # db does not depend on b
        return [torch.zeros_like(t) if g is None else g for g, t in zip(grads, (a, b, dy))]

    got = second(a.float(), b.float(), dy.float(), True)
    want = second(a, b, dy, False)
    for g, w in zip(got, want):
        torch.testing.assert_close(g.double(), w, rtol=1e-4, atol=1e-4)


def test_under_torch_func_grad():
    """The inner loop takes its gradient with torch.func.grad (through functional_call) and the meta-gradient
    differentiates it with autograd: needs the new-style forward + setup_context."""
    a, b, probe = _randn(5, 67, scale=2.0), _randn(5, 67), _randn(5, 67)

    def meta(a, b, kernel):
        a, b = a.clone().requires_grad_(), b.clone().requires_grad_()

        def inner(a, b):
            y = swiglu_gate(a, b, use_kernel=True) if kernel else swiglu_gate_reference(a, b)
            return (y * y).sum()

        da, db = torch.func.grad(inner, argnums=(0, 1))(a, b)
        return torch.autograd.grad((da * probe.to(da.dtype)).sum() + (db * db).sum(), (a, b))

    for g, w in zip(meta(a.float(), b.float(), True), meta(a, b, False)):
        torch.testing.assert_close(g.double(), w, rtol=1e-4, atol=1e-4)


def test_half_precision_input_keeps_its_dtype():
    a, b = _randn(9, 130, scale=3.0).half(), _randn(9, 130).half()
    y = swiglu_gate(a, b, use_kernel=True)
    assert y.dtype == torch.float16
    ref = swiglu_gate_reference(a.double(), b.double())  # the exact value for the same fp16 inputs
    torch.testing.assert_close(y.double(), ref, rtol=2 ** -10, atol=1e-4)  # one fp16 rounding (and fp32 math)


def test_no_third_derivative():
    a, b, dy = (_randn(37).float().requires_grad_() for _ in range(3))
    da, db = torch.autograd.grad(swiglu_gate(a, b, use_kernel=True), (a, b), dy, create_graph=True)
    ga, = torch.autograd.grad((da * da).sum() + db.sum(), a, create_graph=True)
    with pytest.raises(RuntimeError, match="not have been used|once_differentiable"):
        torch.autograd.grad(ga.sum(), a)


def test_mismatched_inputs():
    with pytest.raises(ValueError, match=r"\(3, 8\).*\(3, 7\)"):
        swiglu_gate(_randn(3, 8).float(), _randn(3, 7).float(), use_kernel=True)
    with pytest.raises(ValueError, match="float32.*float16"):
        swiglu_gate(_randn(3, 8).float(), _randn(3, 8).half(), use_kernel=True)


@pytest.mark.gpu
def test_bf16_cuda_against_fp32_reference():
    a = _randn(1, 1024, 1664, scale=3.0).to(torch.bfloat16)
    b = _randn(1, 1024, 1664).to(torch.bfloat16)
    y = swiglu_gate(a, b)  # the kernel by default on CUDA
    assert y.dtype == torch.bfloat16
    ref = swiglu_gate_reference(a.float(), b.float())
    torch.testing.assert_close(y.float(), ref, rtol=1e-2, atol=1e-2)
