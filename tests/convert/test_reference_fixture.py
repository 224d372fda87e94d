"""The ground truth: the authors' JAX code's meta loss and meta-gradients on known weights (tests/fixtures/
reference_tiny, README there). Our model, converted from their checkpoint by `ttt_e2e.convert`, must compute the
same function: loss and the gradient of every parameter, mapped back to their paths, to relative error < 1e-5
(fp32 on the CPU; the fixture's README expects ~1e-7 and a few 1e-6 from fp32 rounding alone)."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from ttt_e2e.convert import from_jax, orbax_io
from ttt_e2e.convert.layout import to_reference
from ttt_e2e.pretrained import load_pretrained
from ttt_e2e.ttt.meta import sequence_loss

FIXTURE = Path(__file__).resolve().parents[1] / "fixtures" / "reference_tiny"
BOS = 1
needs_orbax = pytest.mark.skipif(not orbax_io.available(), reason="orbax-checkpoint not installed (pip install "
                                 "'ttt-e2e[jax]')")


@pytest.fixture(scope="module")
def converted(tmp_path_factory):
    """{source: our checkpoint dir converted from it}: weights.npz and, with orbax-checkpoint, orbax/."""
    out = tmp_path_factory.mktemp("converted")
    dirs = {"npz": from_jax(FIXTURE / "weights.npz", out / "npz")}
    if orbax_io.available():
        dirs["orbax"] = from_jax(FIXTURE / "orbax", out / "orbax")
    return dirs


def _rel(a, b) -> float:
    return float(np.linalg.norm(np.asarray(a, np.float64) - b) / np.linalg.norm(np.asarray(b, np.float64)))


@pytest.mark.parametrize("source,backend", [("npz", "torch"), ("npz", "triton"),
                                            pytest.param("orbax", "torch", marks=needs_orbax)])
def test_meta_loss_and_gradients_match_the_reference(converted, source, backend):
    model, cfg = load_pretrained(converted[source], overrides=[f"model.attention_backend={backend}"])
    assert (cfg.model.window, cfg.ttt.mini_batch_size, cfg.ttt.inner_lr, cfg.ttt.inner_grad_clip,
            cfg.ttt.ilr_init, cfg.ttt.ilr_warmup_steps) == (24, 16, 1.0, 1.0, 1.0, 0)
    assert next(model.parameters()).dtype == torch.float32  # compute_dtype auto: the parameters' on the CPU
    tokens = torch.from_numpy(np.load(FIXTURE / "tokens.npy")).long()[None]
    x, y = tokens[:, :-1], tokens[:, 1:]
    model.train()
    out = sequence_loss(model, x, y, y != BOS, cfg.ttt)
    out.loss.backward()
    ref = np.load(FIXTURE / "reference_out.npz")
    grads = to_reference({n: p.grad for n, p in model.named_parameters()}, cfg.model)
    want = {k[len("grad/"):] for k in ref.files if k.startswith("grad/")}
    assert set(grads) == want
    errors = {k: _rel(grads[k], ref["grad/" + k]) for k in sorted(want)}
    loss_err = abs(out.loss.item() - float(ref["loss"])) / abs(float(ref["loss"]))
    assert loss_err < 1e-5, (out.loss.item(), float(ref["loss"]))
    bad = {k: e for k, e in errors.items() if not e < 1e-5}
    assert not bad, bad


@needs_orbax
def test_orbax_and_npz_convert_to_the_same_weights(converted):
    a = torch.load(converted["npz"] / "model.pt", weights_only=True)
    b = torch.load(converted["orbax"] / "model.pt", weights_only=True)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) and a[k].dtype == b[k].dtype for k in a)
