"""RMSNorm kernels vs the PyTorch reference in float64: forward, backward, double backward, on fresh random inputs
with ragged row counts and non-power-of-two widths (the interpreter on a CPU, compiled on a GPU)."""
import pytest
import torch

from ttt_e2e.kernels.rmsnorm import rms_norm, rms_norm_reference, rms_norm_residual

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
TOL = dict(rtol=2e-5, atol=2e-5)  # fp32 kernels against a float64 reference; an indexing slip gives O(1) errors
_seed = [99]


def _randn(*shape, scale=1.0):
    _seed[0] += 1
    g = torch.Generator().manual_seed(_seed[0])
    return (torch.randn(*shape, generator=g, dtype=torch.float64) * scale).to(DEVICE)


# (1027, 1000): 257 row blocks, so the weight-gradient kernels give each program several (3), the last ones
# partly and wholly past the end
@pytest.mark.parametrize("shape", [(37, 16), (2, 5, 80), (3, 7, 4, 96), (1, 200), (1027, 1000)])
def test_forward_and_backward(shape):
    x, w, dy = _randn(*shape, scale=3.0), 1 + _randn(shape[-1], scale=0.2), _randn(*shape)
    x32, w32 = x.float().requires_grad_(), w.float().requires_grad_()
    x64, w64 = x.clone().requires_grad_(), w.clone().requires_grad_()
    y = rms_norm(x32, w32, 1e-6, use_kernel=True)
    ref = rms_norm_reference(x64, w64, 1e-6)
    torch.testing.assert_close(y.double(), ref, **TOL)
    got = torch.autograd.grad(y, (x32, w32), dy.float())
    want = torch.autograd.grad(ref, (x64, w64), dy)
    for a, b in zip(got, want):
        torch.testing.assert_close(a.double(), b, **TOL)


@pytest.mark.parametrize("shape", [(37, 16), (3, 7, 4, 96), (1027, 1000)])
def test_backward_of_x_alone(shape):
    """A constant gain (inference's inner step): dx alone, from a launch of one row block per program, not the
    dw-reducing launch's few programs that loop over row blocks."""
    x, w, dy = _randn(*shape, scale=3.0), 1 + _randn(shape[-1], scale=0.2), _randn(*shape)
    x32, x64 = x.float().requires_grad_(), x.clone().requires_grad_()
    got, = torch.autograd.grad(rms_norm(x32, w.float(), 1e-6, use_kernel=True), x32, dy.float())
    want, = torch.autograd.grad(rms_norm_reference(x64, w, 1e-6), x64, dy)
    torch.testing.assert_close(got.double(), want, **TOL)


@pytest.mark.parametrize("shape", [(37, 16), (2, 5, 80), (1027, 1000)])
@pytest.mark.parametrize("probe", ["dx and dw", "dx only", "dw only"])
def test_double_backward(shape, probe):
    """The meta-gradient pattern: an inner gradient taken with create_graph, then differentiated again (the inner
    gradient of TTT uses dx only; a plain double backward may use both)."""
    x, w, dy = _randn(*shape, scale=2.0), 1 + _randn(shape[-1], scale=0.2), _randn(*shape)
    probe_x, probe_w = _randn(*shape), _randn(shape[-1])

    def second(x, w, dy, kernel):
        x, w, dy = (t.clone().requires_grad_() for t in (x, w, dy))
        y = rms_norm(x, w, 1e-6, use_kernel=kernel) if kernel else rms_norm_reference(x, w, 1e-6)
        gx, gw = torch.autograd.grad(y, (x, w), dy, create_graph=True)
        terms = {"dx": (gx * probe_x.to(gx.dtype)).sum(), "dw": (gw * probe_w.to(gw.dtype)).sum()}
        grads = torch.autograd.grad(sum(terms[k] for k in ("dx", "dw") if k in probe), (x, w, dy),
                                    allow_unused=True)  # dw does not depend on w
        return [torch.zeros_like(t) if g is None else g for g, t in zip(grads, (x, w, dy))]

    got = second(x.float(), w.float(), dy.float(), True)
    want = second(x, w, dy, False)
    for a, b in zip(got, want):
        torch.testing.assert_close(a.double(), b, rtol=1e-4, atol=1e-4)


def test_inner_gradient_skips_the_gain(monkeypatch):
    """TTT's pattern: the inner gradient (torch.func) w.r.t. x, for which the gain w is a constant, computes no
    gain gradient; the outer gradient w.r.t. both, through it, still equals the reference's."""
    from ttt_e2e.kernels.rmsnorm import function
    need = []
    real = function.rms_norm_bwd
    monkeypatch.setattr(function, "rms_norm_bwd", lambda *a: need.append(a[-1]) or real(*a))
    x, w, probe = _randn(37, 80, scale=2.0), 1 + _randn(80, scale=0.2), _randn(37, 80)

    def outer(x, w, kernel):  # the meta step's: torch.func inside, autograd outside
        x, w = x.clone().requires_grad_(), w.clone().requires_grad_()

        def inner(x):
            y = rms_norm(x, w, 1e-6, use_kernel=True) if kernel else rms_norm_reference(x, w, 1e-6)
            return (y * y.detach()).sum()  # any loss of y
        return torch.autograd.grad((torch.func.grad(inner)(x) * probe.to(x.dtype)).sum(), (x, w))

    got, want = outer(x.float(), w.float(), True), outer(x, w, False)
    assert need == [False], need  # the inner backward, w.r.t. x only
    for a, b in zip(got, want):
        torch.testing.assert_close(a.double(), b, **TOL)


def test_half_precision_input_keeps_its_dtype():
    x = _randn(9, 64).to(torch.float16)
    w = torch.ones(64, dtype=torch.float32, device=DEVICE)
    y = rms_norm(x, w, 1e-6, use_kernel=True)
    assert y.dtype == torch.float16
    torch.testing.assert_close(y.float(), rms_norm_reference(x, w, 1e-6).float(), rtol=1e-3, atol=1e-3)


def test_bad_weight_shape():
    with pytest.raises(ValueError, match="does not match the last dim"):
        rms_norm(_randn(3, 8).float(), torch.ones(7, device=DEVICE), 1e-6, use_kernel=True)



def test_shared_gain_adds_up_every_use_once(monkeypatch):
    """The meta step's pattern with a gain used in several norms, inside and outside an inner gradient: with
    shared_gain the uses leave partial sums and one node adds them (none reduced per use); the gradients equal the
    plain kernels' and the reference's. A part that comes after the sum is an error."""
    from ttt_e2e.kernels.rmsnorm import function
    from ttt_e2e.model.linear import shared_gain

    totals = []
    real_total = function.GainGrad.total
    monkeypatch.setattr(function.GainGrad, "total", lambda self: totals.append(len(self.parts)) or real_total(self))
    xs = [_randn(29, 48, scale=2.0) for _ in range(3)]
    w, probe = 1 + _randn(48, scale=0.2), _randn(29, 48)

    def outer(xs, w, kernel, share):
        xs = [x.clone().requires_grad_() for x in xs]
        w = w.clone().requires_grad_()
        g = shared_gain(w) if share else w

        def norm(x):
            return rms_norm(x, g, 1e-6, use_kernel=kernel) if kernel else rms_norm_reference(x, g, 1e-6)

        def inner(x):  # an inner loss through two uses of the gain
            y = norm(norm(x) * 1.5 + x)
            return (y * y.detach()).sum()
        loss = sum((torch.func.grad(inner)(x) * probe.to(x.dtype)).sum() + norm(x).square().sum() for x in xs)
        return torch.autograd.grad(loss, (*xs, w))

    got = outer([x.float() for x in xs], w.float(), True, True)
    # Per x: the double backward of the inner gradient's two norm backwards, the outer backward of the first norm
    # (the second's output reaches the outer loss only detached) and of the plain use
    assert totals == [3 * (2 + 1 + 1)], totals
    plain = outer([x.float() for x in xs], w.float(), True, False)
    want = outer(xs, w, False, False)
    assert totals == [12], totals  # the plain path defers nothing
    for a, b, c in zip(got, plain, want):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(a.double(), c, **TOL)

    acc = function.GainGrad()
    acc.total()
    with pytest.raises(RuntimeError, match="after the gain's gradient was formed"):
        acc.add(torch.zeros(1, 4))


@pytest.mark.parametrize("out_dtype", [torch.float16, torch.bfloat16])
def test_out_dtype_equals_norm_then_cast(out_dtype):
    """A pre-norm's result stored in the matmuls' dtype: the values of the norm in x's dtype followed by a cast,
    and the same gradients through an inner gradient and an outer one (the kernels widen dy and round grad dy as
    the cast's backward and double backward would). Bit for bit in the interpreter; compiled, the kernels for a
    16-bit dy may vectorize the row sums differently, so within fp32 rounding there (a truncating cast or a lost
    widening would be off by ~1e-3). bf16 on the GPU only: the interpreter's bf16 is not the GPU's."""
    if out_dtype == torch.bfloat16 and DEVICE == "cpu":
        pytest.skip("bf16 conversion in the Triton interpreter")
    x, w, probe = _randn(37, 80, scale=2.0), 1 + _randn(80, scale=0.2), _randn(37, 80)

    def outer(fused):
        xs, ws = x.float().requires_grad_(), w.float().requires_grad_()

        def inner(x):
            if fused:
                y = rms_norm(x, ws, 1e-6, use_kernel=True, out_dtype=out_dtype)
            else:
                y = rms_norm(x, ws, 1e-6, use_kernel=True).to(out_dtype)
            assert y.dtype == out_dtype
            return (y.float() * probe.float()).square().sum()
        g = torch.func.grad(inner)(xs)
        return (g, *torch.autograd.grad((g * probe.float()).sum(), (xs, ws)))

    for a, b in zip(outer(True), outer(False)):
        if DEVICE == "cpu":
            assert torch.equal(a, b)
        else:
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("shape", [(2, 5, 3, 4, 16), (1, 9, 3, 2, 80)])  # (B, T, 3, H, D): a fused QKV output
@pytest.mark.parametrize("part", [0, 1])
def test_heads_of_a_fused_projection_read_in_place(monkeypatch, shape, part):
    """x = the q (or k) heads of a (B, T, 3, H, D) fused projection: rows of D, H of them contiguous per time
    step, the steps 3 H D apart. The kernels read it where it lies (no copy: checked by the pointer they get) and
    give the values, gradients and double-backward gradients of the reference on the same numbers; the gradient of
    x comes back in x's shape, contiguous."""
    from ttt_e2e.kernels.rmsnorm import function

    qkv, w = _randn(*shape, scale=2.0), 1 + _randn(shape[-1], scale=0.2)
    dy, probe = _randn(*shape[:2], *shape[3:]), _randn(*shape[:2], *shape[3:])
    seen = []
    real = function.rms_norm_fwd

    def second(qkv, w, kernel):
        qkv, w = qkv.clone().requires_grad_(), w.clone().requires_grad_()
        x = qkv[:, :, part]
        y = rms_norm(x, w, 1e-6, use_kernel=True) if kernel else rms_norm_reference(x, w, 1e-6)
        gx, gw = torch.autograd.grad(y, (qkv, w), dy.to(y.dtype), create_graph=True)
        outer = (gx[:, :, part] * probe.to(gx.dtype)).sum() + gw.square().sum()
        return (y, gx, gw, *torch.autograd.grad(outer, (qkv, w))), x.data_ptr()

    with monkeypatch.context() as m:
        m.setattr(function, "rms_norm_fwd", lambda x, *a: seen.append(x.data_ptr()) or real(x, *a))
        got, ptr = second(qkv.float(), w.float(), True)
    assert seen == [ptr]  # the view itself, not a contiguous copy
    want, _ = second(qkv, w, False)
    for a, b in zip(got, want):
        torch.testing.assert_close(a.double(), b, rtol=1e-4, atol=1e-4)
    assert got[1][:, :, 1 - part].abs().max() == 0  # the other part of the projection gets nothing


def test_row_layout():
    from ttt_e2e.kernels.rmsnorm.kernel import row_layout

    qkv = torch.empty(2, 5, 3, 4, 16)
    assert row_layout(qkv) == (1, 16)
    assert row_layout(qkv[:, :, 1]) == (4, 3 * 4 * 16)
    assert row_layout(qkv[:1, :, 2]) == (4, 3 * 4 * 16)
    assert row_layout(qkv[:, :1, 0]) == (4, 5 * 3 * 4 * 16)  # one time step: the batch's stride
    assert row_layout(qkv[:, :, 1, :, :8]) is None  # rows not contiguous
    assert row_layout(qkv.transpose(0, 1)[:, :, 1]) is None  # the leading dims do not collapse
    assert row_layout(qkv[:, :, 1].transpose(1, 2)) is None  # heads inside time: groups not contiguous


@pytest.mark.parametrize("shape", [(37, 16), (2, 5, 80), (3, 1000)])
@pytest.mark.parametrize("dtypes", [(torch.float32, torch.float32), (torch.float32, torch.float16),
                                    (torch.float16, torch.float16)])
def test_residual_add_in_one_pass(shape, dtypes):
    """res + rms_norm(x) where nothing is differentiated: one kernel, the same values as the two ops (the norm
    rounded to x's dtype, the sum in the promoted dtype), and the float64 reference's up to that rounding."""
    res_dtype, x_dtype = dtypes
    res, x, w = _randn(*shape), _randn(*shape, scale=3.0), 1 + _randn(shape[-1], scale=0.2)
    res, x, w = res.to(res_dtype), x.to(x_dtype), w.float()
    with torch.no_grad():
        got = rms_norm_residual(res, x, w, 1e-6, use_kernel=True)
        two_ops = res + rms_norm(x, w, 1e-6, use_kernel=True)
    assert got.dtype == two_ops.dtype == torch.promote_types(res_dtype, x_dtype)
    tol = TOL if x_dtype == torch.float32 else dict(rtol=2e-3, atol=2e-3)
    torch.testing.assert_close(got, two_ops, **tol)
    ref = res.double() + rms_norm_reference(x.double(), w.double(), 1e-6)
    torch.testing.assert_close(got.double(), ref, **tol)


def test_residual_add_of_strided_heads_and_under_grad():
    qkv = _randn(2, 5, 3, 4, 16, scale=2.0)
    x, res, w = qkv[:, :, 1], _randn(2, 5, 4, 16), 1 + _randn(16, scale=0.2)
    with torch.no_grad():
        got = rms_norm_residual(res.float(), x.float(), w.float(), 1e-6, use_kernel=True)
    torch.testing.assert_close(got.double(), res + rms_norm_reference(x, w, 1e-6), **TOL)
    # grad mode on: the differentiable ops, whose gradient reaches x
    xg = x.float().requires_grad_()
    (gx,) = torch.autograd.grad(rms_norm_residual(res.float(), xg, w.float(), 1e-6, use_kernel=True).sum(), xg)
    x64 = x.clone().requires_grad_()
    (want,) = torch.autograd.grad((res + rms_norm_reference(x64, w, 1e-6)).sum(), x64)
    torch.testing.assert_close(gx.double(), want, **TOL)


def test_residual_add_first_order_backward():
    """first_order: one kernel forward, and the gradients w.r.t. res, x and w of res + rms_norm(x) (those of the
    reference); no second derivative."""
    res, x, w, dy = _randn(37, 80), _randn(37, 80, scale=3.0), 1 + _randn(80, scale=0.2), _randn(37, 80)
    ins = [t.float().requires_grad_() for t in (res, x, w)]
    y = rms_norm_residual(*ins, 1e-6, use_kernel=True, first_order=True)
    got = torch.autograd.grad(y, ins, dy.float(), create_graph=True)
    ref = [t.clone().requires_grad_() for t in (res, x, w)]
    want = torch.autograd.grad(ref[0] + rms_norm_reference(ref[1], ref[2], 1e-6), ref, dy)
    for a, b in zip(got, want):
        torch.testing.assert_close(a.double(), b, **TOL)
    with pytest.raises(NotImplementedError, match="no second derivative"):
        torch.autograd.grad(got[1].sum(), ins[1])


@pytest.mark.parametrize("dtypes", [(torch.float32, torch.float32), (torch.float16, torch.float16),
                                    (torch.float16, torch.float32)])
def test_residual_add_then_next_norm(dtypes):
    """then: s = res + rms_norm(x) and z = rms_norm(s, w2) (in out_dtype2) in one kernel: the values of the three
    ops (eps2 large enough to matter), and the first-order gradients w.r.t. res, x, w and w2 for cotangents of both
    s and z, or of z alone (the pre-norm's dx kernel adds s's two cotangents); no second derivative."""
    x_dtype, out2 = dtypes
    res, x, dy, dz = _randn(37, 80), _randn(37, 80, scale=3.0), _randn(37, 80), _randn(37, 80)
    w, w2 = 1 + _randn(80, scale=0.2), 1 + _randn(80, scale=0.2)
    tol = TOL if x_dtype == torch.float32 else dict(rtol=2e-3, atol=2e-3)
    gtol = TOL if x_dtype == torch.float32 else dict(rtol=2e-2, atol=2e-2)  # fp16 gradients through two norms
    with torch.no_grad():
        s, z = rms_norm_residual(res.to(x_dtype), x.to(x_dtype), w.float(), 1e-6, use_kernel=True,
                                 then=(w2.float(), 0.3, out2))
        s_ops = res.to(x_dtype) + rms_norm(x.to(x_dtype), w.float(), 1e-6, use_kernel=True)
        z_ops = rms_norm(s_ops, w2.float(), 0.3, use_kernel=True, out_dtype=out2)
    assert s.dtype == x_dtype and z.dtype == out2
    torch.testing.assert_close(s, s_ops, **tol)
    torch.testing.assert_close(z, z_ops, **tol)
    for cot_s in (dy, None):
        ins = [t.to(x_dtype).requires_grad_() for t in (res, x)] + [t.float().requires_grad_() for t in (w, w2)]
        s, z = rms_norm_residual(*ins[:3], 1e-6, use_kernel=True, first_order=True, then=(ins[3], 0.3, out2))
        outs, cots = ((s, z), (cot_s.to(x_dtype), dz.to(out2))) if cot_s is not None else ((z,), (dz.to(out2),))
        got = torch.autograd.grad(outs, ins, cots, create_graph=True)
        ref = [t.clone().requires_grad_() for t in (res, x, w, w2)]
        s64 = ref[0] + rms_norm_reference(ref[1], ref[2], 1e-6)
        z64 = rms_norm_reference(s64, ref[3], 0.3)
        want = torch.autograd.grad((s64, z64) if cot_s is not None else (z64,), ref,
                                   (cot_s, dz) if cot_s is not None else (dz,))
        for a, b in zip(got, want):
            torch.testing.assert_close(a.double(), b, **gtol)
    with pytest.raises(NotImplementedError, match="no second derivative"):
        torch.autograd.grad(got[1].sum(), ins[1])
