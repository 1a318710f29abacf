"""Channels-first row norms: ``channel_layer_norm`` and ``channel_rms_norm`` on every backend.

Each is compared, forward and backward, with the torch composition it replaces (timm's LayerNorm2d:
``layer_norm(x.movedim(1, -1), (C,)).movedim(-1, 1)``) and with a float64 truth under the per-dtype
bound of :mod:`normkit.testing`, for contiguous, channels-last and strided inputs and upstream
gradients in either layout. The output's layout is the composition's (channels innermost).
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as TF
from hypothesis import given, settings
from hypothesis import strategies as st

import normkit
import normkit.functional as NF
from normkit.testing import assert_close

pytestmark = pytest.mark.filterwarnings("ignore:Mismatch dtype between input and weight:UserWarning")

BACKENDS = normkit.available_backends()
DTYPES = [torch.float32, torch.bfloat16, torch.float16, torch.float64]
DTYPE_IDS = ["fp32", "bf16", "fp16", "fp64"]
F64 = {"dtype": torch.float64}


def torch_channel_layer_norm(x, w, b, eps):
    if w is None and b is not None and b.dtype != x.dtype:  # the same function, around torch's bias-only bug
        w = torch.ones(x.shape[1], dtype=b.dtype)
    return TF.layer_norm(x.movedim(1, -1), (x.shape[1],), w, b, eps).movedim(-1, 1)


def torch_channel_rms_norm(x, w, eps):
    return TF.rms_norm(x.movedim(1, -1), (x.shape[1],), w, eps).movedim(-1, 1)


def laid_out(t: torch.Tensor, layout: str) -> torch.Tensor:
    if layout == "channels_last":
        return t.movedim(1, -1).contiguous().movedim(-1, 1)
    if layout == "strided":  # neither contiguous nor channels-last: the last two dims swapped in memory
        return t.transpose(-1, -2).contiguous().transpose(-1, -2)
    return t.contiguous()


def memory_order(t: torch.Tensor) -> tuple[int, ...]:
    """The strides of the dims longer than 1 (a size-1 dim's stride says nothing about the layout)."""
    return tuple(st for st, size in zip(t.stride(), t.shape, strict=True) if size > 1)


def grads(fn, x, params, dy):
    leaves = [x.detach().clone().requires_grad_()] + [
        None if p is None else p.detach().clone().requires_grad_() for p in params
    ]
    y = fn(*leaves)
    live = [t for t in leaves if t is not None]
    return y.detach(), torch.autograd.grad(y, live, dy)


def check(op, shape, dtype, layout="contiguous", dy_layout="contiguous", weight=True, bias=True, shift=0.0,
          eps=1e-6, pdt=None):
    c = shape[1]
    pdt = pdt or (torch.float32 if dtype in (torch.float16, torch.bfloat16) else dtype)
    x = laid_out((torch.randn(shape, **F64) * 2 + shift).to(dtype), layout)
    w = (1 + 0.5 * torch.randn(c, **F64)).to(pdt) if weight else None
    b = (0.5 * torch.randn(c, **F64)).to(pdt) if bias and op == "layer" else None
    dy = laid_out(torch.randn(shape, **F64).to(dtype), dy_layout)
    if op == "layer":
        ours = lambda x, w, b: NF.channel_layer_norm(x, w, b, eps)  # noqa: E731
        theirs = lambda x, w, b: torch_channel_layer_norm(x, w, b, eps)  # noqa: E731
        params = [w, b]
    else:
        ours = lambda x, w: NF.channel_rms_norm(x, w, eps)  # noqa: E731
        theirs = lambda x, w: torch_channel_rms_norm(x, w, eps)  # noqa: E731
        params = [w]
    y_o, g_o = grads(ours, x, params, dy)
    y_r, g_r = grads(theirs, x, params, dy)
    y_t, g_t = grads(theirs, x.double(), [None if p is None else p.double() for p in params], dy.double())
    msg = f"{op} {shape} {dtype} {layout}"
    assert y_o.dtype == y_r.dtype == dtype and y_o.shape == y_r.shape, msg
    assert memory_order(y_o) == memory_order(y_r), f"{msg}: output strides {y_o.stride()} != torch's {y_r.stride()}"
    assert_close(y_o, y_t, baseline=y_r, msg=msg)
    for i, (o, r, t) in enumerate(zip(g_o, g_r, g_t, strict=True)):
        assert o.dtype == r.dtype and o.shape == r.shape, f"{msg} grad {i}"
        assert_close(o, t, baseline=r, msg=f"{msg} grad {i}")


@pytest.fixture(params=BACKENDS)
def backend(request):
    with normkit.use_backend(request.param):
        yield request.param


@pytest.mark.parametrize("op", ["layer", "rms"])
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("layout", ["contiguous", "channels_last", "strided"])
def test_matches_torch_composition(backend, op, dtype, layout):
    check(op, (3, 40, 9, 11), dtype, layout)


@pytest.mark.parametrize("op", ["layer", "rms"])
@pytest.mark.parametrize("shape", [(2, 7, 33), (2, 5, 3, 4, 6), (3, 96, 1, 1), (1, 300, 5, 7), (4, 16)])
def test_shapes(backend, op, shape):
    """3-D, 5-D, one position, many channels (several float chunks), a 2-D (N, C) input."""
    check(op, shape, torch.float32)


@pytest.mark.parametrize("dy_layout", ["contiguous", "channels_last", "strided"])
def test_upstream_gradient_in_any_layout(backend, dy_layout):
    check("layer", (2, 24, 6, 35), torch.float32, "contiguous", dy_layout)


@pytest.mark.parametrize("weight,bias", [(False, False), (True, False), (False, True)])
def test_without_parameters(backend, weight, bias):
    check("layer", (2, 12, 5, 5), torch.float32, weight=weight, bias=bias)
    check("rms", (2, 12, 5, 5), torch.bfloat16, weight=weight)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
def test_parameters_in_the_inputs_low_precision_dtype(backend, dtype, layout):
    """A model cast whole to bfloat16/float16: the kernels get float32 copies of the parameters."""
    check("layer", (2, 24, 6, 7), dtype, layout, pdt=dtype)
    check("rms", (2, 24, 6, 7), dtype, layout, pdt=dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["fp32", "fp64"])
def test_large_mean_does_not_cancel(backend, dtype):
    """A mean 1e4 times the spread: the statistics must be taken about a shift, not as E[x^2] - E[x]^2."""
    check("layer", (2, 64, 7, 40), dtype, shift=2e4)


def test_outlier_in_first_channel(backend):
    """The first channel far from the others at some positions (the shift the kernel starts from)."""
    x = torch.randn(2, 48, 5, 40, **F64)
    x[:, 0, :, ::3] += 300.0
    w, b = torch.randn(48, **F64), torch.randn(48, **F64)
    xf = x.float()
    y = NF.channel_layer_norm(xf, w.float(), b.float(), 1e-5)
    truth = torch_channel_layer_norm(x, w, b, 1e-5)
    assert_close(y, truth, baseline=torch_channel_layer_norm(xf, w.float(), b.float(), 1e-5))


@settings(max_examples=25, deadline=None)
@given(
    n=st.integers(1, 3),
    c=st.integers(1, 70),
    s=st.integers(1, 80),
    channels_last=st.booleans(),
    rms=st.booleans(),
    seed=st.integers(0, 2**16 - 1),
)
def test_hypothesis_shapes(n, c, s, channels_last, rms, seed):
    """Positions that leave a short last tile, any channel count, either layout (default backend)."""
    torch.manual_seed(seed)  # the data too comes from hypothesis, so that a failing example replays
    check("rms" if rms else "layer", (n, c, s), torch.float32, "channels_last" if channels_last else "contiguous")


def test_errors_match_torch_composition():
    x = torch.randn(2, 4, 3, 3)
    with pytest.raises(RuntimeError) as theirs:
        torch_channel_layer_norm(x, torch.ones(5), None, 1e-5)
    with pytest.raises(RuntimeError) as ours:
        NF.channel_layer_norm(x, torch.ones(5), None)
    assert str(ours.value) == str(theirs.value)
    with pytest.raises(ValueError, match="expected input of shape"):
        NF.channel_layer_norm(torch.randn(4))
    with pytest.raises(ValueError, match="expected input of shape"):
        NF.channel_rms_norm(torch.randn(4))


def test_no_grad_and_grad_paths_agree():
    """Inference (the kernel alone) and training (through autograd) give the same output bits."""
    x = torch.randn(2, 40, 8, 8)
    w, b = torch.randn(40), torch.randn(40)
    with torch.no_grad():
        y0 = NF.channel_layer_norm(x, w, b)
    y1 = NF.channel_layer_norm(x.requires_grad_(), w, b)
    assert torch.equal(y0, y1.detach())


def test_double_backward(backend):
    x = torch.randn(2, 6, 3, 4, **F64, requires_grad=True)
    w = torch.randn(6, **F64, requires_grad=True)
    b = torch.randn(6, **F64, requires_grad=True)
    assert torch.autograd.gradgradcheck(lambda x, w, b: NF.channel_layer_norm(x, w, b), (x, w, b))
    assert torch.autograd.gradcheck(lambda x, w: NF.channel_rms_norm(x, w), (x, w))


@pytest.mark.parametrize("layout", ["contiguous", "channels_last", "strided"])
def test_an_in_place_op_on_the_output_keeps_gradients(backend, layout):
    """timm's LayerNormAct2d applies an in-place ReLU to the norm's output: autograd allows it, as on the
    composition's output, and the gradient is the composition's."""
    x = laid_out(torch.randn(2, 6, 3, 4, **F64), layout)
    w, b = torch.randn(6, **F64), torch.randn(6, **F64)
    grads = []
    for fn in (NF.channel_layer_norm, torch_channel_layer_norm):
        leaf = x.clone().requires_grad_()
        with normkit.use_backend(backend):
            y = fn(leaf, w, b, 1e-5)
        y.relu_().sum().backward()
        grads.append(leaf.grad)
    assert_close(grads[0], grads[1], torch.float64)
