"""Fused ops: residual add + RMSNorm/LayerNorm, GroupNorm + SiLU, on every available backend.

Each fused op is compared, forward and backward, with the unfused torch eager composition it replaces
(``F.rms_norm(x + r)``, ``F.layer_norm(x + r)``, ``F.silu(F.group_norm(x))``) and with a float64 truth
(the same composition on float64 copies; for the fused adds, of ``h = x + r`` rounded to x's dtype, as
the ops specify) under the per-dtype bound of :mod:`normkit.testing`:
``|ours - truth| <= 2·|torch - truth| + atol + rtol·|truth|``. Backends come from
``normkit.available_backends()``, so a new backend is tested here as soon as it registers.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as TF
from hypothesis import given, settings
from hypothesis import strategies as st

import normkit
import normkit.functional as NF
import normkit.nn as NN
from normkit import reference as ref
from normkit.nn._compat import TORCH_HAS_BIAS_KWARG
from normkit.testing import assert_close

# torch's own F.rms_norm warns that it cannot use its fused kernel for fp16 input with an fp32 weight
pytestmark = pytest.mark.filterwarnings("ignore:Mismatch dtype between input and weight:UserWarning")

BACKENDS = normkit.available_backends()
DTYPES = [torch.float32, torch.bfloat16, torch.float16, torch.float64]
DTYPE_IDS = ["fp32", "bf16", "fp16", "fp64"]
F64 = {"dtype": torch.float64}
TORCH_GN_BIAS_ONLY_BUG = "torch 2.13 bug: group_norm's backward with bias but no weight fails on CPU"
TORCH_LN_BIAS_ONLY_BUG = "torch 2.13 bug: layer_norm backward of bf16/fp16 input with fp32 bias but no weight fails"


@pytest.fixture(params=BACKENDS)
def backend(request):
    with normkit.use_backend(request.param):
        yield request.param


def rand(shape, dtype=torch.float32, scale=1.0, shift=0.0) -> torch.Tensor:
    return (torch.randn(shape, **F64) * scale + shift).to(dtype)


def param_dtype(dtype: torch.dtype) -> torch.dtype:
    """Parameters of a float16/bfloat16 layer are float32 (the mixed-precision convention)."""
    return torch.float32 if dtype in (torch.float16, torch.bfloat16) else dtype


def make_params(shape, dtype, weight=True, bias=True):
    w = (1 + 0.5 * torch.randn(shape, **F64)).to(param_dtype(dtype)) if weight else None
    b = (0.5 * torch.randn(shape, **F64)).to(param_dtype(dtype)) if bias else None
    return w, b


def run(fn, tensors: dict, grads_out: list):
    """Call ``fn(**leaves)`` on fresh leaves that require grad (None stays None); backward
    ``grads_out`` (one per output). Returns (outputs, {name: grad})."""
    leaves = {k: None if t is None else t.detach().clone().requires_grad_() for k, t in tensors.items()}
    out = fn(**leaves)
    out = out if isinstance(out, tuple) else (out,)
    live = {k: t for k, t in leaves.items() if t is not None}
    grads = torch.autograd.grad(out, list(live.values()), grads_out[: len(out)]) if live else ()
    return tuple(o.detach() for o in out), dict(zip(live, grads, strict=True))


def check_against_torch_and_truth(ours_fn, torch_fn, tensors: dict, dys: list, msg: str, truth_fn=None):
    """Run normkit's op, torch's composition on the same inputs, and the truth (``truth_fn``, default
    the composition) on float64 copies; compare outputs and every gradient (dtype, shape, values
    under the per-dtype bound)."""
    y_o, g_o = run(ours_fn, tensors, dys)
    y_r, g_r = run(torch_fn, tensors, dys)
    as64 = {k: None if t is None else t.double() for k, t in tensors.items()}
    y_t, g_t = run(truth_fn or torch_fn, as64, [d.double() for d in dys])
    assert len(y_o) == len(y_r)
    for i, (o, r, t) in enumerate(zip(y_o, y_r, y_t, strict=True)):
        assert o.dtype == r.dtype and o.shape == r.shape, f"{msg} output {i}"
        assert_close(o, t, baseline=r, msg=f"{msg} output {i}")
    assert g_o.keys() == g_r.keys()
    for k in g_r:
        assert g_o[k].dtype == g_r[k].dtype, f"{msg}: grad of {k} dtype {g_o[k].dtype} != {g_r[k].dtype}"
        assert_close(g_o[k], g_t[k], baseline=g_r[k], msg=f"{msg} grad of {k}")
    return y_o, y_r


# --------------------------------------------------------------------------------------------------
# the compositions the fused ops replace
# --------------------------------------------------------------------------------------------------


def _add(x, r, round_to):
    """x + r; with ``round_to``, rounded to that dtype (in a differentiable way) and back: the truth of
    an op specified as "h = x + residual rounded to x's dtype" is computed from the rounded h."""
    h = x + r
    return h if round_to is None else h.to(round_to).to(h.dtype)


def torch_add_rms(x, r, shape, w, eps=None, round_to=None):
    h = _add(x, r, round_to)
    return TF.rms_norm(h, shape, w, eps), h


def torch_add_layer(x, r, shape, w, b, eps=1e-5, round_to=None):
    h = _add(x, r, round_to)
    if w is None and b is not None and b.dtype != h.dtype:  # the same function, around a torch bug
        w = torch.ones(shape, dtype=b.dtype)
    return TF.layer_norm(h, shape, w, b, eps), h


def torch_gn_silu(x, groups, w, b, eps=1e-5):
    if w is None and b is not None:  # the same function, around torch's bias-without-weight bug
        w = torch.ones(x.shape[1], dtype=b.dtype)
    return TF.silu(TF.group_norm(x, groups, w, b, eps))


def fused_add_case(norm, shape, k, dtype, weight=True, bias=True, scale=1.0, shift=0.0):
    """(normkit fn, torch fn, tensors, upstream grads, truth fn) for a fused add over ``shape``'s
    last k dims; the truth rounds h to ``dtype``."""
    ns = tuple(shape[len(shape) - k :])
    w, b = make_params(ns, dtype, weight, bias and norm == "layer")
    tensors = {"x": rand(shape, dtype, scale, shift), "r": rand(shape, dtype), "w": w}
    if norm == "rms":
        ours = lambda x, r, w: NF.fused_add_rms_norm(x, r, ns, w)  # noqa: E731
        theirs = lambda x, r, w: torch_add_rms(x, r, ns, w)  # noqa: E731
        truth = lambda x, r, w: torch_add_rms(x, r, ns, w, round_to=dtype)  # noqa: E731
    else:
        tensors["b"] = b
        ours = lambda x, r, w, b: NF.fused_add_layer_norm(x, r, ns, w, b)  # noqa: E731
        theirs = lambda x, r, w, b: torch_add_layer(x, r, ns, w, b)  # noqa: E731
        truth = lambda x, r, w, b: torch_add_layer(x, r, ns, w, b, round_to=dtype)  # noqa: E731
    dys = [rand(shape, dtype), rand(shape, dtype)]  # dL/dy and a second consumer's dL/dh
    return ours, theirs, tensors, dys, truth


# --------------------------------------------------------------------------------------------------
# fused add + RMSNorm / LayerNorm
# --------------------------------------------------------------------------------------------------

ADD_SHAPES = [((5, 1), 1), ((3, 7), 1), ((4, 1000), 1), ((2, 3, 7), 1), ((2, 3, 7), 2), ((0, 7), 1)]


@pytest.mark.parametrize("shape,k", ADD_SHAPES, ids=[f"{s}-k{k}" for s, k in ADD_SHAPES])
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("norm", ["rms", "layer"])
def test_fused_add_matches_torch_composition_and_float64_truth(norm, dtype, shape, k, backend):
    torch.manual_seed(0)
    ours, theirs, tensors, dys, truth = fused_add_case(norm, shape, k, dtype)
    (y, h), _ = check_against_torch_and_truth(
        ours, theirs, tensors, dys, f"{norm} {dtype} {shape}", truth
    )
    assert y.dtype == h.dtype == dtype
    # h is x + residual rounded once to x's dtype: exactly what torch's add gives
    assert torch.equal(h, tensors["x"] + tensors["r"])


AFFINE = [(True, True), (True, False), (False, True), (False, False)]


@pytest.mark.parametrize("weight,bias", AFFINE, ids=["w+b", "w", "b", "none"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("norm", ["rms", "layer"])
def test_fused_add_with_and_without_parameters(norm, dtype, weight, bias, backend):
    if norm == "rms" and bias:
        pytest.skip("RMSNorm has no bias")
    if backend == "torch" and norm == "layer" and bias and not weight and dtype != torch.float32:
        pytest.skip(TORCH_LN_BIAS_ONLY_BUG)
    torch.manual_seed(1)
    ours, theirs, tensors, dys, truth = fused_add_case(norm, (6, 33), 1, dtype, weight, bias)
    check_against_torch_and_truth(ours, theirs, tensors, dys, f"{norm} w={weight} b={bias}", truth)


@pytest.mark.parametrize("norm", ["rms", "layer"])
def test_fused_add_large_mean_and_low_precision_parameters(norm, backend):
    """1e4-scale rows (statistics must not cancel) and bfloat16 parameters with bfloat16 input."""
    torch.manual_seed(2)
    ours, theirs, tensors, dys, truth = fused_add_case(norm, (4, 257), 1, torch.float32, shift=1e4)
    check_against_torch_and_truth(ours, theirs, tensors, dys, f"{norm} large mean", truth)
    ours, theirs, tensors, dys, truth = fused_add_case(norm, (4, 257), 1, torch.bfloat16)
    tensors = {k: None if t is None else t.to(torch.bfloat16) for k, t in tensors.items()}
    check_against_torch_and_truth(ours, theirs, tensors, dys, f"{norm} bf16 parameters", truth)


@settings(max_examples=15, deadline=None)
@given(shape=st.lists(st.integers(1, 9), min_size=1, max_size=4), data=st.data())
@pytest.mark.parametrize("backend_name", BACKENDS)
def test_fused_add_for_generated_shapes(backend_name, shape, data):
    k = data.draw(st.integers(1, len(shape)), label="k")
    norm = data.draw(st.sampled_from(["rms", "layer"]), label="norm")
    ours, theirs, tensors, dys, truth = fused_add_case(norm, tuple(shape), k, torch.float64)
    with normkit.use_backend(backend_name):
        y_o, g_o = run(ours, tensors, dys)
    y_r, g_r = run(theirs, tensors, dys)
    torch.testing.assert_close(y_o, y_r)
    torch.testing.assert_close(g_o, g_r)


@pytest.mark.parametrize("norm", ["rms", "layer"])
def test_fused_add_layouts(norm, backend):
    """y as the norm of h returns it (RMSNorm keeps channels_last, LayerNorm is contiguous); h in
    x's layout, as torch's ``x + residual`` is when both share it."""
    x = rand((2, 3, 4, 5)).contiguous(memory_format=torch.channels_last)
    r = rand((2, 3, 4, 5)).contiguous(memory_format=torch.channels_last)
    if norm == "rms":
        y, h = NF.fused_add_rms_norm(x, r, (5,))
        y_t, h_t = torch_add_rms(x, r, (5,), None)
    else:
        y, h = NF.fused_add_layer_norm(x, r, (5,))
        y_t, h_t = torch_add_layer(x, r, (5,), None, None)
    for ours, theirs in ((y, y_t), (h, h_t)):
        assert ours.stride() == theirs.stride()
        torch.testing.assert_close(ours, theirs)
    assert h.is_contiguous(memory_format=torch.channels_last)
    # a non-contiguous (transposed) input gives contiguous outputs
    xt, rt = rand((5, 6)).t(), rand((5, 6)).t()
    fn = NF.fused_add_rms_norm if norm == "rms" else NF.fused_add_layer_norm
    y, h = fn(xt, rt, (5,))
    assert y.is_contiguous() and h.is_contiguous()
    torch.testing.assert_close(h, xt + rt)


# --------------------------------------------------------------------------------------------------
# GroupNorm + SiLU
# --------------------------------------------------------------------------------------------------

GN_SHAPES = [
    ((2, 6, 5, 5), 3, None),
    ((2, 6, 5, 5), 3, torch.channels_last),
    ((2, 6, 3, 3, 2), 6, torch.channels_last_3d),
    ((3, 4, 7), 2, None),
    ((2, 4, 1000), 4, None),
    ((1, 4, 1), 2, None),
    ((4, 8), 2, None),
    ((0, 6, 3), 3, None),
]
GN_IDS = [f"{s}-g{g}{'-cl' if f is not None else ''}" for s, g, f in GN_SHAPES]


def gn_case(shape, groups, dtype, fmt=None, weight=True, bias=True, shift=0.0):
    w, b = make_params((shape[1],), dtype, weight, bias)
    x = rand(shape, dtype, 2.0, shift)
    if fmt is not None:
        x = x.contiguous(memory_format=fmt)
    dy = rand(shape, dtype)
    tensors = {"x": x, "w": w, "b": b}
    return (
        lambda x, w, b: NF.group_norm_silu(x, groups, w, b),
        lambda x, w, b: torch_gn_silu(x, groups, w, b),
        tensors,
        [dy],
    )


@pytest.mark.parametrize("shape,groups,fmt", GN_SHAPES, ids=GN_IDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
def test_group_norm_silu_matches_torch_composition_and_float64_truth(dtype, shape, groups, fmt, backend):
    torch.manual_seed(0)
    ours, theirs, tensors, dys = gn_case(shape, groups, dtype, fmt)
    (y,), (y_r,) = check_against_torch_and_truth(ours, theirs, tensors, dys, f"gn+silu {dtype} {shape}")
    assert y.dtype == dtype
    if fmt is not None:  # kept like F.group_norm keeps it
        assert y.is_contiguous(memory_format=fmt) and y.stride() == y_r.stride()
    else:
        assert y.is_contiguous()


@pytest.mark.parametrize("weight,bias", AFFINE, ids=["w+b", "w", "b", "none"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_group_norm_silu_with_and_without_parameters(dtype, weight, bias, backend):
    if backend == "torch" and bias and not weight:
        pytest.skip(TORCH_GN_BIAS_ONLY_BUG)
    torch.manual_seed(1)
    ours, theirs, tensors, dys = gn_case((3, 6, 4, 5), 2, dtype, None, weight, bias)
    check_against_torch_and_truth(ours, theirs, tensors, dys, f"gn+silu w={weight} b={bias}")


def test_group_norm_silu_large_mean(backend):
    torch.manual_seed(2)
    ours, theirs, tensors, dys = gn_case((2, 4, 16, 17), 2, torch.float32, shift=1e4)
    check_against_torch_and_truth(ours, theirs, tensors, dys, "gn+silu large mean")


@settings(max_examples=15, deadline=None)
@given(
    n=st.integers(1, 3),
    groups=st.integers(1, 4),
    per_group=st.integers(1, 3),
    spatial=st.lists(st.integers(1, 5), min_size=0, max_size=2),
    channels_last=st.booleans(),
)
@pytest.mark.parametrize("backend_name", BACKENDS)
def test_group_norm_silu_for_generated_shapes(backend_name, n, groups, per_group, spatial, channels_last):
    shape = (n, groups * per_group, *spatial)
    if n * per_group * math.prod(spatial) == 1:  # one value per group: torch refuses (tested below)
        return
    fmt = torch.channels_last if channels_last and len(shape) == 4 else None
    ours, theirs, tensors, dys = gn_case(shape, groups, torch.float64, fmt)
    with normkit.use_backend(backend_name):
        y_o, g_o = run(ours, tensors, dys)
    y_r, g_r = run(theirs, tensors, dys)
    torch.testing.assert_close(y_o, y_r)
    torch.testing.assert_close(g_o, g_r)
    if fmt is not None:
        assert y_o[0].is_contiguous(memory_format=fmt)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
def test_reference_group_norm_silu_rounds_once(dtype):
    """SiLU is applied to the unrounded GroupNorm output; the result is rounded once to x's dtype."""
    torch.manual_seed(3)
    x = rand((2, 8, 9, 9), dtype, 2.0, 1.0)
    w, b = make_params((8,), dtype)
    with normkit.use_backend("reference"):
        y = NF.group_norm_silu(x, 4, w, b)
    truth = TF.silu(TF.group_norm(x.double(), 4, w.double(), b.double()))  # fp32 params are exact in fp64
    assert torch.equal(y, truth.to(dtype))


@pytest.mark.parametrize(
    "shape,groups", [((2, 6, 5), 3), ((3, 4, 3, 3), 1), ((2, 6, 2, 3, 2), 6), ((4, 8), 2), ((1, 10, 7), 5)]
)
@pytest.mark.parametrize("weight,bias", AFFINE, ids=["w+b", "w", "b", "none"])
def test_reference_group_norm_silu_backward_matches_autograd(shape, groups, weight, bias):
    """The hand-derived backward (silu'(z) = s(z)(1 + z(1 - s(z))), then GroupNorm's) equals autograd
    of the forward in float64."""
    torch.manual_seed(4)
    x = rand(shape, torch.float64, 2.0, 0.5).requires_grad_()
    w, b = make_params((shape[1],), torch.float64, weight, bias)
    w = None if w is None else w.requires_grad_()
    b = None if b is None else b.requires_grad_()
    y, mean, rstd = ref.group_norm_silu(x, groups, w, b, 1e-5)
    assert mean.shape == rstd.shape == (shape[0], groups)
    torch.testing.assert_close(y, torch_gn_silu(x, groups, w, b))
    dy = torch.randn_like(y)
    leaves = [t for t in (x, w, b) if t is not None]
    dx, dw, db = ref.group_norm_silu_backward(dy, x.detach(), groups, w, b, mean, rstd)
    assert (dw is None) == (w is None) and db.shape == (shape[1],)
    got = [dx] + ([dw] if w is not None else []) + ([db] if b is not None else [])
    torch.testing.assert_close(got, list(torch.autograd.grad(y, leaves, dy)))


# --------------------------------------------------------------------------------------------------
# gradcheck, double backward, torch.func
# --------------------------------------------------------------------------------------------------


GRADCHECK_CASES = [
    ("add_rms", True, False),
    ("add_rms", False, False),
    ("add_layer", True, True),
    ("add_layer", False, True),
    ("add_layer", False, False),
    ("gn_silu", True, True),
    ("gn_silu", True, False),
    ("gn_silu", False, True),
    ("gn_silu", False, False),
    ("gn_silu_channels_last", True, True),
]


@pytest.mark.parametrize("name,weight,bias", GRADCHECK_CASES, ids=[f"{n}-w{w:d}-b{b:d}" for n, w, b in GRADCHECK_CASES])
def test_gradcheck_and_gradgradcheck_reference(name, weight, bias):
    """float64 gradcheck and double backward of the reference backend (the other backends are held to
    torch's composition in float64 above). gradgradcheck runs in fast mode (random projections) to keep
    the file quick; the gradient-penalty test below compares full second derivatives with torch's."""
    torch.manual_seed(5)
    add = name.startswith("add")
    shape = {"add_rms": (3, 5), "add_layer": (3, 5), "gn_silu": (2, 4, 3), "gn_silu_channels_last": (2, 4, 2, 3)}[name]
    c = shape[1] if not add else shape[-1]
    x = torch.randn(shape, **F64, requires_grad=True)
    r = torch.randn(shape, **F64, requires_grad=True) if add else None
    w = (torch.rand(c, **F64) + 0.5).requires_grad_() if weight else None
    b = torch.randn(c, **F64, requires_grad=True) if bias else None

    def call(*leaves):
        it = iter(leaves)
        x, r = next(it), next(it) if add else None
        w, b = next(it) if weight else None, next(it) if bias else None
        if name == "add_rms":
            return NF.fused_add_rms_norm(x, r, (c,), w)
        if name == "add_layer":
            return NF.fused_add_layer_norm(x, r, (c,), w, b)
        if name == "gn_silu_channels_last":
            x = x.contiguous(memory_format=torch.channels_last)
        return NF.group_norm_silu(x, 2, w, b)

    inputs = tuple(t for t in (x, r, w, b) if t is not None)
    with normkit.use_backend("reference"):
        assert torch.autograd.gradcheck(call, inputs)
        assert torch.autograd.gradgradcheck(call, inputs, fast_mode=True)


PENALTY_OPS = {
    "add_rms": (
        lambda x, r, w, b: NF.fused_add_rms_norm(x, r, (6,), w),
        lambda x, r, w, b: torch_add_rms(x, r, (6,), w),
        (4, 6),
    ),
    "add_layer": (
        lambda x, r, w, b: NF.fused_add_layer_norm(x, r, (6,), w, b),
        lambda x, r, w, b: torch_add_layer(x, r, (6,), w, b),
        (4, 6),
    ),
    "gn_silu": (
        lambda x, r, w, b: NF.group_norm_silu(x, 2, w, b),
        lambda x, r, w, b: torch_gn_silu(x, 2, w, b),
        (2, 6, 3, 3),
    ),
}


@pytest.mark.parametrize("op", sorted(PENALTY_OPS))
def test_double_backward_gradient_penalty_matches_torch(op, backend):
    """A gradient penalty, d/d(x, residual, w, b) of |dL/dx|^2, against torch's composition."""
    ours, theirs, shape = PENALTY_OPS[op]
    torch.manual_seed(6)
    c = shape[1] if op == "gn_silu" else shape[-1]
    x0, r0 = torch.randn(shape, **F64) * 2 + 0.5, torch.randn(shape, **F64)
    w0, b0 = torch.rand(c, **F64) + 0.5, torch.randn(c, **F64)
    results = []
    for fn in (ours, theirs):
        x, r, w, b = (t.clone().requires_grad_() for t in (x0, r0, w0, b0))
        out = fn(x, r, w, b)
        out = out if isinstance(out, tuple) else (out,)
        (dx,) = torch.autograd.grad(sum(o.pow(3).sum() for o in out), x, create_graph=True)
        results.append(torch.autograd.grad(dx.square().sum(), (x, r, w, b), allow_unused=True, materialize_grads=True))
    torch.testing.assert_close(results[0], results[1])


@pytest.mark.parametrize("name", ["FusedAddRMSNorm", "FusedAddLayerNorm", "GroupNormSiLU"])
def test_per_sample_gradients_with_torch_func(name, backend):
    from torch.func import functional_call, grad, vmap

    torch.manual_seed(7)
    if name == "GroupNormSiLU":
        m, sample = NN.GroupNormSiLU(2, 4), (4, 5)
        with torch.no_grad():
            m.bias.normal_()

        def composed(p, s):
            return TF.silu(TF.group_norm(s, 2, p["weight"], p["bias"]))
    else:
        m = getattr(NN, name)(6)
        sample = (3, 6)
        with torch.no_grad():
            m.weight.uniform_(0.5, 1.5)

        def composed(p, s):
            if name == "FusedAddRMSNorm":
                return torch_add_rms(s, s * 0.5, (6,), p["weight"], m.eps)
            return torch_add_layer(s, s * 0.5, (6,), p["weight"], p["bias"])

    params = {k: v.detach() for k, v in m.named_parameters()}
    x = torch.randn(8, *sample) * 2 + 1

    def out_loss(out):
        out = out if isinstance(out, tuple) else (out,)
        return sum(o.pow(3).sum() for o in out)

    def ours(p, s):
        args = (s.unsqueeze(0),) if name == "GroupNormSiLU" else (s.unsqueeze(0), s.unsqueeze(0) * 0.5)
        return out_loss(functional_call(m, p, args))

    def theirs(p, s):
        return out_loss(composed(p, s.unsqueeze(0)))

    got = vmap(grad(ours), in_dims=(None, 0))(params, x)
    expected = vmap(grad(theirs), in_dims=(None, 0))(params, x)
    for k in expected:
        torch.testing.assert_close(got[k], expected[k], rtol=1e-4, atol=1e-4)


# --------------------------------------------------------------------------------------------------
# saved tensors: the reference keeps x and statistics, not GroupNorm's output
# --------------------------------------------------------------------------------------------------


def saved_tensors(fn) -> tuple[list[torch.Tensor], object]:
    """The tensors autograd saves while ``fn()`` runs, and fn's result."""
    saved: list[torch.Tensor] = []

    def pack(t):
        saved.append(t)
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = fn()
    return saved, out


def nbytes(tensors) -> int:
    return sum(t.numel() * t.element_size() for t in tensors)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("fmt", [None, torch.channels_last], ids=["nchw", "channels_last"])
def test_reference_group_norm_silu_saves_less_than_the_torch_composition(fmt, dtype):
    torch.manual_seed(8)
    x = rand((4, 32, 16, 16), dtype)
    if fmt is not None:
        x = x.contiguous(memory_format=fmt)
    x.requires_grad_()
    w, b = (t.requires_grad_() for t in make_params((32,), dtype))
    with normkit.use_backend("reference"):
        ours, y = saved_tensors(lambda: NF.group_norm_silu(x, 8, w, b))
    theirs, y_t = saved_tensors(lambda: TF.silu(TF.group_norm(x, 8, w, b)))
    # torch keeps x and GroupNorm's output (for SiLU's backward); the reference keeps only x at that size
    big = [t for t in ours if t.numel() >= x.numel()]
    assert len(big) == 1 and big[0] is x
    assert nbytes(ours) < nbytes(theirs)
    assert nbytes(ours) - nbytes([x]) < 4096  # weight, bias and (N, G) statistics
    assert nbytes(theirs) >= 2 * nbytes([x])
    # and backward, from what it saved, is as exact as torch's
    dy = torch.randn_like(y)
    x64, w64, b64 = (t.detach().double().requires_grad_() for t in (x, w, b))
    truth = torch.autograd.grad(TF.silu(TF.group_norm(x64, 8, w64, b64)), (x64, w64, b64), dy.double())
    got, baseline = torch.autograd.grad(y, (x, w, b), dy), torch.autograd.grad(y_t, (x, w, b), dy)
    for name, o, t, r in zip("xwb", got, truth, baseline, strict=True):
        assert_close(o, t, baseline=r, msg=f"grad of {name}")


def _tol(dtype):
    return {"rtol": 2e-2, "atol": 2e-2} if dtype == torch.bfloat16 else {}


@pytest.mark.parametrize("norm", ["rms", "layer"])
def test_reference_fused_add_saves_h_and_statistics_only(norm):
    x, r = rand((8, 64)).requires_grad_(), rand((8, 64)).requires_grad_()
    w = torch.ones(64, requires_grad=True)
    fn = (lambda: NF.fused_add_rms_norm(x, r, (64,), w)) if norm == "rms" else (
        lambda: NF.fused_add_layer_norm(x, r, (64,), w, None)
    )
    with normkit.use_backend("reference"):
        saved, (_y, h) = saved_tensors(fn)
    big = [t for t in saved if t.numel() >= x.numel()]
    assert len(big) == 1 and big[0].data_ptr() == h.data_ptr()  # the h that is returned anyway


# --------------------------------------------------------------------------------------------------
# bad input: the underlying norm's errors (torch's), and residual mismatches
# --------------------------------------------------------------------------------------------------


def _outcome(fn):
    try:
        fn()
    except Exception as e:  # noqa: BLE001 - capturing is the point
        return e
    return None


def assert_same_error_as_composition(ours, theirs):
    torch.manual_seed(0)
    expected = _outcome(theirs)
    torch.manual_seed(0)
    got = _outcome(ours)
    assert expected is not None, "test case is wrong: torch's composition accepts it"
    assert got is not None, f"normkit accepted input torch rejects with {type(expected).__name__}: {expected}"
    assert (type(got), str(got)) == (type(expected), str(expected))


def _i(*shape):
    return torch.zeros(shape, dtype=torch.int64)


ADD_ERRORS = {
    "shape-mismatch": lambda: (rand((2, 3)), rand((2, 3)), (4,), None, None),
    "shape-mismatch-2d": lambda: (rand((2, 3, 4)), rand((2, 3, 4)), (2, 4), None, None),
    "empty-normalized-shape": lambda: (rand((2, 3)), rand((2, 3)), (), None, None),
    "too-few-dims": lambda: (rand((3,)), rand((3,)), (2, 3), None, None),
    "weight-shape": lambda: (rand((2, 3)), rand((2, 3)), (3,), rand((4,)), None),
    "bias-shape": lambda: (rand((2, 3)), rand((2, 3)), (3,), rand((3,)), rand((2,))),
    "integer-input": lambda: (_i(2, 3), _i(2, 3), (3,), None, None),
    "double-input-float-weight": lambda: (rand((2, 3), torch.float64), rand((2, 3), torch.float64), (3,), rand((3,)),
                                          None),
    "bf16-weight-fp32-bias": lambda: (rand((2, 3), torch.bfloat16), rand((2, 3), torch.bfloat16), (3,),
                                      rand((3,), torch.bfloat16), rand((3,))),
}


@pytest.mark.parametrize("case", sorted(ADD_ERRORS))
@pytest.mark.parametrize("norm", ["rms", "layer"])
def test_fused_add_errors_are_the_norms(norm, case, backend):
    x, r, shape, w, b = ADD_ERRORS[case]()
    if norm == "rms":
        if b is not None:
            pytest.skip("RMSNorm has no bias")
        ours = lambda: NF.fused_add_rms_norm(x, r, shape, w)  # noqa: E731
        theirs = lambda: torch_add_rms(x, r, shape, w)  # noqa: E731
    else:
        ours = lambda: NF.fused_add_layer_norm(x, r, shape, w, b)  # noqa: E731
        theirs = lambda: torch_add_layer(x, r, shape, w, b)  # noqa: E731
    if norm == "rms" and case.startswith(("double-input", "bf16-weight")):
        # torch's rms_norm accepts any weight dtype (it promotes); normkit follows it
        torch.testing.assert_close(ours()[0], theirs()[0], **_tol(x.dtype))
        return
    assert_same_error_as_composition(ours, theirs)


GN_ERRORS = {
    "groups-not-dividing-channels": lambda: (rand((2, 6, 3)), 4, None, None),
    "zero-groups": lambda: (rand((2, 6, 3)), 0, None, None),
    "one-dim-input": lambda: (rand((6,)), 2, None, None),
    "one-value-per-group": lambda: (rand((1, 4, 1)), 4, None, None),
    "weight-size": lambda: (rand((2, 6, 3)), 3, rand((5,)), None),
    "bias-size": lambda: (rand((2, 6, 3)), 3, rand((6,)), rand((4,))),
    "integer-input": lambda: (_i(2, 6, 3), 3, None, None),
    "double-input-float-weight": lambda: (rand((2, 6, 3), torch.float64), 3, rand((6,)), rand((6,))),
}


@pytest.mark.parametrize("case", sorted(GN_ERRORS))
def test_group_norm_silu_errors_are_group_norms(case, backend):
    x, groups, w, b = GN_ERRORS[case]()
    assert_same_error_as_composition(
        lambda: NF.group_norm_silu(x, groups, w, b), lambda: TF.silu(TF.group_norm(x, groups, w, b))
    )


MISMATCHES = {
    "shape": (lambda: rand((2, 3)), lambda: rand((2, 4)), r"same shape, but got x of shape \[2, 3\] and residual of "
              r"shape \[2, 4\]"),
    "broadcastable-shape": (lambda: rand((2, 3)), lambda: rand((3,)), r"same shape, .* residual of shape \[3\]"),
    "dtype": (lambda: rand((2, 3)), lambda: rand((2, 3), torch.float64),
              r"same dtype, but got x of dtype torch.float32 and residual of dtype torch.float64"),
    "low-precision-dtype": (lambda: rand((2, 3), torch.bfloat16), lambda: rand((2, 3)),
                            r"same dtype, but got x of dtype torch.bfloat16 and residual of dtype torch.float32"),
    "device": (lambda: rand((2, 3)), lambda: torch.empty(2, 3, device="meta"),
               r"same device, but got x on cpu and residual on meta"),
}


@pytest.mark.parametrize("case", sorted(MISMATCHES))
@pytest.mark.parametrize("op", ["fused_add_rms_norm", "fused_add_layer_norm"])
def test_residual_must_match_x_exactly(op, case, backend):
    """No broadcasting, type promotion or device mixing: a RuntimeError naming x and residual."""
    make_x, make_r, pattern = MISMATCHES[case]
    with pytest.raises(RuntimeError, match=f"^{op}: expected x and residual to have the {pattern}"
                       if case != "device" else f"^{op}: expected x and residual to be on the {pattern}"):
        getattr(NF, op)(make_x(), make_r(), (3,))
    with pytest.raises(TypeError, match="argument 'residual' must be Tensor, not float"):
        getattr(NF, op)(make_x(), 1.0, (3,))


def test_residual_is_checked_before_the_norms_arguments(backend):
    with pytest.raises(RuntimeError, match="same shape"):
        NF.fused_add_layer_norm(rand((2, 3)), rand((2, 4)), (7,))


# --------------------------------------------------------------------------------------------------
# __torch_function__
# --------------------------------------------------------------------------------------------------


class Intercepting(torch.Tensor):
    """A tensor subclass whose __torch_function__ answers the fused ops itself."""

    @classmethod
    def __torch_function__(cls, func, types, args=(), kwargs=None):
        if func in (NF.fused_add_rms_norm, NF.fused_add_layer_norm, NF.group_norm_silu):
            return ("intercepted", func.__name__, kwargs)
        return super().__torch_function__(func, types, args, kwargs or {})


def test_torch_function_overrides_are_honoured():
    x, r = rand((2, 3)), rand((2, 3))
    sub = rand((2, 3)).as_subclass(Intercepting)
    w = torch.ones(3).as_subclass(Intercepting)
    assert NF.fused_add_rms_norm(x, sub, (3,))[:2] == ("intercepted", "fused_add_rms_norm")
    assert NF.fused_add_rms_norm(x, r, (3,), w)[2] == {"weight": w, "eps": None}
    assert NF.fused_add_layer_norm(sub, r, (3,), eps=0.1)[2]["eps"] == 0.1
    assert NF.fused_add_layer_norm(x, r, (3,), None, w)[:2] == ("intercepted", "fused_add_layer_norm")
    assert NF.group_norm_silu(rand((2, 4, 3)).as_subclass(Intercepting), 2)[:2] == ("intercepted", "group_norm_silu")


# --------------------------------------------------------------------------------------------------
# modules
# --------------------------------------------------------------------------------------------------

MODULES = {
    "add-rms": ("FusedAddRMSNorm", "RMSNorm", (6,), {}),
    "add-rms-eps-no-affine": ("FusedAddRMSNorm", "RMSNorm", ((2, 3),), {"eps": 1e-3, "elementwise_affine": False}),
    "add-layer": ("FusedAddLayerNorm", "LayerNorm", (6,), {}),
    "add-layer-no-bias": ("FusedAddLayerNorm", "LayerNorm", (6,), {"bias": False}),
    "add-layer-no-affine": ("FusedAddLayerNorm", "LayerNorm", ((2, 3),), {"elementwise_affine": False}),
    "gn-silu": ("GroupNormSiLU", "GroupNorm", (2, 6), {}),
    "gn-silu-no-affine": ("GroupNormSiLU", "GroupNorm", (3, 6), {"affine": False, "eps": 1e-3}),
    "gn-silu-no-bias": ("GroupNormSiLU", "GroupNorm", (2, 6), {"bias": False}),
}


@pytest.mark.parametrize("key", sorted(MODULES))
def test_module_state_matches_parent_and_loads_into_torch(key):
    name, parent, args, kwargs = MODULES[key]
    torch.manual_seed(9)
    ours = getattr(NN, name)(*args, **kwargs)
    assert isinstance(ours, getattr(NN, parent)) and isinstance(ours, getattr(torch.nn, parent))
    with torch.no_grad():
        for p in ours.parameters():
            p.normal_()
    parent_ours = getattr(NN, parent)(*args, **kwargs)
    assert list(parent_ours.state_dict()) == list(ours.state_dict())
    parent_ours.load_state_dict(ours.state_dict())  # strict
    sd, psd = ours.state_dict(), parent_ours.state_dict()
    assert all(torch.equal(sd[k], psd[k]) for k in sd)
    assert ours.extra_repr() == parent_ours.extra_repr()
    if "bias" in kwargs and parent == "GroupNorm" and not TORCH_HAS_BIAS_KWARG:
        return  # torch.nn.GroupNorm(..., bias=False) needs torch 2.13
    theirs = getattr(torch.nn, parent)(*args, **kwargs)
    theirs.load_state_dict(sd)  # strict
    back = getattr(NN, name)(*args, **kwargs)
    back.load_state_dict(theirs.state_dict())
    assert all(torch.equal(a, b) for a, b in zip(back.state_dict().values(), sd.values(), strict=True))


@pytest.mark.parametrize("key", sorted(MODULES))
def test_module_forward_equals_the_composition(key, backend):
    name, parent, args, kwargs = MODULES[key]
    torch.manual_seed(10)
    m = getattr(NN, name)(*args, **kwargs)
    with torch.no_grad():
        for p in m.parameters():
            p.uniform_(0.5, 1.5)
    if parent == "GroupNorm":
        x = rand((3, 6, 4, 5))
        torch.testing.assert_close(m(x), torch_gn_silu(x, m.num_groups, m.weight, m.bias, m.eps))
        return
    shape = (4, 5, *m.normalized_shape)
    x, r = rand(shape), rand(shape)
    if parent == "RMSNorm":
        expected = torch_add_rms(x, r, m.normalized_shape, m.weight, m.eps)
    else:
        expected = torch_add_layer(x, r, m.normalized_shape, m.weight, m.bias, m.eps)
    torch.testing.assert_close(m(x, r), expected)


def test_modules_are_exported():
    for name in ("FusedAddRMSNorm", "FusedAddLayerNorm", "GroupNormSiLU"):
        assert name in NN.__all__ and hasattr(NN, name)
    for name in ("fused_add_rms_norm", "fused_add_layer_norm", "group_norm_silu"):
        assert name in NF.__all__


# --------------------------------------------------------------------------------------------------
# RMSNorm with the normalized value rounded before the weight (Hugging Face Llama's order)
# --------------------------------------------------------------------------------------------------


def torch_rms_rounded_scale(x, w, shape, eps=None):
    """Hugging Face Llama's order: normalize, round to x's dtype, then multiply by the weight."""
    return w * TF.rms_norm(x, shape, None, eps).to(x.dtype)


@pytest.mark.parametrize("shape,k", [((3, 7), 1), ((4, 1000), 1), ((2, 3, 7), 2), ((0, 7), 1)],
                         ids=["3x7", "4x1000", "2x3x7-k2", "empty"])
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("weight_dtype", ["same", "float32"])
def test_rms_norm_rounded_scale_matches_composition(dtype, weight_dtype, shape, k, backend):
    """The same outputs (bits, where the composition's steps round alike) and gradients within the
    per-dtype bound of a float64 truth; the weight in x's dtype (one pass on the cpu backend) or in
    float32 (the composition, whose product is float32)."""
    ns = tuple(shape[len(shape) - k :])
    w = (1 + 0.3 * torch.randn(ns, **F64)).to(dtype if weight_dtype == "same" else torch.float32)
    x = rand(shape, dtype, scale=3.0)
    ours = lambda x, w: NF._rms_norm_rounded_scale(x, ns, w, None)  # noqa: E731
    theirs = lambda x, w: torch_rms_rounded_scale(x, w, ns)  # noqa: E731
    y_o, y_r = check_against_torch_and_truth(ours, theirs, {"x": x, "w": w}, [rand(shape, y_dtype(x, w))],
                                             f"{dtype} weight {weight_dtype}")
    if dtype != torch.float64:  # float64: torch's rms_norm takes another path than the kernels
        # 16-bit: the product of two rounded values, rounded once: the composition's bits
        assert_same_rounding(y_o[0], y_r[0])


def assert_same_rounding(ours: torch.Tensor, theirs: torch.Tensor) -> None:
    """The composition's bits, but for rare elements one unit in the last place apart: the two compute
    rstd in float32 by different summation orders, and a rstd an ulp apart rounds differently where the
    16-bit value lies on a rounding boundary (about one element in several thousand). A wrong rounding
    order differs in a quarter of the elements or more. float32: within a few ulps."""
    if ours.dtype == torch.float32:
        torch.testing.assert_close(ours, theirs, rtol=0, atol=2e-6)
        return
    differ = ours != theirs
    assert int(differ.sum()) <= max(1, ours.numel() // 1000), f"{int(differ.sum())} of {ours.numel()} differ"
    ulp = torch.finfo(ours.dtype).eps * theirs.double().abs()
    assert bool(((ours.double() - theirs.double()).abs() <= ulp)[differ].all())


def y_dtype(x, w):
    return torch.promote_types(x.dtype, w.dtype)


def test_rms_norm_rounded_scale_saves_only_the_input_and_rstd():
    """On the cpu backend a 16-bit weight in the input's dtype takes one pass, which keeps nothing but
    the input and one float per row for the backward (the composition also keeps the rounded
    normalized value for the weight's gradient)."""
    if "cpu" not in BACKENDS:
        pytest.skip("the cpu backend is not available")
    from normkit.bench import saved_bytes

    x = rand((64, 256), torch.bfloat16).requires_grad_()
    w = (1 + 0.3 * torch.randn(256, **F64)).to(torch.bfloat16).requires_grad_()
    with normkit.use_backend("cpu"):
        fused = saved_bytes(lambda x, w: NF._rms_norm_rounded_scale(x, (256,), w, None), [x, w])
    composed = saved_bytes(lambda x, w: torch_rms_rounded_scale(x, w, (256,)), [x, w])
    assert fused.new == 64 * 4  # rstd: one float32 per row
    assert composed.new >= 64 * 256 * 2  # the rounded normalized value, bfloat16


# --------------------------------------------------------------------------------------------------
# Weightless RMSNorm with the scale rounded before it multiplies x (DeepSeek-V4's order)
# --------------------------------------------------------------------------------------------------


def torch_rms_rounded_rstd(x, shape, eps):
    """DeepSeek-V4's order: the scale in float32, rounded to x's dtype, then times x."""
    dims = tuple(range(-len(shape), 0))
    return x * torch.rsqrt(x.float().square().mean(dims, keepdim=True) + eps).to(x.dtype)


@pytest.mark.parametrize("shape,k", [((3, 7), 1), ((4, 1000), 1), ((2, 3, 7), 2), ((0, 7), 1)],
                         ids=["3x7", "4x1000", "2x3x7-k2", "empty"])
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
def test_rms_norm_rounded_rstd_matches_composition(dtype, shape, k, backend):
    """The composition's bits in 16-bit (x times a rounded scale is exact in float32, so both round the
    same product once; see assert_same_rounding), float32 within a few ulps, gradients within the
    per-dtype bound of a float64 truth."""
    ns = tuple(shape[len(shape) - k :])
    x = rand(shape, dtype, scale=3.0)
    ours = lambda x: NF._rms_norm_rounded_rstd(x, ns, 1e-6)  # noqa: E731
    theirs = lambda x: torch_rms_rounded_rstd(x, ns, 1e-6)  # noqa: E731
    y_o, y_r = check_against_torch_and_truth(ours, theirs, {"x": x}, [rand(shape, dtype)], f"{dtype}")
    if dtype != torch.float64:  # float64 is the composition on every backend
        assert_same_rounding(y_o[0], y_r[0])
    else:
        assert torch.equal(y_o[0], y_r[0])


def test_rms_norm_rounded_rstd_saves_only_the_input_and_rstd():
    """On the cpu backend the one pass keeps nothing but the input and one float per row for the
    backward (the composition keeps a float32 copy of x and the rounded scale)."""
    if "cpu" not in BACKENDS:
        pytest.skip("the cpu backend is not available")
    from normkit.bench import saved_bytes

    x = rand((64, 256), torch.bfloat16).requires_grad_()
    with normkit.use_backend("cpu"):
        fused = saved_bytes(lambda x: NF._rms_norm_rounded_rstd(x, (256,), 1e-6), [x])
    composed = saved_bytes(lambda x: torch_rms_rounded_rstd(x, (256,), 1e-6), [x])
    assert fused.new == 64 * 4  # rstd: one float32 per row
    assert composed.new >= 64 * 256 * 4  # the float32 copy of x



# --------------------------------------------------------------------------------------------------
# the gated RMSNorm of linear-attention layers (converted GLM-5-Next, Qwen3-Next, Falcon-H1 norms)
# --------------------------------------------------------------------------------------------------

GATE_ACTS = {"silu": TF.silu, "sigmoid": torch.sigmoid}


def torch_gated_rms(x, gate, shape, w, eps, act, round_first, work=torch.float32, gate_first=False, group=None):
    """The originals: the norm and the weight in float32, times the gate's activation, one rounding
    (GLM-5-Next, Falcon-H1); or Llama's norm rounded to x's dtype first (Qwen3-Next). ``gate_first``: the
    norm of ``x · act(gate)`` (Mamba-2 with ``round_first``, Falcon-H1's other order without); ``group``:
    the norm over each ``group`` elements of the last dim. ``work=float64`` is the truth: the same
    arithmetic without the float32 steps."""
    n = shape[-1]
    size = group or n
    h = x.to(work) * GATE_ACTS[act](gate.to(work)) if gate_first else x.to(work)
    y = TF.rms_norm(h.unflatten(-1, (n // size, size)), (size,), None, eps).flatten(-2)
    y = (w * y.to(x.dtype)).to(work) if round_first else y * w.to(work)
    if not gate_first:
        y = y * GATE_ACTS[act](gate.to(work))
    return y.to(x.dtype)


def gated_case(shape, dtype, round_first):
    n = shape[-1]
    x, gate = rand(shape, dtype, scale=2.0, shift=0.5), rand(shape, dtype, scale=3.0)
    w = (1 + 0.5 * torch.randn(n, **F64)).to(dtype if round_first else param_dtype(dtype))
    return {"x": x, "gate": gate, "w": w}, (n,)


GATED_MODES = {"after": (False, None), "after-groups": (False, 8), "first": (True, None), "first-groups": (True, 8)}


@pytest.mark.parametrize("mode", sorted(GATED_MODES))
@pytest.mark.parametrize("shape", [(3, 7), (4, 1000), (2, 3, 64)], ids=["3x7", "4x1000", "2x3x64"])
@pytest.mark.parametrize("round_first", [False, True], ids=["float32", "rounded-first"])
@pytest.mark.parametrize("act", sorted(GATE_ACTS))
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
def test_gated_rms_norm_inference_matches_the_originals(dtype, act, round_first, shape, mode, backend):
    """In inference (the cpu backend's one pass): the originals' result within the per-dtype bound of the
    float64 truth, and in 16-bit their bits but for rare elements one unit apart (the gate's activation
    and rstd are a few float32 ulps from torch's)."""
    gate_first, group = GATED_MODES[mode]
    if group and shape[-1] % group:
        pytest.skip("the row is not a whole number of groups")
    t, ns = gated_case(shape, dtype, round_first)
    kw = {"gate_first": gate_first, "group": group}
    with torch.no_grad():
        ours = NF._gated_rms_norm(t["x"], t["gate"], ns, t["w"], 1e-6, act, round_first, gate_first, group)
        theirs = torch_gated_rms(t["x"], t["gate"], ns, t["w"], 1e-6, act, round_first, **kw)
        truth = torch_gated_rms(*(v.double() for v in (t["x"], t["gate"])), ns, t["w"].double(), 1e-6, act,
                                round_first, work=torch.float64, **kw)
    assert ours.dtype == theirs.dtype == dtype and ours.shape == theirs.shape
    if dtype == torch.float64:  # the originals compute float64 input in float32: so does this, as they do
        assert_close(ours, theirs, torch.float32)
    else:
        assert_close(ours, truth, dtype, baseline=theirs)
    if dtype in (torch.bfloat16, torch.float16):
        # rare elements a unit or two apart (two apart where Llama's rounded norm and then the product each
        # land on the other side of a boundary; subnormals' units are larger than eps relative)
        differ = ours != theirs
        assert int(differ.sum()) <= max(2, ours.numel() // 100), f"{int(differ.sum())} of {ours.numel()} differ"
        info = torch.finfo(dtype)
        units = 2 * (info.eps * theirs.double().abs() + info.smallest_normal * info.eps)
        assert bool(((ours.double() - theirs.double()).abs() <= units)[differ].all())


@pytest.mark.parametrize("mode", sorted(GATED_MODES))
@pytest.mark.parametrize("round_first", [False, True], ids=["float32", "rounded-first"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_gated_rms_norm_gradients(dtype, round_first, mode, backend):
    """With a gradient it is the composition: outputs and the gradients of x, the gate and the weight."""
    gate_first, group = GATED_MODES[mode]
    kw = {"gate_first": gate_first, "group": group}
    t, ns = gated_case((4, 3, 96), dtype, round_first)
    check_against_torch_and_truth(
        lambda x, gate, w: NF._gated_rms_norm(x, gate, ns, w, 1e-6, "silu", round_first, gate_first, group),
        lambda x, gate, w: torch_gated_rms(x, gate, ns, w, 1e-6, "silu", round_first, **kw),
        t, [rand((4, 3, 96), dtype)], f"{dtype} {round_first} {mode}",
        truth_fn=lambda x, gate, w: torch_gated_rms(x, gate, ns, w, 1e-6, "silu", round_first, torch.float64, **kw),
    )


def test_gated_rms_norm_runs_one_pass_in_inference_only(monkeypatch):
    """The cpu backend calls its row kernel once, with the gate, when nothing needs a gradient, and the
    composition otherwise; non-contiguous inputs are taken too."""
    if "cpu" not in BACKENDS:
        pytest.skip("the cpu backend is not available")
    from normkit.backends.cpu import kernels as K

    calls = []
    original = K.row_forward
    monkeypatch.setattr(K, "row_forward", lambda *a, **k: calls.append(k.get("gate") is not None) or original(*a, **k))
    x, gate = rand((8, 6, 32), torch.bfloat16).transpose(0, 1), rand((8, 6, 32), torch.bfloat16).transpose(0, 1)
    w = torch.ones(32, dtype=torch.bfloat16, requires_grad=True)
    with normkit.use_backend("cpu"):
        with torch.no_grad():
            y = NF._gated_rms_norm(x, gate, (32,), w, 1e-6, "sigmoid", True)
            NF._gated_rms_norm(x, gate, (32,), w, 1e-6, "silu", True, gate_first=True, group_size=8)  # Mamba-2's
        assert calls == [True, True]
        calls.clear()
        y_grad = NF._gated_rms_norm(x, gate, (32,), w, 1e-6, "sigmoid", True)
        assert y_grad.requires_grad and True not in calls
    assert_same_rounding(y, y_grad.detach())


def test_gated_rms_norm_checks_its_arguments():
    x = rand((2, 8))
    with pytest.raises(ValueError, match="activation must be one of"):
        NF._gated_rms_norm(x, x, (8,), torch.ones(8), 1e-6, "relu")
    with pytest.raises(ValueError, match="gate must have the input's shape and dtype"):
        NF._gated_rms_norm(x, x.double(), (8,), torch.ones(8), 1e-6)
    with pytest.raises(RuntimeError, match="Expected weight to be of same shape"):
        NF._gated_rms_norm(x, x, (8,), torch.ones(7), 1e-6)
    with pytest.raises(ValueError, match="group_size 3 must divide normalized_shape"):
        NF._gated_rms_norm(x, x, (8,), torch.ones(8), 1e-6, group_size=3)
    with pytest.raises(ValueError, match="normalized_shape must be the last dim"):
        NF._gated_rms_norm(x, x, (2, 8), torch.ones(2, 8), 1e-6)
