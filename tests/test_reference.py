"""The readable reference: forward equals torch in float64, hand-derived backward equals autograd.

The reference functions are plain torch ops, so autograd can differentiate them directly; that
autograd gradient is the check on each hand-written ``*_backward``.
"""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import normkit
from normkit import reference as ref
from normkit.testing import assert_close

torch.manual_seed(0)
F64 = dict(dtype=torch.float64)


def _grads(outputs, inputs, dy):
    inputs = [t for t in inputs if t is not None]
    return torch.autograd.grad(outputs, inputs, dy)


def _params(c, weight=True, bias=True):
    w = (torch.rand(c, **F64) + 0.5).requires_grad_() if weight else None
    b = torch.randn(c, **F64).requires_grad_() if bias else None
    return w, b


SHAPES_NCL = [(2, 3, 5), (4, 6, 7, 3), (1, 4, 2, 3, 2), (3, 2, 1023)]


@pytest.mark.parametrize("shape", SHAPES_NCL)
@pytest.mark.parametrize("affine", [True, False])
def test_batch_norm_train_forward_and_backward(shape, affine):
    x = torch.randn(shape, **F64).requires_grad_()
    w, b = _params(shape[1], affine, affine)
    rm, rv = torch.zeros(shape[1], **F64), torch.ones(shape[1], **F64)
    y, mean, rstd = ref.batch_norm(x, rm, rv, w, b, True, 0.1, 1e-5)
    trm, trv = torch.zeros(shape[1], **F64), torch.ones(shape[1], **F64)
    torch.testing.assert_close(y, torch.nn.functional.batch_norm(x, trm, trv, w, b, True, 0.1, 1e-5))
    torch.testing.assert_close((rm, rv), (trm, trv))
    dy = torch.randn_like(y)
    auto = _grads(y, [x, w, b], dy)
    dx, dw, db = ref.batch_norm_backward(dy, x.detach(), w, mean, rstd, training=True)
    torch.testing.assert_close(dx, auto[0])
    if affine:
        torch.testing.assert_close((dw, db), tuple(auto[1:]))


@pytest.mark.parametrize("shape", SHAPES_NCL)
def test_batch_norm_eval_backward(shape):
    x = torch.randn(shape, **F64).requires_grad_()
    w, b = _params(shape[1])
    rm, rv = torch.randn(shape[1], **F64), torch.rand(shape[1], **F64) + 0.5
    y, mean, rstd = ref.batch_norm(x, rm, rv, w, b, False, 0.1, 1e-5)
    torch.testing.assert_close(y, torch.nn.functional.batch_norm(x, rm, rv, w, b, False, 0.1, 1e-5))
    dy = torch.randn_like(y)
    auto = _grads(y, [x, w, b], dy)
    got = ref.batch_norm_backward(dy, x.detach(), w, mean, rstd, training=False)
    torch.testing.assert_close(got, tuple(auto))


@pytest.mark.parametrize("shape,k", [((3, 7), 1), ((2, 5, 4), 2), ((4099,), 1), ((2, 3, 2, 5), 3), ((0, 6), 1)])
@pytest.mark.parametrize("affine", [True, False])
def test_layer_norm(shape, k, affine):
    ns = shape[len(shape) - k :]
    x = torch.randn(shape, **F64).requires_grad_()
    w = (torch.rand(ns, **F64) + 0.5).requires_grad_() if affine else None
    b = torch.randn(ns, **F64).requires_grad_() if affine else None
    y, mean, rstd = ref.layer_norm(x, ns, w, b, 1e-5)
    torch.testing.assert_close(y, torch.nn.functional.layer_norm(x, ns, w, b, 1e-5))
    dy = torch.randn_like(y)
    auto = _grads(y, [x, w, b], dy) if x.numel() else (torch.zeros_like(x),)
    dx, dw, db = ref.layer_norm_backward(dy, x.detach(), ns, w, mean, rstd)
    torch.testing.assert_close(dx, auto[0])
    if affine:
        expected = tuple(auto[1:]) if x.numel() else (torch.zeros_like(w), torch.zeros_like(b))
        torch.testing.assert_close((dw, db), expected)


@pytest.mark.parametrize("shape,k", [((3, 7), 1), ((2, 5, 4), 2), ((4099,), 1), ((2, 3, 2, 5), 3)])
@pytest.mark.parametrize("eps", [None, 1e-6])
def test_rms_norm(shape, k, eps):
    ns = shape[len(shape) - k :]
    x = torch.randn(shape, **F64).requires_grad_()
    w = (torch.rand(ns, **F64) + 0.5).requires_grad_()
    y, rstd = ref.rms_norm(x, ns, w, eps)
    torch.testing.assert_close(y, torch.nn.functional.rms_norm(x, ns, w, eps))
    dy = torch.randn_like(y)
    auto = _grads(y, [x, w], dy)
    torch.testing.assert_close(ref.rms_norm_backward(dy, x.detach(), ns, w, rstd), tuple(auto))


@pytest.mark.parametrize(
    "shape,groups", [((2, 6, 5), 3), ((3, 4, 3, 3), 1), ((2, 6, 2, 3, 2), 6), ((4, 8), 2), ((1, 10, 7), 5)]
)
def test_group_norm(shape, groups):
    x = torch.randn(shape, **F64).requires_grad_()
    w, b = _params(shape[1])
    y, mean, rstd = ref.group_norm(x, groups, w, b, 1e-5)
    assert mean.shape == rstd.shape == (shape[0], groups)
    torch.testing.assert_close(y, torch.nn.functional.group_norm(x, groups, w, b, 1e-5))
    dy = torch.randn_like(y)
    auto = _grads(y, [x, w, b], dy)
    torch.testing.assert_close(ref.group_norm_backward(dy, x.detach(), groups, w, mean, rstd), tuple(auto))


@pytest.mark.parametrize("shape", [(2, 3, 5), (3, 4, 3, 3), (2, 2, 2, 3, 2)])
@pytest.mark.parametrize("use_input_stats", [True, False])
def test_instance_norm(shape, use_input_stats):
    x = torch.randn(shape, **F64).requires_grad_()
    w, b = _params(shape[1])
    rm, rv = torch.randn(shape[1], **F64), torch.rand(shape[1], **F64) + 0.5
    trm, trv = rm.clone(), rv.clone()
    y, mean, rstd = ref.instance_norm(x, rm, rv, w, b, use_input_stats, 0.3, 1e-5)
    expected = torch.nn.functional.instance_norm(x, trm, trv, w, b, use_input_stats, 0.3, 1e-5)
    torch.testing.assert_close(y, expected)
    torch.testing.assert_close((rm, rv), (trm, trv))
    dy = torch.randn_like(y)
    auto = _grads(y, [x, w, b], dy)
    got = ref.instance_norm_backward(dy, x.detach(), w, mean, rstd, use_input_stats)
    torch.testing.assert_close(got, tuple(auto))


def test_group_norm_with_one_group_per_channel_is_instance_norm():
    x = torch.randn(3, 4, 5, 6, **F64)
    w, b = _params(4)
    gn = ref.group_norm(x, 4, w, b, 1e-5)[0]
    inn = ref.instance_norm(x, None, None, w, b, True, 0.1, 1e-5)[0]
    torch.testing.assert_close(gn, inn)


@settings(max_examples=25, deadline=None)
@given(
    n=st.integers(1, 4),
    groups=st.integers(1, 4),
    per_group=st.integers(1, 3),
    spatial=st.lists(st.integers(1, 6), min_size=0, max_size=2),
)
def test_group_norm_backward_matches_autograd_for_generated_shapes(n, groups, per_group, spatial):
    shape = (n, groups * per_group, *spatial)
    if n * per_group * math.prod(spatial) == 1:  # one value per group: torch refuses, nothing to test
        return
    x = torch.randn(shape, **F64).requires_grad_()
    w, b = _params(shape[1])
    y, mean, rstd = ref.group_norm(x, groups, w, b, 1e-5)
    dy = torch.randn_like(y)
    auto = _grads(y, [x, w, b], dy)
    torch.testing.assert_close(ref.group_norm_backward(dy, x.detach(), groups, w, mean, rstd), tuple(auto))


@settings(max_examples=25, deadline=None)
@given(shape=st.lists(st.integers(1, 9), min_size=1, max_size=4), data=st.data())
def test_layer_and_rms_backward_match_autograd_for_generated_shapes(shape, data):
    k = data.draw(st.integers(1, len(shape)))
    ns = tuple(shape[len(shape) - k :])
    x = torch.randn(shape, **F64).requires_grad_()
    w = (torch.rand(ns, **F64) + 0.5).requires_grad_()
    b = torch.randn(ns, **F64).requires_grad_()
    y, mean, rstd = ref.layer_norm(x, ns, w, b, 1e-5)
    dy = torch.randn_like(y)
    torch.testing.assert_close(ref.layer_norm_backward(dy, x.detach(), ns, w, mean, rstd), _grads(y, [x, w, b], dy))
    y, rstd = ref.rms_norm(x, ns, w, None)
    torch.testing.assert_close(ref.rms_norm_backward(dy, x.detach(), ns, w, rstd), _grads(y, [x, w], dy))


# -- gradcheck of every functional, through the reference backend's autograd.Function ----------------


def _gc_inputs(shape, c):
    x = torch.randn(shape, **F64, requires_grad=True)
    w = (torch.rand(c, **F64) + 0.5).requires_grad_()
    b = torch.randn(c, **F64, requires_grad=True)
    return x, w, b


FUNCTIONALS = {
    "layer_norm": (lambda x, w, b: normkit.functional.layer_norm(x, (5,), w, b), (3, 5), 5),
    "rms_norm": (lambda x, w, b: normkit.functional.rms_norm(x, (5,), w) + 0 * b.sum(), (3, 5), 5),
    "group_norm": (lambda x, w, b: normkit.functional.group_norm(x, 2, w, b), (2, 4, 3), 4),
    "batch_norm_train": (
        lambda x, w, b: normkit.functional.batch_norm(x, None, None, w, b, training=True), (4, 3, 2), 3
    ),
    "batch_norm_eval": (
        lambda x, w, b: normkit.functional.batch_norm(
            x, torch.linspace(-1, 1, 3, **F64), torch.linspace(0.5, 2, 3, **F64), w, b
        ),
        (4, 3, 2),
        3,
    ),
    "instance_norm": (lambda x, w, b: normkit.functional.instance_norm(x, weight=w, bias=b), (2, 3, 4), 3),
}


@pytest.mark.parametrize("backend", ["reference", "torch"])
@pytest.mark.parametrize("name", sorted(FUNCTIONALS))
def test_gradcheck_functional(name, backend):
    fn, shape, c = FUNCTIONALS[name]
    with normkit.use_backend(backend):
        assert torch.autograd.gradcheck(fn, _gc_inputs(shape, c))


@pytest.mark.parametrize("name", sorted(FUNCTIONALS))
def test_gradgradcheck_reference_backend(name):
    """The reference backward is made of differentiable ops, so second derivatives work too."""
    fn, shape, c = FUNCTIONALS[name]
    with normkit.use_backend("reference"):
        assert torch.autograd.gradgradcheck(fn, _gc_inputs(shape, c))


# -- low precision: wide accumulation, output in the input dtype ----------------------------------------


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_low_precision_input_is_computed_in_wide_precision_and_rounded_once(dtype):
    x64 = torch.randn(6, 257, **F64) * 3 + 2
    w64, b64 = torch.rand(257, **F64) + 0.5, torch.randn(257, **F64)
    x = x64.to(dtype)
    truth = ref.layer_norm(x.double(), (257,), w64, b64)[0]
    y = ref.layer_norm(x, (257,), w64.float(), b64.float())[0]
    assert y.dtype == dtype
    baseline = torch.nn.functional.layer_norm(x, (257,), w64.float(), b64.float())
    assert_close(y, truth, baseline=baseline)
    # float32 parameters are exact in float64: y is the float64 result rounded once
    truth32 = ref.layer_norm(x.double(), (257,), w64.float().double(), b64.float().double())[0]
    assert torch.equal(y, truth32.to(dtype))
