"""The triton backend: every kernel, forward and backward, against a float64 truth.

Without a GPU these tests run the kernels in Triton's interpreter on CPU tensors, which needs
``TRITON_INTERPRET=1`` in the environment *before* triton is imported, so this file runs as its own
pytest invocation (the rest of the suite must not run in the slow interpreter)::

    TRITON_INTERPRET=1 python -m pytest -q tests/test_triton_backend.py

A plain ``python -m pytest`` skips the CPU cases here (and runs the CUDA ones where a GPU is present).
Tiles are capped at a few elements (:func:`normkit.backends.triton.config.block_cap`) in the cases marked
``cap``, so that the loops over column blocks, channel blocks and spatial chunks, and programs owning
several row tiles, all run at sizes the interpreter executes in a second. The matrix covers each kernel,
dtype and layout once rather than their product.
"""

from __future__ import annotations

import contextlib
import math
import os
import re

import pytest
import torch
import torch.nn.functional as F

import normkit
import normkit.functional as NF
from normkit import backends
from normkit.testing import assert_close

try:
    from normkit.backends.triton import config
except ImportError:  # triton not installed
    config = None

INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
pytestmark = [
    pytest.mark.skipif(config is None, reason="triton is not installed (pip install triton)"),
    pytest.mark.filterwarnings("ignore:Mismatch dtype between input and weight:UserWarning"),
]

DEVICES = [
    pytest.param("cpu", marks=pytest.mark.skipif(
        not INTERPRET, reason="CPU tensors run the kernels only under TRITON_INTERPRET=1 (see the module docstring)"
    )),
    pytest.param("cuda", marks=pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")),
]
FP32, BF16, FP16 = torch.float32, torch.bfloat16, torch.float16


@pytest.fixture(params=DEVICES)
def device(request):
    with normkit.use_backend("triton"):
        yield request.param


def cap(elements: int | None):
    return config.block_cap(elements) if elements else contextlib.nullcontext()


def rand(shape, dtype=FP32, device="cpu", scale=1.0, shift=0.0) -> torch.Tensor:
    return (torch.randn(shape, dtype=torch.float64) * scale + shift).to(device=device, dtype=dtype)


def param_dtype(op: str, dtype: torch.dtype, device: str) -> torch.dtype:
    """float32 parameters (mixed precision), except where torch's CUDA kernels take only the input's
    dtype (LayerNorm and GroupNorm, fused or not: see test_cuda_parameter_dtypes_like_torch)."""
    if device == "cuda" and ("layer_norm" in op or "group_norm" in op):
        return dtype
    return FP32


class TorchOps:
    """torch's functions, and the compositions the fused ops replace, under normkit.functional's names.

    ``round_to``: the fused adds define ``h = x + residual`` rounded to x's dtype; a float64 truth rounds
    h the same way (with an identity gradient), so that it differs from the result only by the norm's error.
    """

    rms_norm, group_norm = staticmethod(F.rms_norm), staticmethod(F.group_norm)
    batch_norm, instance_norm = staticmethod(F.batch_norm), staticmethod(F.instance_norm)

    def __init__(self, round_to: torch.dtype | None = None):
        self.round_to = round_to

    def _add(self, x, r):
        h = x + r
        if self.round_to is not None and h.dtype != self.round_to:
            h = h + (h.detach().to(self.round_to).to(h.dtype) - h.detach())
        return h

    @staticmethod
    def layer_norm(x, shape, w=None, b=None, eps=1e-5):
        if w is None and b is not None:  # the same function, around torch's bias-without-weight bug
            w = torch.ones(shape, dtype=b.dtype, device=b.device)
        return F.layer_norm(x, shape, w, b, eps)

    @staticmethod
    def _rms_norm_rounded_scale(x, shape, w, eps=None):
        return w * F.rms_norm(x, shape, None, eps).to(x.dtype)

    @staticmethod
    def _rms_norm_rounded_rstd(x, shape, eps):
        return x * torch.rsqrt(x.float().square().mean(-1, keepdim=True) + eps).to(x.dtype)

    def fused_add_rms_norm(self, x, r, shape, w=None, eps=None):
        h = self._add(x, r)
        return F.rms_norm(h, shape, w, eps), h

    def fused_add_layer_norm(self, x, r, shape, w=None, b=None, eps=1e-5):
        h = self._add(x, r)
        return self.layer_norm(h, shape, w, b, eps), h

    @staticmethod
    def group_norm_silu(x, groups, w=None, b=None, eps=1e-5):
        return F.silu(F.group_norm(x, groups, w, b, eps))


def ran_triton(t: torch.Tensor, eager_function: bool = False) -> bool:
    """Whether ``t``'s autograd graph, within a few nodes (a layout copy may follow), holds a triton op
    (the custom op under torch.compile, its eager autograd.Function otherwise; with ``eager_function``,
    only the latter: eager calls must not pay the custom op's dispatch)."""
    nodes = [t.grad_fn]
    for _ in range(3):
        names = [type(n).__name__ for n in nodes]
        if any(name.startswith("_Triton") or ("normkit_triton" in name and not eager_function) for name in names):
            return True
        nodes = [f for n in nodes for f, _ in n.next_functions if f is not None]
    return False


def _leaf(t, dtype=None):
    if t is None:
        return None
    return t.detach().to(dtype or t.dtype).clone(memory_format=torch.preserve_format).requires_grad_()


def check(op, tensors: list, dtype: torch.dtype, n_outputs: int = 1, msg: str = ""):
    """Run ``op(namespace, *tensors)`` on the triton backend, with torch on the same inputs (the
    baseline) and with torch on float64 copies (the truth); compare every output and gradient under
    the per-dtype bound ``|ours - truth| <= 2·|torch - truth| + atol + rtol·|truth|``.

    Also asserts that the triton kernels ran (the output's autograd node is the custom op's), so that a
    silent fallback to the reference cannot pass. Returns normkit's outputs and leaves."""
    ours = [_leaf(t) for t in tensors]
    truth = [_leaf(t, torch.float64) for t in tensors]
    theirs = [_leaf(t) for t in tensors]
    out = op(NF, *ours)
    out_t, out_b = op(TorchOps(round_to=dtype), *truth), op(TorchOps(), *theirs)
    out, out_t, out_b = ([o] if n_outputs == 1 else list(o) for o in (out, out_t, out_b))
    assert ran_triton(out[0]), f"{msg}: not run by the triton kernels"
    gen = torch.Generator().manual_seed(7)
    grads = [torch.randn(o.shape, dtype=torch.float64, generator=gen).to(o.device) for o in out_t]
    torch.autograd.backward(out, [g.to(o.dtype) for g, o in zip(grads, out, strict=True)])
    torch.autograd.backward(out_t, grads)
    torch.autograd.backward(out_b, [g.to(o.dtype) for g, o in zip(grads, out_b, strict=True)])
    for i, (o, t, b) in enumerate(zip(out, out_t, out_b, strict=True)):
        assert o.dtype == b.dtype and o.shape == b.shape, f"{msg} output {i}"
        assert_close(o, t, dtype, baseline=b, msg=f"{msg} output {i}")
    for i, (a, t, b) in enumerate(zip(ours, truth, theirs, strict=True)):
        if a is None:
            continue
        assert a.grad.dtype == a.dtype, f"{msg} grad {i} dtype"
        # parameter gradients are sums over many rows: compare them relative to their scale
        scale = max(1.0, float(t.grad.abs().max()))
        assert_close(a.grad.double() / scale, t.grad / scale, dtype, baseline=b.grad.double() / scale,
                     msg=f"{msg} grad {i}")
    return out, ours


# --------------------------------------------------------------------------------------------------
# row kernels: LayerNorm, RMSNorm, add+RMSNorm, add+LayerNorm
# --------------------------------------------------------------------------------------------------

# (op, shape, normalized dims, dtype, tile cap, weight, bias); a cap below the row length runs the
# column-block loops, a cap below rows x columns the several-rows-per-program tiles
ROW_CASES = [
    ("layer_norm", (5, 7), 1, FP32, None, True, True),
    ("layer_norm", (3, 40), 1, BF16, 16, True, True),
    ("layer_norm", (2, 3, 7), 2, FP16, 16, True, False),
    ("layer_norm", (7, 3), 1, BF16, 4, False, True),
    ("rms_norm", (6, 33), 1, BF16, None, True, False),
    ("rms_norm", (3, 50), 1, FP32, 16, True, False),
    ("rms_norm", (4, 9), 1, FP16, None, False, False),
    ("fused_add_rms_norm", (4, 24), 1, BF16, 8, True, False),
    ("fused_add_rms_norm", (5, 7), 1, FP32, None, True, False),
    ("fused_add_layer_norm", (3, 37), 1, FP16, 16, True, True),
    ("fused_add_layer_norm", (6, 12), 1, BF16, None, False, True),
]


def _row_call(op, shape, k):
    ns = tuple(shape[len(shape) - k:])
    if op == "layer_norm":
        return lambda f, x, w, b: f.layer_norm(x, ns, w, b), 1
    if op == "rms_norm":
        return lambda f, x, w, b: f.rms_norm(x, ns, w, 1e-6), 1
    if op == "fused_add_rms_norm":
        return lambda f, x, r, w, b: f.fused_add_rms_norm(x, r, ns, w, 1e-6), 2
    return lambda f, x, r, w, b: f.fused_add_layer_norm(x, r, ns, w, b), 2


@pytest.mark.parametrize(
    "op,shape,k,dtype,block,has_w,has_b", ROW_CASES,
    ids=[f"{c[0]}-{'x'.join(map(str, c[1]))}-{str(c[3])[6:]}-cap{c[4]}" for c in ROW_CASES],
)
def test_row_kernels_match_truth(op, shape, k, dtype, block, has_w, has_b, device):
    torch.manual_seed(0)
    ns = shape[len(shape) - k:]
    pdt = param_dtype(op, dtype, device)
    w = rand(ns, pdt, device, 0.5, 1.0) if has_w else None
    b = rand(ns, pdt, device, 0.5) if has_b else None
    x = rand(shape, dtype, device, 2.0, 1.0)
    call, n_out = _row_call(op, shape, k)
    tensors = [x, w, b] if n_out == 1 else [x, rand(shape, dtype, device), w, b]
    with cap(block):
        out, leaves = check(call, tensors, dtype, n_out, msg=op)
    if n_out == 2:  # h is x + residual rounded once to x's dtype, bit for bit
        assert torch.equal(out[1], tensors[0] + tensors[1])


@pytest.mark.parametrize("block", [None, 16])
def test_row_kernels_on_strided_and_transposed_input(block, device):
    wide = rand((6, 40), BF16, device)
    x = wide[:, 3:30]  # rows 27 long, 40 apart: read in place
    w = rand((27,), param_dtype("layer_norm", BF16, device), device)
    with cap(block):
        check(lambda f, x, w: f.layer_norm(x, (27,), w), [x, w], BF16, msg="row slice")
        xt = rand((9, 5), FP32, device).t()  # non-contiguous rows: copied
        y, _ = check(lambda f, x: f.rms_norm(x, (9,)), [xt], FP32, msg="transposed")
    assert y[0].is_contiguous()


@pytest.mark.parametrize("block", [None, 16])
def test_large_mean_does_not_cancel(block, device):
    x = rand((4, 48), FP32, device, 0.01, 1e4)
    with cap(block):
        check(lambda f, x: f.layer_norm(x, (48,)), [x], FP32, msg="1e4 + N(0, 0.01)")
        x = rand((2, 4, 6, 5), FP32, device, 0.01, 1e4).contiguous(memory_format=torch.channels_last)
        check(lambda f, x: f.batch_norm(x, None, None, None, None, True), [x], FP32, msg="bn 1e4")
        check(lambda f, x: f.group_norm(x, 2), [x], FP32, msg="gn 1e4")


@pytest.mark.parametrize("block", [None, 16])
@pytest.mark.parametrize("dtype", [BF16, FP16], ids=["bf16", "fp16"])
def test_rms_norm_rounded_before_the_weight(dtype, block, device):
    """Hugging Face Llama's order in one kernel (a weight in x's dtype): the normalized value rounded to
    x's dtype, then times the weight; the composition's bits exactly, gradients under the bound."""
    x, w = rand((5, 40), dtype, device, 2.0), rand((40,), dtype, device, 0.3, 1.0)
    op = lambda f, x, w: f._rms_norm_rounded_scale(x, (40,), w, 1e-6)  # noqa: E731
    with cap(block):
        out, _ = check(op, [x, w], dtype, msg="rounded before the weight")
    assert torch.equal(out[0].detach(), TorchOps._rms_norm_rounded_scale(x, (40,), w, 1e-6))


@pytest.mark.parametrize("block", [None, 16])
@pytest.mark.parametrize("dtype", [BF16, FP16], ids=["bf16", "fp16"])
def test_rms_norm_scale_rounded_before_the_multiply(dtype, block, device):
    """DeepSeek-V4's weightless order in one kernel: the scale rounded to x's dtype, then times x; the
    composition's bits (x times a 16-bit scale is exact in float32), gradients under the bound."""
    x = rand((5, 40), dtype, device, 2.0)
    op = lambda f, x: f._rms_norm_rounded_rstd(x, (40,), 1e-6)  # noqa: E731
    with cap(block):
        out, _ = check(op, [x], dtype, msg="scale rounded before the multiply")
    assert ran_triton(out[0], eager_function=True)
    assert torch.equal(out[0].detach(), TorchOps._rms_norm_rounded_rstd(x, (40,), 1e-6))


@pytest.mark.parametrize("mode", ["after", "after-groups", "first", "first-groups"])
@pytest.mark.parametrize("block", [None, 16])
@pytest.mark.parametrize("round_first", [False, True], ids=["float32", "rounded-first"])
@pytest.mark.parametrize("act", ["silu", "sigmoid"])
@pytest.mark.parametrize("dtype", [FP32, BF16], ids=["fp32", "bf16"])
def test_gated_rms_norm_in_one_kernel(dtype, act, round_first, block, mode, device, monkeypatch):
    """The gated RMSNorm of converted linear-attention layers in inference: one kernel (one tile and column
    blocks), the composition's result within the per-dtype bound of a float64 truth."""
    from normkit.backends.triton.kernels import rows

    gated_launches = []
    original = rows.row_forward
    monkeypatch.setattr(
        rows, "row_forward", lambda *a, **k: gated_launches.append(k.get("gate") is not None) or original(*a, **k)
    )
    gate_first, size = mode.startswith("first"), 8 if mode.endswith("groups") else 40
    x, gate = rand((5, 40), dtype, device, 2.0, 0.5), rand((5, 40), dtype, device, 3.0)
    w = rand((40,), dtype if round_first else FP32, device, 0.5, 1.0)
    acts = {"silu": F.silu, "sigmoid": torch.sigmoid}

    def composition(x, gate, w, work):  # the originals' casts (see tests/test_fused.py)
        h = x.to(work) * acts[act](gate.to(work)) if gate_first else x.to(work)
        y = F.rms_norm(h.unflatten(-1, (40 // size, size)), (size,), None, 1e-6).flatten(-2)
        y = (w * y.to(x.dtype)).to(work) if round_first else y * w.to(work)
        return (y if gate_first else y * acts[act](gate.to(work))).to(x.dtype)

    with cap(block), torch.no_grad():
        ours = NF._gated_rms_norm(x, gate, (40,), w, 1e-6, act, round_first, gate_first, size)
        theirs = composition(x, gate, w, torch.float32)
        truth = composition(x.double(), gate.double(), w.double(), torch.float64)
    assert ours.dtype == dtype and gated_launches == [True]
    assert_close(ours, truth, dtype, baseline=theirs)


def test_bfloat16_parameters_with_bfloat16_input(device):
    x, w, b = rand((5, 20), BF16, device), rand((20,), BF16, device), rand((20,), BF16, device)
    check(lambda f, x, w, b: f.layer_norm(x, (20,), w, b), [x, w, b], BF16, msg="bf16 parameters")
    img = rand((2, 4, 3, 3), BF16, device)
    check(lambda f, x, w, b: f.group_norm(x, 2, w[:4], b[:4]), [img, w, b], BF16, msg="gn bf16 parameters")


# --------------------------------------------------------------------------------------------------
# channel kernels: GroupNorm, InstanceNorm, GroupNorm+SiLU, BatchNorm
# --------------------------------------------------------------------------------------------------

# (op, shape, groups, dtype, layout, tile cap)
CHANNEL_CASES = [
    ("group_norm", (2, 6, 5, 5), 3, FP32, "nchw", None),
    ("group_norm", (2, 6, 5, 5), 3, BF16, "channels_last", 16),
    ("group_norm", (3, 4, 7), 2, FP16, "nchw", None),
    ("group_norm", (4, 8), 2, BF16, "nchw", None),
    ("group_norm", (2, 40, 3), 1, FP32, "nchw", 16),  # a group wider than a tile: channel blocks
    ("group_norm", (2, 6, 3, 2, 2), 2, BF16, "channels_last", None),
    ("group_norm_silu", (2, 6, 5, 5), 3, BF16, "channels_last", None),
    ("group_norm_silu", (2, 8, 9), 4, FP32, "nchw", 16),
    ("group_norm_silu", (2, 4, 3, 3), 2, FP16, "strided", None),
    ("instance_norm", (2, 8, 3, 3), None, FP32, "channels_last", None),
    ("instance_norm", (2, 3, 11), None, BF16, "nchw", 8),
    ("batch_norm", (4, 6, 5, 5), None, FP32, "nchw", None),
    ("batch_norm", (4, 6, 5, 5), None, BF16, "channels_last", 16),
    ("batch_norm", (9, 5), None, FP16, "nchw", None),
    ("batch_norm", (3, 4, 7), None, BF16, "nchw", 8),
    ("batch_norm_eval", (4, 6, 3, 3), None, BF16, "channels_last", None),
    ("batch_norm_eval", (5, 3, 4), None, FP32, "nchw", None),
]


def _layout(x, layout):
    if layout == "channels_last":
        return x.contiguous(memory_format=torch.channels_last if x.dim() == 4 else torch.channels_last_3d)
    if layout == "strided":
        return torch.cat([x, x], dim=-1)[..., : x.shape[-1]]
    return x


def _channel_call(op, groups, c, device):
    if op == "group_norm":
        return lambda f, x, w, b: f.group_norm(x, groups, w, b)
    if op == "group_norm_silu":
        return lambda f, x, w, b: f.group_norm_silu(x, groups, w, b)
    if op == "instance_norm":
        return lambda f, x, w, b: f.instance_norm(x, None, None, w, b)
    if op == "batch_norm":
        return lambda f, x, w, b: f.batch_norm(x, None, None, w, b, True)
    rm, rv = rand((c,), FP32, device, 0.5), rand((c,), FP32, device, 0.1, 1.0).abs()
    return lambda f, x, w, b: f.batch_norm(x, rm.to(torch.float64 if x.dtype == torch.float64 else FP32),
                                           rv.to(torch.float64 if x.dtype == torch.float64 else FP32), w, b, False)


@pytest.mark.parametrize(
    "op,shape,groups,dtype,layout,block", CHANNEL_CASES,
    ids=[f"{c[0]}-{'x'.join(map(str, c[1]))}-{str(c[3])[6:]}-{c[4]}-cap{c[5]}" for c in CHANNEL_CASES],
)
def test_channel_kernels_match_truth(op, shape, groups, dtype, layout, block, device):
    torch.manual_seed(1)
    c = shape[1]
    x = _layout(rand(shape, dtype, device, 2.0, 0.5), layout)
    pdt = param_dtype(op, dtype, device)
    w, b = rand((c,), pdt, device, 0.5, 1.0), rand((c,), pdt, device, 0.5)
    with cap(block):
        out, leaves = check(_channel_call(op, groups, c, device), [x, w, b], dtype, msg=op)
    if layout == "channels_last" and op != "instance_norm":  # as torch: InstanceNorm returns contiguous
        assert out[0].is_contiguous(memory_format=torch.channels_last if x.dim() == 4 else torch.channels_last_3d)
        assert leaves[0].grad.stride() == x.stride()


# (op, shape, groups, dtype, layout, tile cap, splits): a set's positions over several programs
SPLIT_CASES = [
    ("group_norm", (2, 6, 7, 5), 3, FP32, "nchw", 16, 2),  # 5 tiles of 8 positions: spans of 3 and 2
    ("group_norm", (2, 6, 7, 5), 3, BF16, "channels_last", 16, 3),
    ("group_norm", (1, 4, 9, 4), 2, FP16, "nchw", 16, 5),  # a tile each (the last one part-filled)
    ("group_norm", (2, 40, 9), 1, FP32, "nchw", 16, 2),  # channel blocks within each split
    ("group_norm_silu", (2, 6, 7, 5), 3, BF16, "nchw", 16, 2),
    ("group_norm_silu", (1, 8, 6, 6), 4, FP32, "channels_last", 32, 4),
    ("instance_norm", (2, 3, 37), None, FP32, "nchw", 8, 3),
]


@pytest.mark.parametrize(
    "op,shape,groups,dtype,layout,block,splits", SPLIT_CASES,
    ids=[f"{c[0]}-{'x'.join(map(str, c[1]))}-{str(c[3])[6:]}-{c[4]}-split{c[6]}" for c in SPLIT_CASES],
)
def test_split_sets_match_truth(op, shape, groups, dtype, layout, block, splits, device):
    """Sets split over programs (few sets: small batches) compute what one program per set does: outputs
    and gradients against the float64 truth, with and without affine parameters."""
    torch.manual_seed(2)
    c = shape[1]
    x = _layout(rand(shape, dtype, device, 2.0, 0.5), layout)
    pdt = param_dtype(op, dtype, device)
    w, b = rand((c,), pdt, device, 0.5, 1.0), rand((c,), pdt, device, 0.5)
    with cap(block), config.tuning(set_splits=splits):
        check(_channel_call(op, groups, c, device), [x, w, b], dtype, msg=f"{op} split {splits}")
        if op != "group_norm_silu":  # GroupNorm+SiLU always has its affine parameters
            check(_channel_call(op, groups, c, device), [x, None, None], dtype, msg=f"{op} split {splits} plain")


def test_few_sets_are_split_over_programs():
    """``config.set_splits``: one program per set while there are as many as SMs; with fewer, enough
    splits of at least 8192 elements for about two programs an SM; a tuned value is capped at the tiles."""
    sms = 132
    assert config.set_splits(sms, 100, sms, 4096) == 1 and config.set_splits(1, 3, sms, 4096) == 1
    assert config.set_splits(32, 128, sms, 4096) == 9  # GroupNorm(32) at batch 1: 288 programs
    assert config.set_splits(1, 100, sms, 4096) == 50  # splits of two 4096-element tiles or more
    assert config.set_splits(1, 100, sms, 8192) == 100  # or of one 8192-element tile
    assert config.set_splits(1, 100, sms, 1024) == 12
    with config.tuning(set_splits=64):
        assert config.set_splits(sms, 10, sms, 4096) == 10


@pytest.mark.skipif(not INTERPRET, reason="the interpreter's three SMs make one sample's sets few")
def test_split_sets_are_what_the_default_runs_for_one_sample():
    """The default launch splits a lone sample's sets (GroupNorm(2) at batch 1 on the interpreter's three
    SMs): same results as one program per set, within float32 rounding, and deterministic."""
    x = rand((1, 4, 16, 16), FP32, "cpu", 2.0, 0.5).requires_grad_()
    with normkit.use_backend("triton"), cap(64):
        runs = []
        for splits in (None, 1):
            with config.tuning(set_splits=splits) if splits else contextlib.nullcontext():
                y = NF.group_norm(x, 2)
                runs.append((y, *torch.autograd.grad(y.square().sum(), x)))
        again = NF.group_norm(x, 2)
    with cap(64):  # one tile is then the least a split reads
        assert config.set_splits(2, 4, config.num_sms(torch.device("cpu")), 64) > 1
    assert torch.equal(runs[0][0], again)
    for a, b in zip(*runs, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("norm", ["batch", "instance"])
@pytest.mark.parametrize("dtype,layout", [(FP32, "nchw"), (BF16, "channels_last")])
def test_running_statistics_update_like_torch(norm, dtype, layout, device):
    x = _layout(rand((4, 6, 3, 5), dtype, device, 3.0, 2.0), layout)
    fns = {"batch": (NF.batch_norm, F.batch_norm), "instance": (NF.instance_norm, F.instance_norm)}[norm]
    stats = []
    for fn, data, dtype_ in ((fns[0], x, FP32), (fns[1], x, FP32), (fns[1], x.double(), torch.float64)):
        rm, rv = torch.zeros(6, device=device, dtype=dtype_), torch.ones(6, device=device, dtype=dtype_)
        for _ in range(3):
            fn(data, rm, rv, None, None, True, 0.3, 1e-5)
        stats.append((rm, rv))
    # against the float64 truth on the same data, within twice torch's own error on it
    for ours, theirs, truth in zip(*stats, strict=True):
        assert_close(ours, truth, FP32, baseline=theirs)
    # eval after training normalizes with the running statistics just updated
    rm, rv = stats[0]
    if norm == "batch":
        y = NF.batch_norm(x, rm, rv, None, None, False)
    else:
        y = NF.instance_norm(x, rm, rv, None, None, False)
    assert_close(y, F.batch_norm(x.double(), rm.double(), rv.double(), None, None, False), dtype)


# --------------------------------------------------------------------------------------------------
# reproducibility, memory, fallbacks, edges
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("block", [None, 16])
def test_gradients_are_bitwise_reproducible(block, device):
    x = rand((13, 40), BF16, device)
    w = rand((40,), FP32, device).requires_grad_()
    img = rand((3, 8, 4, 4), BF16, device).contiguous(memory_format=torch.channels_last)
    w2 = rand((8,), FP32, device).requires_grad_()
    w3 = rand((8,), param_dtype("group_norm", BF16, device), device).requires_grad_()
    grads = []
    with cap(block):
        for _ in range(2):
            (NF.rms_norm(x, (40,), w).float() ** 2).sum().backward()
            (NF.batch_norm(img, None, None, w2, None, True).float() ** 3).sum().backward()
            (NF.group_norm_silu(img, 4, w3, w3).float() ** 2).sum().backward()
            grads.append((w.grad.clone(), w2.grad.clone(), w3.grad.clone()))
            w.grad = w2.grad = w3.grad = None
    assert all(torch.equal(a, b) for a, b in zip(*grads, strict=True))


def test_inference_runs_the_kernels_without_autograd(device):
    """Without a gradient to compute, the kernels run without the autograd.Function (and eval BatchNorm
    without statistics tensors): the same bits as the recorded call, and no graph."""
    x, img = rand((6, 40), BF16, device), rand((4, 6, 5, 5), BF16, device)
    pd = param_dtype("layer_norm", BF16, device)
    w, w6, b6 = rand((40,), pd, device), rand((6,), pd, device), rand((6,), pd, device)
    rm, rv = rand((6,), FP32, device), rand((6,), FP32, device).abs() + 0.5
    calls = {
        "layer_norm": (lambda w: NF.layer_norm(x, (40,), w), w),
        "rms_norm": (lambda w: NF.rms_norm(x, (40,), w), w),
        "group_norm": (lambda w: NF.group_norm(img, 3, w, b6), w6),
        "batch_norm eval": (lambda w: NF.batch_norm(img, rm, rv, w.float(), b6.float(), False), w6),
        "batch_norm train": (lambda w: NF.batch_norm(img, None, None, w.float(), None, True), w6),
    }
    for name, (call, weight) in calls.items():
        with torch.no_grad():
            plain = call(weight)
        assert plain.grad_fn is None, name
        recorded = call(weight.detach().requires_grad_())
        assert ran_triton(recorded, eager_function=True), name
        assert torch.equal(plain, recorded.detach()), name


def _saved_bytes(fn) -> int:
    storages = {}

    def pack(t):
        storages[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn()
    return sum(storages.values())


def test_saves_the_input_and_float32_statistics_never_the_output(device):
    x = rand((16, 64), BF16, device).requires_grad_()
    r = rand((16, 64), BF16, device).requires_grad_()
    w = rand((64,), BF16, device).requires_grad_()
    assert _saved_bytes(lambda: NF.rms_norm(x, (64,), w)) == x.numel() * 2 + w.numel() * 2 + 16 * 4
    # the fused add saves h (returned anyway), not x and residual
    assert _saved_bytes(lambda: NF.fused_add_rms_norm(x, r, (64,), w)) == x.numel() * 2 + w.numel() * 2 + 16 * 4
    img = rand((2, 8, 4, 4), BF16, device).requires_grad_()
    cw = rand((8,), param_dtype("group_norm", BF16, device), device).requires_grad_()
    # GroupNorm+SiLU: x, weight, bias (to recompute SiLU's input), the (N, G) mean as a (shift, rest) pair
    # and rstd
    expected = img.numel() * 2 + 2 * (8 * cw.element_size()) + 3 * (2 * 4 * 4)
    assert _saved_bytes(lambda: NF.group_norm_silu(img, 4, cw, cw * 1)) == expected


def test_fallbacks_to_the_reference(device):
    x = torch.randn(0, 8, device=device, requires_grad=True)
    assert type(NF.layer_norm(x, (8,)).grad_fn).__name__ == "_NormBackward"  # empty input
    x64 = torch.randn(3, 8, dtype=torch.float64, device=device)
    assert backends.resolve(x64).name == "reference"  # float64 data: the kernels compute in float32
    x = torch.randn(3, 8, device=device, requires_grad=True)
    w64 = torch.randn(8, dtype=torch.float64, device=device)
    assert backends.resolve(x).name == "triton"
    with pytest.raises(RuntimeError):  # torch's own dtype error, raised by the checks before dispatch
        NF.layer_norm(x, (8,), w64)


CUDA = pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")


@CUDA
@pytest.mark.parametrize("xd,wd,bd", [(BF16, FP32, FP32), (FP16, FP16, FP32), (FP32, torch.float64, None),
                                      (FP32, BF16, BF16)])
def test_cuda_parameter_dtypes_like_torch(xd, wd, bd):
    """On CUDA torch's LayerNorm and GroupNorm take parameters in the input's dtype only (its CPU
    kernels take float32 parameters with 16-bit input); its RMSNorm, BatchNorm and InstanceNorm take
    mixed dtypes. normkit raises the same errors and accepts the same calls, with torch's output dtype."""
    x = torch.randn(4, 6, 5, 5, device="cuda", dtype=xd)
    w = torch.randn(6, device="cuda", dtype=wd)
    b = None if bd is None else torch.randn(6, device="cuda", dtype=bd)
    with normkit.use_backend("triton"):
        for call in (lambda f, x: f.layer_norm(x.movedim(1, -1), (6,), w, b), lambda f, x: f.group_norm(x, 3, w, b)):
            with pytest.raises(RuntimeError) as theirs:
                call(F, x)
            with pytest.raises(RuntimeError, match=f"^{re.escape(str(theirs.value))}$"):
                call(NF, x)
        if not (wd == bd == FP32 and xd in (BF16, FP16)):
            return  # the mixed precision the other norms take
        for name, call in [
            ("rms_norm", lambda f, x: f.rms_norm(x.movedim(1, -1), (6,), w)),
            ("batch_norm", lambda f, x: f.batch_norm(x, None, None, w, b, True)),
            ("instance_norm", lambda f, x: f.instance_norm(x, None, None, w, b)),
        ]:
            ours, theirs = call(NF, x), call(F, x)
            assert ours.dtype == theirs.dtype, name
            assert_close(ours, theirs.double(), msg=name)


@CUDA
@pytest.mark.parametrize("amp", [BF16, FP16])
@pytest.mark.parametrize("xd", [FP32, BF16])
def test_cuda_autocast_like_torch(amp, xd):
    """Under torch.autocast("cuda"), LayerNorm, GroupNorm and RMSNorm (and normkit's channels-first and
    fused forms of them) compute in float32 and return float32, as torch's float32 list makes its own do;
    BatchNorm and InstanceNorm keep the input's dtype. Module parameters stay float32, and gradients
    reach them in float32."""
    torch.manual_seed(0)
    x = torch.randn(4, 32, 6, 6, device="cuda", dtype=xd)
    r = torch.randn_like(x)
    cases = {
        "LayerNorm": (normkit.nn.LayerNorm(6), torch.nn.LayerNorm(6), lambda m, x: m(x)),
        "GroupNorm": (normkit.nn.GroupNorm(8, 32), torch.nn.GroupNorm(8, 32), lambda m, x: m(x)),
        "RMSNorm": (normkit.nn.RMSNorm(6), torch.nn.RMSNorm(6), lambda m, x: m(x)),
        "BatchNorm2d": (normkit.nn.BatchNorm2d(32), torch.nn.BatchNorm2d(32), lambda m, x: m(x)),
        "InstanceNorm2d": (normkit.nn.InstanceNorm2d(32, affine=True), torch.nn.InstanceNorm2d(32, affine=True),
                           lambda m, x: m(x)),
    }
    with normkit.use_backend("triton"):
        for name, (ours, theirs, call) in cases.items():
            ours, theirs = ours.cuda(), theirs.cuda()
            theirs.load_state_dict(ours.state_dict())
            xo, xt = x.clone().requires_grad_(), x.clone().requires_grad_()
            with torch.autocast("cuda", dtype=amp):
                yo, yt = call(ours, xo), call(theirs, xt)
            assert yo.dtype == yt.dtype, name
            assert_close(yo, yt.double(), msg=name)  # under the output dtype's tolerance
            g = torch.randn_like(yt)
            yo.backward(g)
            yt.backward(g)
            assert xo.grad.dtype == xt.grad.dtype == xd, name
            assert ours.weight.grad.dtype == FP32, name
        w, b = torch.randn(32, device="cuda"), torch.randn(32, device="cuda")
        with torch.autocast("cuda", dtype=amp):
            fused = {
                "channel_layer_norm": (NF.channel_layer_norm(x, w, b),
                                       F.layer_norm(x.movedim(1, -1), (32,), w, b).movedim(-1, 1)),
                "channel_rms_norm": (NF.channel_rms_norm(x, w, 1e-6),
                                     F.rms_norm(x.movedim(1, -1), (32,), w, 1e-6).movedim(-1, 1)),
                "group_norm_silu": (NF.group_norm_silu(x, 8, w, b), F.silu(F.group_norm(x, 8, w, b))),
                "fused_add_layer_norm": (NF.fused_add_layer_norm(x, r, (6,))[0], F.layer_norm(x + r, (6,))),
                "fused_add_rms_norm h": (NF.fused_add_rms_norm(x, r, (6,), None, 1e-6)[1], x + r),
                "fused_add_rms_norm": (NF.fused_add_rms_norm(x, r, (6,), None, 1e-6)[0],
                                       F.rms_norm(x + r, (6,), None, 1e-6)),
            }
        for name, (ours, theirs) in fused.items():
            assert ours.dtype == theirs.dtype, name
            assert_close(ours, theirs.double(), msg=name)


def test_double_backward_and_torch_func_use_the_reference_formulas(device):
    x = torch.randn(3, 4, 5, device=device, requires_grad=True)
    w = torch.randn(4, device=device, requires_grad=True)
    y = NF.group_norm_silu(x, 2, w, w)
    (gx,) = torch.autograd.grad(y.pow(2).sum(), x, create_graph=True)
    gx.sum().backward()  # second order through the reference backward
    x2 = x.detach().double().requires_grad_()
    w2 = w.detach().double().requires_grad_()
    y2 = F.silu(F.group_norm(x2, 2, w2, w2))
    (gx2,) = torch.autograd.grad(y2.pow(2).sum(), x2, create_graph=True)
    gx2.sum().backward()
    assert_close(x.grad, x2.grad, FP32)
    # per-sample gradients: vmap over grad sees wrappers, which the reference handles
    xs = torch.randn(4, 6, device=device)
    wv = torch.randn(6, device=device)
    per_sample = torch.func.vmap(torch.func.grad(lambda w, x: NF.rms_norm(x, (6,), w).sum()), in_dims=(None, 0))(wv, xs)
    expected = torch.stack([torch.func.grad(lambda w, x: F.rms_norm(x, (6,), w).sum())(wv, x) for x in xs])
    torch.testing.assert_close(per_sample, expected)


def test_sum_partials_of_two_buffers_in_one_launch(device):
    """A weight's and a bias's partials summed by one launch give each one's sums bit for bit, in the
    order of the arguments, None for None; more than two buffers, or two shapes, are refused."""
    from normkit.backends.triton.kernels.reduce import sum_partials

    a, b = torch.randn(37, 70, device=device), torch.randn(37, 70, device=device) * 1e3
    (sa,), (sb,) = sum_partials(a), sum_partials(b)
    pa, pb = sum_partials(a, b)
    assert torch.equal(pa, sa) and torch.equal(pb, sb)
    assert_close(pa, a.double().sum(0), FP32)
    assert_close(pb, b.double().sum(0), FP32)
    none, only = sum_partials(None, b)
    assert none is None and torch.equal(only, sb)
    with pytest.raises(ValueError):
        sum_partials(a, b, a)
    with pytest.raises(ValueError):
        sum_partials(a, b[:5])


def test_block_cap_must_be_a_power_of_two():
    with pytest.raises(ValueError, match="power of two"):
        with config.block_cap(12):
            pass


# --------------------------------------------------------------------------------------------------
# torch.compile
# --------------------------------------------------------------------------------------------------


def _small_model():
    torch.manual_seed(3)
    return torch.nn.Sequential(
        torch.nn.Conv2d(3, 8, 3, padding=1),
        normkit.nn.GroupNormSiLU(4, 8),
        normkit.nn.BatchNorm2d(8),
        normkit.nn.InstanceNorm2d(8, affine=True),
        torch.nn.Flatten(2),
        normkit.nn.LayerNorm(25),
        normkit.nn.RMSNorm(25),
    )


@pytest.mark.parametrize("compiler", ["aot_eager", "inductor"])
def test_torch_compile_fullgraph_matches_eager(compiler, device):
    """The kernels are custom ops with fake implementations: dynamo traces the whole model (fullgraph)
    and the compiled model gives eager's outputs, gradients and running statistics."""
    eager, compiled_model = _small_model().to(device), _small_model().to(device)
    x = torch.randn(2, 3, 5, 5, device=device)
    torch._dynamo.reset()
    compiled = torch.compile(compiled_model, fullgraph=True, backend=compiler)
    for _ in range(2):  # the second step reads the running statistics the first one wrote
        y_e, y_c = eager(x), compiled(x)
        torch.testing.assert_close(y_c, y_e, atol=1e-5, rtol=1e-5)
        y_e.square().sum().backward()
        y_c.square().sum().backward()
    for (name, p_e), p_c in zip(eager.named_parameters(), compiled_model.parameters(), strict=True):
        torch.testing.assert_close(p_c.grad, p_e.grad, atol=1e-4, rtol=1e-4, msg=name)
    bn_e, bn_c = eager[2], compiled_model[2]
    torch.testing.assert_close(bn_c.running_var, bn_e.running_var)
    assert int(bn_c.num_batches_tracked) == 2
    assert math.isfinite(float(y_c.sum()))


def _op_cases(device):
    """(op, args) of each forward custom op, float32 inputs that want gradients."""
    from normkit.backends.triton import ops

    torch.manual_seed(4)

    def leaf(*shape):
        return torch.randn(*shape, device=device).requires_grad_()

    x_rows, x_img = leaf(6, 12), leaf(2, 8, 3, 3)
    mean, var = torch.randn(8, device=device), torch.rand(8, device=device) + 0.5
    return [
        (ops.rows_forward, (x_rows, None, leaf(12), leaf(12), 12, 1e-5, False)),
        (ops.rows_forward, (x_rows, leaf(6, 12), leaf(12), None, 12, 1e-6, True)),
        (ops.sets_forward, (x_img, leaf(8), leaf(8), 4, 1e-5, True)),
        (ops.batch_forward, (x_img, leaf(8), leaf(8), None, None, 1e-5)),
        (ops.batch_forward, (x_img, leaf(8), leaf(8), mean, var, 1e-5)),
    ]


@pytest.mark.parametrize("case", range(5))
def test_custom_ops_pass_opcheck(case, device):
    """``torch.library.opcheck`` on each forward op: schema, fake implementation and autograd formula,
    the backward traced with fake tensors by AOT dispatch outside dynamo (where torch 2.11 reports
    ``torch.compiler.is_compiling()`` False: the formula must call the backward op, never a kernel, or
    ``torch.compile`` fails on a GPU, as it did on the H200 until the formula stopped asking)."""
    op, args = _op_cases(device)[case]
    torch.library.opcheck(op, args)


# --------------------------------------------------------------------------------------------------
# compiling for a GPU without one
# --------------------------------------------------------------------------------------------------


@pytest.mark.skipif(not INTERPRET, reason="runs with the interpreter tests (TRITON_INTERPRET=1); a GPU runs them")
def test_every_kernel_compiles_for_an_h100():
    """The interpreter checks what the kernels compute, not that they compile: tests/compile_for_gpu.py
    compiles every specialization the launchers choose for a GPU to an sm_90 cubin (triton ships ptxas),
    with the divisibility marks a real launch gives (vectorized loads), and reads each cubin's registers:
    none may spill to local memory."""
    import json
    import subprocess
    import sys
    from pathlib import Path

    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["TRITON_DEFAULT_FP_FUSION"] = "1"  # triton 3.9 warns while the default is about to change
    script = Path(__file__).with_name("compile_for_gpu.py")
    out = subprocess.run([sys.executable, str(script)], env=env, capture_output=True, text=True)
    report = json.loads(out.stdout.strip().splitlines()[-1])
    assert report["failures"] == [] and out.returncode == 0
    assert report["compiled"] >= 30
    assert report["spills"] == []


# --------------------------------------------------------------------------------------------------
# the GPU benchmark script
# --------------------------------------------------------------------------------------------------


@pytest.mark.skipif(not (INTERPRET or torch.cuda.is_available()), reason="needs TRITON_INTERPRET=1 or a GPU")
def test_gpu_benchmark_runs_tiny(tmp_path, capsys):
    """``python -m normkit.bench.gpu --tiny``: every cell checked and timed for normkit, torch eager and
    torch.compile; the CSV and the markdown table name the device."""
    import csv

    from normkit.bench import gpu

    rc = gpu.main(["--tiny", "--out", str(tmp_path), "--reps", "1", "--providers", "normkit", "torch", "compile"])
    assert rc == 0
    rows = list(csv.DictReader((tmp_path / "gpu.csv").open()))
    expected = {(c.op, c.shape_str, p) for c in gpu.TINY_CELLS for p in gpu.PASSES}
    for provider in ("normkit", "torch", "compile"):
        done = {(r["op"], r["shape"], r["pass"]) for r in rows if r["provider"] == provider and r["status"] == "ok"}
        assert done == expected, provider
    assert all(float(r["ms"]) > 0 and float(r["check"]) <= 1 for r in rows)
    markdown = (tmp_path / "gpu.md").read_text()
    assert markdown.startswith("# normkit GPU benchmark: ") and "| group_norm_silu | 2x64x4x4 |" in markdown
    assert float(rows[0]["copy_gbps"]) > 0


@pytest.mark.skipif(not (INTERPRET or torch.cuda.is_available()), reason="needs TRITON_INTERPRET=1 or a GPU")
def test_gpu_benchmark_only_selects_cells(tmp_path, capsys):
    """``--only TEXT`` runs the cells whose id contains TEXT, and refuses a filter that matches none."""
    import csv

    from normkit.bench import gpu

    with pytest.raises(SystemExit):
        gpu.main(["--tiny", "--out", str(tmp_path), "--only", "no such cell"])
    assert gpu.main(["--tiny", "--out", str(tmp_path), "--reps", "1", "--providers", "normkit",
                     "--only", "rms_norm 16x96"]) == 0
    rows = list(csv.DictReader((tmp_path / "gpu.csv").open()))
    assert {(r["op"], r["shape"]) for r in rows} == {("rms_norm", "16x96")}
    assert len(rows) == len(gpu.PASSES)


# --------------------------------------------------------------------------------------------------
# launch choices for tuning on a GPU
# --------------------------------------------------------------------------------------------------


def test_tuning_replaces_each_launch_choice_and_restores_it():
    """``config.tuning`` sets the choices benchmarks/gpu_tune.py sweeps, only inside its block."""
    cpu = torch.device("cpu")
    def choices():
        return (config.warps_for(4096), config.row_warps(4, 1024), config.warps_for(2048, "batch"),
                config.row_config(1024, torch.float32), config.tile_elements("sets"), config.tile_elements("batch"),
                config.row_backward_programs(1000, True, cpu))

    before = choices()
    assert before[:3] == (8, 4, 2)  # 16 elements a thread for one row a program, 32 for several and channels
    with config.tuning(warps=2, row_block_m=8, row_programs_per_sm=1, tile=1024):
        assert config.warps_for(4096) == config.row_warps(4, 1024) == config.warps_for(8192, "sets") == 2
        assert config.row_config(1024, torch.float32) == (8, 1024, True)
        assert config.row_config(100000, torch.float32)[0] == 1  # rows in column blocks: one per program
        assert config.tile_elements("sets") == config.tile_elements("batch") == 1024
        assert config.row_backward_programs(1000, True, cpu) == config.num_sms(cpu)
        assert config.row_backward_programs(2, True, cpu) == 2  # never more programs than tiles
    assert choices() == before
    with pytest.raises(ValueError, match="unknown launch choices"):
        with config.tuning(block=4):
            pass
    with pytest.raises(ValueError, match="power of two"):
        with config.tuning(tile=1000):
            pass
    with pytest.raises(ValueError, match="positive ints"):
        with config.tuning(warps=0):
            pass


def test_tuned_launches_compute_the_same(device):
    """Other warps, rows per program, backward programs and tiles change the launch, not the result
    (beyond float32 rounding): what lets gpu_tune.py compare alternatives by time alone."""
    x = torch.randn(6, 40, device=device, requires_grad=True)
    img = torch.randn(2, 8, 3, 3, device=device, requires_grad=True)

    def calls():
        ys = [NF.layer_norm(x, (40,)), NF.group_norm(img, 4), NF.batch_norm(img, None, None, training=True)]
        return ys, [torch.autograd.grad(y.square().sum(), (x if i == 0 else img,))[0] for i, y in enumerate(ys)]

    ref, grads = calls()
    with config.tuning(warps=1, row_block_m=2, row_programs_per_sm=1, tile=16):
        out, got = calls()
    for a, b in zip(out + got, ref + grads, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


@pytest.mark.skipif(not INTERPRET, reason="the tiny sweep runs in the interpreter; on a GPU run the script itself")
def test_gpu_tune_script_runs_tiny(tmp_path, monkeypatch):
    """``benchmarks/gpu_tune.py --tiny``: every alternative of a case is checked against the heuristics' own
    outputs and timed, and the JSON names the device and the best choice."""
    import importlib.util
    import json
    import sys
    from pathlib import Path

    path = Path(__file__).parents[1] / "benchmarks" / "gpu_tune.py"
    spec = importlib.util.spec_from_file_location("gpu_tune", path)
    tune = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, "gpu_tune", tune)  # dataclasses look their module up there
    spec.loader.exec_module(tune)
    out = tmp_path / "tune.json"
    assert tune.main(["--tiny", "--only", "rms_norm", "--out", str(out)]) == 0
    report = json.loads(out.read_text())
    assert "interpreter" in report["device"]
    (fwd, fwdbwd) = report["results"]
    for r in (fwd, fwdbwd):
        assert r["complete"] and len(r["rows"]) == 4
        assert all(row["max_rel_diff"] <= 1e-4 and row["ms"] > 0 for row in r["rows"])
        assert r["best"]["ms"] == min(row["ms"] for row in r["rows"])
