"""Robust numerics: large mean, constant input, fp16 range, NaN isolation, very long rows."""

from __future__ import annotations

import pytest
import torch

import normkit
import normkit.functional as NF
from normkit.testing import assert_close

BACKENDS = ["reference", "torch"]
# normkit's own numerics (the torch backend is torch's: a constant -3.7e4 gives it nonzero output)
OWN_BACKENDS = [b for b in normkit.available_backends() if b != "torch"]

# (name, normkit fn, torch fn, input shape): each normalizes statistics sets of 64+ elements
NORMS = [
    ("layer_norm", lambda f, x: f.layer_norm(x, (x.shape[-1],)), (8, 4097)),
    ("group_norm", lambda f, x: f.group_norm(x, 2), (2, 4, 32, 33)),
    ("batch_norm", lambda f, x: f.batch_norm(x, None, None, training=True), (4, 3, 16, 17)),
    ("instance_norm", lambda f, x: f.instance_norm(x), (2, 3, 16, 17)),
]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("name,fn,shape", NORMS, ids=[n[0] for n in NORMS])
def test_large_mean_small_spread_is_normalized_as_well_as_torch(name, fn, shape, backend):
    """1e4 + N(0, 1) in fp32: E[x^2] - E[x]^2 would lose every digit of the variance here."""
    torch.manual_seed(0)
    x = 1e4 + torch.randn(shape)
    truth = fn(torch.nn.functional, x.double())
    with normkit.use_backend(backend):
        ours = fn(NF, x)
    assert_close(ours, truth, baseline=fn(torch.nn.functional, x))
    assert (ours.double() - truth).abs().max() < 1e-2  # the normalized values themselves are right


@pytest.mark.parametrize("backend", OWN_BACKENDS)
@pytest.mark.parametrize("name,fn,shape", NORMS, ids=[n[0] for n in NORMS])
@pytest.mark.parametrize("value", [0.0, 0.1, -3.7e4])
def test_constant_input_gives_zero_not_nan(name, fn, shape, value, backend):
    x = torch.full(shape, value).requires_grad_()
    with normkit.use_backend(backend):
        y = fn(NF, x)
        y.backward(torch.randn_like(y))
    assert torch.isfinite(y).all() and torch.isfinite(x.grad).all()
    assert y.abs().max() < 1e-2


@pytest.mark.parametrize("backend", BACKENDS)
def test_rms_norm_of_zeros_is_zero(backend):
    x = torch.zeros(3, 64, requires_grad=True)
    with normkit.use_backend(backend):
        y = NF.rms_norm(x, (64,))
        y.sum().backward()
    assert torch.equal(y, torch.zeros_like(y)) and torch.isfinite(x.grad).all()


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("norm", ["layer_norm", "rms_norm", "group_norm"])
def test_fp16_input_near_1000_does_not_overflow(norm, backend):
    """x^2 ~ 1e6 > 65504 (fp16's max): statistics must be accumulated in fp32."""
    torch.manual_seed(0)
    x = (1000 + 30 * torch.randn(4, 8, 256)).half()
    call = {
        "layer_norm": lambda f, t: f.layer_norm(t, (256,)),
        "rms_norm": lambda f, t: f.rms_norm(t, (256,)),
        "group_norm": lambda f, t: f.group_norm(t, 4),
    }[norm]
    with normkit.use_backend(backend):
        y = call(NF, x)
    assert y.dtype == torch.float16 and torch.isfinite(y).all()
    assert_close(y, call(torch.nn.functional, x.double()), baseline=call(torch.nn.functional, x))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("norm", ["layer_norm", "rms_norm"])
def test_nan_stays_in_its_row(norm, backend):
    x = torch.randn(5, 33)
    x[2, 7] = float("nan")
    call = (lambda f, t: f.layer_norm(t, (33,))) if norm == "layer_norm" else (lambda f, t: f.rms_norm(t, (33,)))
    with normkit.use_backend(backend):
        y = call(NF, x)
    assert torch.isnan(y[2]).all()
    others = torch.cat([y[:2], y[3:]])
    assert torch.isfinite(others).all()
    torch.testing.assert_close(others, call(torch.nn.functional, torch.cat([x[:2], x[3:]])))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("norm", ["layer_norm", "rms_norm"])
def test_rows_of_a_million_elements(norm, backend):
    torch.manual_seed(0)
    n = (1 << 20) + 3
    x = (torch.randn(2, n) * 2 + 5).requires_grad_()
    w = torch.rand(n) + 0.5
    dy = torch.randn(2, n)
    call = {
        "layer_norm": lambda f, t, w: f.layer_norm(t, (n,), w),
        "rms_norm": lambda f, t, w: f.rms_norm(t, (n,), w),
    }[norm]

    def run(f, x, w):
        x = x.detach().requires_grad_()
        y = call(f, x, w)
        return y, torch.autograd.grad(y, x, dy.to(x.dtype))[0]

    with normkit.use_backend(backend):
        y, dx = run(NF, x, w)
    y64, dx64 = run(torch.nn.functional, x.double(), w.double())
    y32, dx32 = run(torch.nn.functional, x, w)
    assert_close(y, y64, baseline=y32)
    assert_close(dx, dx64, baseline=dx32)
