"""BatchNorm followed by an activation, ``batch_norm_act``, on every backend.

It must equal the composition ``activation(batch_norm(...))`` computed by the same backend: exactly
for ReLU (it commutes with rounding) and for Hardswish in float32/float64, within one rounding of
the activation's output for Hardswish/SiLU in bfloat16/float16 and for SiLU in float32 (normkit's
exp). Training and anything with a gradient run the composition itself, so gradients and running
statistics match torch's.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as TF

import normkit
import normkit.functional as NF
from normkit.testing import assert_close

BACKENDS = normkit.available_backends()
ACTS = {"relu": TF.relu, "hardswish": TF.hardswish, "silu": TF.silu}


@pytest.fixture(params=BACKENDS)
def backend(request):
    with normkit.use_backend(request.param):
        yield request.param


def make(c=12, dtype=torch.float32, layout=torch.contiguous_format, shape=(3, 12, 5, 7)):
    gen = torch.Generator().manual_seed(0)
    pdt = torch.float32 if dtype in (torch.bfloat16, torch.float16) else dtype
    x = (torch.randn(shape, generator=gen, dtype=torch.float64) * 2 + 0.3).to(dtype)
    if len(shape) == 4:
        x = x.contiguous(memory_format=layout)
    stats = (torch.randn(c, generator=gen).to(pdt), torch.rand(c, generator=gen).add(0.5).to(pdt))
    params = (torch.randn(c, generator=gen).to(pdt), torch.randn(c, generator=gen).to(pdt))
    return x, stats, params


@pytest.mark.parametrize("activation", list(ACTS))
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16, torch.float16],
                         ids=["fp32", "fp64", "bf16", "fp16"])
@pytest.mark.parametrize("layout", [torch.contiguous_format, torch.channels_last], ids=["nchw", "nhwc"])
def test_inference_equals_composition(backend, activation, dtype, layout):
    x, (rm, rv), (w, b) = make(dtype=dtype, layout=layout)
    with torch.no_grad():
        y = NF.batch_norm_act(x, rm, rv, w, b, activation=activation)
        z = NF.batch_norm(x, rm, rv, w, b)
        composed = ACTS[activation](z)
    assert y.dtype == dtype and y.shape == x.shape
    assert y.is_contiguous(memory_format=layout)
    exact = activation == "relu" or (activation == "hardswish" and dtype in (torch.float32, torch.float64))
    if exact:
        assert torch.equal(y, composed)
    else:  # one rounding instead of two: within the activation of z computed in float64
        truth = ACTS[activation](NF.batch_norm(x.double(), rm.double(), rv.double(), w.double(), b.double()))
        assert_close(y, truth, baseline=composed)


@pytest.mark.parametrize("shape", [(6, 12), (4, 12, 9), (2, 12, 3, 4, 5)])
def test_other_ranks(backend, shape):
    x, (rm, rv), (w, b) = make(shape=shape)
    with torch.no_grad():
        y = NF.batch_norm_act(x, rm, rv, w, b, activation="relu")
        assert torch.equal(y, TF.relu(NF.batch_norm(x, rm, rv, w, b)))


@pytest.mark.parametrize("activation", list(ACTS))
def test_training_and_gradients_are_the_composition(backend, activation):
    x, (rm, rv), (w, b) = make()
    rm2, rv2 = rm.clone(), rv.clone()
    leaves = [t.clone().requires_grad_() for t in (x, w, b)]
    y = NF.batch_norm_act(leaves[0], rm, rv, leaves[1], leaves[2], training=True, momentum=0.3, activation=activation)
    ref_leaves = [t.clone().requires_grad_() for t in (x, w, b)]
    r = ACTS[activation](TF.batch_norm(ref_leaves[0], rm2, rv2, ref_leaves[1], ref_leaves[2], True, 0.3))
    dy = torch.randn_like(r)
    assert_close(y, r.double(), baseline=r)
    for ours, theirs in zip(torch.autograd.grad(y, leaves, dy), torch.autograd.grad(r, ref_leaves, dy), strict=True):
        assert_close(ours, theirs.double(), baseline=theirs)
    assert_close(rm, rm2.double(), baseline=rm2)
    assert_close(rv, rv2.double(), baseline=rv2)
    # eval with a gradient wanted: the composition too
    xe = x.clone().requires_grad_()
    ye = NF.batch_norm_act(xe, rm, rv, w, b, activation=activation)
    assert ye.requires_grad
    (g,) = torch.autograd.grad(ye.sum(), xe)
    assert torch.isfinite(g).all()


@pytest.mark.parametrize("activation", list(ACTS))
def test_nan_and_inf_propagate_as_the_composition(backend, activation):
    x, (rm, rv), (w, b) = make()
    x[0, 0, 0, :3] = torch.tensor([float("nan"), float("inf"), -float("inf")])
    with torch.no_grad():
        y = NF.batch_norm_act(x, rm, rv, w, b, activation=activation)
        composed = ACTS[activation](NF.batch_norm(x, rm, rv, w, b))
    assert torch.equal(y.isnan(), composed.isnan())
    assert torch.equal(y[~y.isnan()].isinf(), composed[~composed.isnan()].isinf())


def test_errors():
    x, (rm, rv), (w, b) = make()
    with pytest.raises(ValueError, match="activation must be one of"):
        NF.batch_norm_act(x, rm, rv, w, b, activation="gelu")
    with pytest.raises(RuntimeError) as ours:
        NF.batch_norm_act(x, rm[:5], rv, w, b)
    with pytest.raises(RuntimeError) as theirs:
        TF.batch_norm(x, rm[:5], rv, w, b)
    assert str(ours.value) == str(theirs.value)
