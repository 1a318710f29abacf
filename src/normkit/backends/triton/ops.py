"""The kernels under autograd: :func:`rows`, :func:`sets`, :func:`batch` and :func:`update_running_stats`.

Under ``torch.compile`` they are PyTorch custom ops (``torch.ops.normkit_triton.*``), so that the
compiler sees one opaque node per call instead of breaking the graph at a Triton launch: each op has a
fake implementation (output shapes, dtypes and strides, without running anything) for tracing, and each
forward op an autograd formula (:func:`torch.library.register_autograd`) whose backward is the matching
backward op. The ops are functional (they write only their outputs), except
:func:`update_running_stats`, which updates the running statistics in place and is called outside
autograd.

In eager mode the same forward, setup and backward functions run without the custom-op dispatch: a
:class:`torch.autograd.Function` built from them when a gradient is wanted, the kernel alone when not.
The dispatch about doubled a call's host time (``benchmarks/triton_call_overhead.py``); on an H200 a
converted ResNet-50, every call of which paid it, was 2.8x slower than the original, most likely for
that host time (not profiled there).

What the kernels do not cover takes the reference formulas in torch ops: a backward that must itself be
differentiable (``create_graph=True``, recomputing the statistics from the saved input so that they are
differentiated too) and batched gradients (``is_grads_batched``, vmapped jacobians), whose functorch
wrappers have no storage for a kernel to read.
"""

# no `from __future__ import annotations`: torch.library infers each op's schema from real annotations
from functools import partial

import torch
from torch import Tensor

from ... import reference as ref
from ..base import needs_grad as _needs_grad
from .kernels import batch as _batch
from .kernels import rows as _rows
from .kernels import sets as _sets
from .kernels.reduce import update_running_stats as _update_running_stats

__all__ = [
    "rows", "sets", "batch", "update_running_stats", "rows_forward", "sets_forward", "batch_forward", "wrapped",
    "rms_rounded_scale", "rms_rounded_rstd", "gated_rms",
]

_NS = "normkit_triton"


def wrapped(*tensors: Tensor | None) -> bool:
    """Whether any tensor is a torch.func wrapper or a legacy batched tensor: no storage of its own."""
    if torch.compiler.is_compiling():  # traced tensors are never functorch wrappers
        return False
    functorch = torch._C._functorch
    return any(
        t is not None and (functorch.is_functorch_wrapped_tensor(t) or functorch.is_legacy_batchedtensor(t))
        for t in tensors
    )


def _empty(like: Tensor) -> Tensor:
    """A zero-size placeholder for an output an op does not produce (custom ops cannot return None)."""
    return like.new_empty((0,), dtype=torch.float32)


def _or_none(t: Tensor) -> Tensor | None:
    return None if t.numel() == 0 and t.dim() == 1 else t


def _grad_to(g: Tensor | None, like: Tensor | None, needed: bool) -> Tensor | None:
    return g.to(like.dtype) if needed and g is not None and like is not None else None


def _param_dtype(t: Tensor | None) -> torch.dtype | None:
    return None if t is None else t.dtype


def _compiling() -> bool:
    return torch.compiler.is_compiling()


#: outputs of every forward op: the result (and the fused adds' sum h) first, then statistics
_OUTPUTS = 4


def _eager_function(name: str, forward, setup_context, backward) -> type[torch.autograd.Function]:
    """The autograd.Function of a custom op's forward, setup and backward functions, for eager calls.

    The forward takes ``ctx`` and calls the setup itself: a Function that defines ``setup_context``
    binds its arguments with ``inspect.signature`` on every call, which was the largest single item of an
    eval BatchNorm call's host time under the profiler. ``apply`` takes the op's inputs and then ``keep``
    and ``sink``: it returns only the first ``keep`` outputs (y, or y and h; a tensor when ``keep`` is 1),
    and appends the others (the statistics) to the list ``sink`` when one is given. Every output of a
    Function costs autograd bookkeeping on each call, and the statistics are mostly unused placeholders."""

    def fwd(ctx, *args):
        *inputs, keep, sink = args
        output = forward(*inputs)
        setup_context(ctx, inputs, output)
        ctx.keep = keep
        if sink is not None:
            sink += output[keep:]
        return output[0] if keep == 1 else output[:keep]

    def bwd(ctx, *grads):
        return (*backward(ctx, *grads, *(None,) * (_OUTPUTS - ctx.keep)), None, None)

    return type(name, (torch.autograd.Function,), {"forward": staticmethod(fwd), "backward": staticmethod(bwd)})


# --------------------------------------------------------------------------------------------------
# LayerNorm, RMSNorm and the fused residual adds
# --------------------------------------------------------------------------------------------------


def _rows_forward(
    x: Tensor, residual: Tensor | None, weight: Tensor | None, bias: Tensor | None, n: int, eps: float, rms: bool
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    y, h, mean, rstd = _rows.row_forward(x, residual, weight, bias, n, eps, rms)
    return y.view(x.shape), (h.view(x.shape) if h is not None else _empty(x)), (
        mean if mean is not None else _empty(x)), rstd


@torch.library.custom_op(f"{_NS}::rows_forward", mutates_args=())
def rows_forward(
    x: Tensor, residual: Tensor | None, weight: Tensor | None, bias: Tensor | None, n: int, eps: float, rms: bool
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Row norm over the last ``n`` elements: ``(y, h, mean, rstd)`` (h and mean empty when absent; the
    mean as a (2, M) pair whose sum is the mean, see :func:`.kernels.rows.row_forward`)."""
    return _rows_forward(x, residual, weight, bias, n, eps, rms)


@rows_forward.register_fake
def _(x, residual, weight, bias, n, eps, rms):
    m = x.numel() // n
    return (
        x.new_empty(x.shape), x.new_empty(x.shape) if residual is not None else _empty(x),
        _empty(x) if rms else x.new_empty((2, m), dtype=torch.float32), x.new_empty((m,), dtype=torch.float32),
    )


@torch.library.custom_op(f"{_NS}::rows_backward", mutates_args=())
def rows_backward(
    dy: Tensor, xh: Tensor, dh: Tensor | None, weight: Tensor | None, mean: Tensor, rstd: Tensor, n: int,
    rms: bool, need_dw: bool, need_db: bool,
) -> tuple[Tensor, Tensor, Tensor]:
    """``(dx, dweight, dbias)`` of :func:`rows_forward` (float32 parameter gradients, empty when unasked)."""
    return _rows_backward_kernels(dy, xh, dh, weight, mean, rstd, n, rms, need_dw, need_db)


def _rows_backward_kernels(dy, xh, dh, weight, mean, rstd, n, rms, need_dw, need_db):
    dx, dw, db = _rows.row_backward(dy, xh, dh, weight, _or_none(mean), rstd, n, rms, need_dw, need_db)
    return dx.view(xh.shape), dw if dw is not None else _empty(xh), db if db is not None else _empty(xh)


@rows_backward.register_fake
def _(dy, xh, dh, weight, mean, rstd, n, rms, need_dw, need_db):
    param = xh.new_empty((n,), dtype=torch.float32)
    return (
        xh.new_empty(xh.shape), param if need_dw and weight is not None else _empty(xh),
        param.clone() if need_db else _empty(xh),
    )


def _rows_setup(ctx, inputs, output) -> None:
    x, residual, weight, bias, n, eps, rms = inputs
    _, h, mean, rstd = output
    ctx.n, ctx.eps, ctx.rms, ctx.fused = n, eps, rms, residual is not None
    ctx.bias_dtype = _param_dtype(bias)
    ctx.mark_non_differentiable(mean, rstd)
    ctx.save_for_backward(h if residual is not None else x, weight, mean, rstd)


def _rows_backward_differentiable(ctx, dy, xh, weight):
    """The reference backward in torch ops, statistics recomputed from xh (for create_graph)."""
    shape = (ctx.n,)  # the weight arrives flattened to (n,)
    x2, dy2 = xh.reshape(-1, ctx.n), dy.reshape(-1, ctx.n)
    if ctx.rms:
        _, rstd = ref.rms_norm(x2, shape, weight, ctx.eps)
        dx, dw = ref.rms_norm_backward(dy2, x2, shape, weight, rstd)
        return dx.view(xh.shape), dw, None
    _, mean, rstd = ref.layer_norm(x2, shape, weight, None, ctx.eps)
    dx, dw, db = ref.layer_norm_backward(dy2, x2, shape, weight, mean, rstd)
    return dx.view(xh.shape), dw, db


def _rows_backward(run, ctx, dy, dh, _dmean, _drstd):
    xh, weight, mean, rstd = ctx.saved_tensors
    need_x, need_r, need_w, need_b = ctx.needs_input_grad[:4]
    dh = dh if ctx.fused else None
    if torch.is_grad_enabled() or wrapped(dy, dh):
        dx, dw, db = _rows_backward_differentiable(ctx, dy, xh, weight)
        if dh is not None:
            dx = dx + dh
    else:
        dx, dw, db = run(dy, xh, dh, weight, mean, rstd, ctx.n, ctx.rms, need_w, need_b and not ctx.rms)
    dw = _grad_to(dw, weight, need_w)
    db = db.to(ctx.bias_dtype) if need_b and db is not None else None
    return (dx if need_x else None), (dx if ctx.fused and need_r else None), dw, db, None, None, None


# The op's formula runs the backward op, the eager Function the kernels: which one cannot be told from
# torch.compiler.is_compiling(), which torch 2.11 reports False while AOT autograd traces the backward
rows_forward.register_autograd(partial(_rows_backward, rows_backward), setup_context=_rows_setup)
_rows_backward_eager = partial(_rows_backward, _rows_backward_kernels)


_TritonRows = _eager_function("_TritonRows", _rows_forward, _rows_setup, _rows_backward_eager)


# RMSNorm whose normalized value is rounded before the weight multiplies it (Hugging Face Llama's
# order): eager only, the backend composes it under torch.compile. The forward has _rows_forward's
# signature, so that RMSNorm's setup and backward serve it unchanged.


def _rounded_forward(
    x: Tensor, residual: None, weight: Tensor, bias: None, n: int, eps: float, rms: bool
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    y, _, _, rstd = _rows.row_forward(x, None, weight, None, n, eps, True, round_first=True)
    return y.view(x.shape), _empty(x), _empty(x), rstd


_TritonRowsRounded = _eager_function("_TritonRowsRounded", _rounded_forward, _rows_setup, _rows_backward_eager)


def rms_rounded_scale(x: Tensor, weight: Tensor, n: int, eps: float) -> Tensor:
    """``weight * rms_norm(x).to(x.dtype)`` in one kernel (eager calls only)."""
    if _needs_grad(x, weight):
        return _TritonRowsRounded.apply(x, None, weight, None, n, eps, True, 1, None)
    return _rounded_forward(x, None, weight, None, n, eps, True)[0]


# RMSNorm without parameters whose scale is rounded before it multiplies x (DeepSeek-V4's order): the
# same arrangement, eager only.


def _rounded_rstd_forward(
    x: Tensor, residual: None, weight: None, bias: None, n: int, eps: float, rms: bool
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    y, _, _, rstd = _rows.row_forward(x, None, None, None, n, eps, True, round_rstd=True)
    return y.view(x.shape), _empty(x), _empty(x), rstd


_TritonRowsRoundedRstd = _eager_function(
    "_TritonRowsRoundedRstd", _rounded_rstd_forward, _rows_setup, _rows_backward_eager
)


def rms_rounded_rstd(x: Tensor, n: int, eps: float) -> Tensor:
    """``x * rms_rstd(x).to(x.dtype)`` in one kernel (eager calls only)."""
    if _needs_grad(x):
        return _TritonRowsRoundedRstd.apply(x, None, None, None, n, eps, True, 1, None)
    return _rounded_rstd_forward(x, None, None, None, n, eps, True)[0]


def gated_rms(
    x: Tensor, gate: Tensor, weight: Tensor, eps: float, activation: str, round_first: bool, gate_first: bool,
    group_size: int,
) -> Tensor:
    """The gated RMSNorm's one kernel in inference (eager calls without a gradient only; the backend composes
    it otherwise): groups of ``group_size`` of each row are the kernel's rows, the weight offset by group."""
    y, _, _, _ = _rows.row_forward(
        x, None, weight, None, group_size, eps, True, round_first=round_first, gate=gate, gate_act=activation,
        gate_first=gate_first, weight_groups=x.shape[-1] // group_size,
    )
    return y.view(x.shape)


def rows(
    x: Tensor, residual: Tensor | None, weight: Tensor | None, bias: Tensor | None, n: int, eps: float, rms: bool
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """:func:`rows_forward`: the custom op under torch.compile, else the same functions without it (and,
    through autograd, without the statistics: Nones in their place)."""
    if _compiling():
        return rows_forward(x, residual, weight, bias, n, eps, rms)
    if _needs_grad(x, residual, weight, bias):
        if residual is None:
            return _TritonRows.apply(x, residual, weight, bias, n, eps, rms, 1, None), None, None, None
        return (*_TritonRows.apply(x, residual, weight, bias, n, eps, rms, 2, None), None, None)
    return _rows_forward(x, residual, weight, bias, n, eps, rms)


# --------------------------------------------------------------------------------------------------
# GroupNorm, InstanceNorm, GroupNorm + SiLU
# --------------------------------------------------------------------------------------------------


def _out_like(x: Tensor) -> Tensor:
    """The output the channel kernels write: x's layout when contiguous or channels_last, else contiguous."""
    return torch.empty_like(_sets.ncs_view(x)[0])


@torch.library.custom_op(f"{_NS}::sets_forward", mutates_args=())
def sets_forward(
    x: Tensor, weight: Tensor | None, bias: Tensor | None, groups: int, eps: float, silu: bool
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """GroupNorm (+ SiLU): ``(y, mean, rstd, var)`` with float32 (N, groups) statistics (the mean as a
    (2, N, groups) pair whose sum is the mean)."""
    return _sets_forward(x, weight, bias, groups, eps, silu)


def _sets_forward(x, weight, bias, groups, eps, silu):
    return _sets.set_forward(x, groups, weight, bias, eps, silu)


@sets_forward.register_fake
def _(x, weight, bias, groups, eps, silu):
    stat = x.new_empty((x.shape[0], groups), dtype=torch.float32)
    return _out_like(x), x.new_empty((2, x.shape[0], groups), dtype=torch.float32), stat, stat.clone()


@torch.library.custom_op(f"{_NS}::sets_backward", mutates_args=())
def sets_backward(
    dy: Tensor, x: Tensor, weight: Tensor | None, bias: Tensor | None, mean: Tensor, rstd: Tensor, groups: int,
    silu: bool, need_dw: bool, need_db: bool,
) -> tuple[Tensor, Tensor, Tensor]:
    """``(dx, dweight, dbias)`` of :func:`sets_forward`."""
    return _sets_backward_kernels(dy, x, weight, bias, mean, rstd, groups, silu, need_dw, need_db)


def _sets_backward_kernels(dy, x, weight, bias, mean, rstd, groups, silu, need_dw, need_db):
    dx, dw, db = _sets.set_backward(dy, x, groups, weight, bias, mean, rstd, silu, need_dw, need_db)
    return dx, dw if dw is not None else _empty(x), db if db is not None else _empty(x)


@sets_backward.register_fake
def _(dy, x, weight, bias, mean, rstd, groups, silu, need_dw, need_db):
    param = x.new_empty((x.shape[1],), dtype=torch.float32)
    return _out_like(x), param if need_dw and weight is not None else _empty(x), param.clone() if need_db else _empty(x)


def _sets_setup(ctx, inputs, output) -> None:
    x, weight, bias, groups, eps, silu = inputs
    _, mean, rstd, var = output
    ctx.groups, ctx.eps, ctx.silu = groups, eps, silu
    ctx.bias_dtype = _param_dtype(bias)
    ctx.mark_non_differentiable(mean, rstd, var)
    # the bias only to recompute SiLU's input; never the output
    ctx.save_for_backward(x, weight, bias if silu else None, mean, rstd)


def _sets_backward(run, ctx, dy, _dmean, _drstd, _dvar):
    x, weight, bias, mean, rstd = ctx.saved_tensors
    need_x, need_w, need_b = ctx.needs_input_grad[:3]
    if torch.is_grad_enabled() or wrapped(dy):
        if ctx.silu:
            _, m, r = ref.group_norm_silu(x, ctx.groups, weight, bias, ctx.eps)
            dx, dw, db = ref.group_norm_silu_backward(dy, x, ctx.groups, weight, bias, m, r)
        else:
            _, m, r = ref.group_norm(x, ctx.groups, weight, None, ctx.eps)
            dx, dw, db = ref.group_norm_backward(dy, x, ctx.groups, weight, m, r)
    else:
        dx, dw, db = run(dy, x, weight, bias, mean, rstd, ctx.groups, ctx.silu, need_w, need_b)
    db = db.to(ctx.bias_dtype) if need_b else None
    return (dx if need_x else None), _grad_to(dw, weight, need_w), db, None, None, None


sets_forward.register_autograd(partial(_sets_backward, sets_backward), setup_context=_sets_setup)


_TritonSets = _eager_function(
    "_TritonSets", _sets_forward, _sets_setup, partial(_sets_backward, _sets_backward_kernels)
)


def _with_stats(function: type[torch.autograd.Function], inputs: tuple, stats: bool) -> tuple:
    """``(y, *statistics)`` of an eager Function: the statistics (three) only when ``stats``, else Nones."""
    sink = [] if stats else None
    y = function.apply(*inputs, 1, sink)
    return (y, *sink) if stats else (y, None, None, None)


def sets(
    x: Tensor, weight: Tensor | None, bias: Tensor | None, groups: int, eps: float, silu: bool, stats: bool = True
) -> tuple[Tensor, Tensor | None, Tensor | None, Tensor | None]:
    """:func:`sets_forward`: the custom op under torch.compile, else the same functions without it (through
    autograd, the statistics only when ``stats``: Nones otherwise)."""
    if _compiling():
        return sets_forward(x, weight, bias, groups, eps, silu)
    if _needs_grad(x, weight, bias):
        return _with_stats(_TritonSets, (x, weight, bias, groups, eps, silu), stats)
    return _sets_forward(x, weight, bias, groups, eps, silu)


# --------------------------------------------------------------------------------------------------
# BatchNorm (and InstanceNorm with fixed statistics)
# --------------------------------------------------------------------------------------------------


@torch.library.custom_op(f"{_NS}::batch_forward", mutates_args=())
def batch_forward(
    x: Tensor, weight: Tensor | None, bias: Tensor | None, fixed_mean: Tensor | None, fixed_var: Tensor | None,
    eps: float,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """BatchNorm: ``(y, mean, rstd, var)``, float32 (C,) statistics (the batch's, or the fixed ones; the
    mean as a (2, C) pair whose sum is the mean)."""
    return _batch_forward(x, weight, bias, fixed_mean, fixed_var, eps)


def _batch_forward(x, weight, bias, fixed_mean, fixed_var, eps):
    return _batch.batch_forward(x, weight, bias, fixed_mean, fixed_var, eps)


@batch_forward.register_fake
def _(x, weight, bias, fixed_mean, fixed_var, eps):
    stat = x.new_empty((x.shape[1],), dtype=torch.float32)
    return _out_like(x), x.new_empty((2, x.shape[1]), dtype=torch.float32), stat, stat.clone()


@torch.library.custom_op(f"{_NS}::batch_backward", mutates_args=())
def batch_backward(
    dy: Tensor, x: Tensor, weight: Tensor | None, mean: Tensor, rstd: Tensor, training: bool, need_dw: bool,
    need_db: bool,
) -> tuple[Tensor, Tensor, Tensor]:
    """``(dx, dweight, dbias)`` of :func:`batch_forward`."""
    return _batch_backward_kernels(dy, x, weight, mean, rstd, training, need_dw, need_db)


def _batch_backward_kernels(dy, x, weight, mean, rstd, training, need_dw, need_db):
    dx, dw, db = _batch.batch_backward(dy, x, weight, mean, rstd, training, need_dw, need_db)
    return dx, dw if dw is not None else _empty(x), db if db is not None else _empty(x)


@batch_backward.register_fake
def _(dy, x, weight, mean, rstd, training, need_dw, need_db):
    param = x.new_empty((x.shape[1],), dtype=torch.float32)
    return _out_like(x), param if need_dw and weight is not None else _empty(x), param.clone() if need_db else _empty(x)


def _batch_setup(ctx, inputs, output) -> None:
    x, weight, bias, fixed_mean, fixed_var, eps = inputs
    _, mean, rstd, var = output
    ctx.training, ctx.eps = fixed_mean is None, eps
    ctx.bias_dtype = _param_dtype(bias)
    ctx.mark_non_differentiable(mean, rstd, var)
    ctx.save_for_backward(x, weight, mean, rstd)


def _batch_backward(run, ctx, dy, _dmean, _drstd, _dvar):
    x, weight, mean, rstd = ctx.saved_tensors
    need_x, need_w, need_b = ctx.needs_input_grad[:3]
    if torch.is_grad_enabled() or wrapped(dy):
        if ctx.training:
            _, m, r = ref.batch_norm(x, None, None, weight, None, True, 0.0, ctx.eps)
            dx, dw, db = ref.batch_norm_backward(dy, x, weight, m, r, True)
        else:
            dx, dw, db = ref.batch_norm_backward(dy, x, weight, mean.double().sum(0), rstd.double(), False)
    else:
        dx, dw, db = run(dy, x, weight, mean, rstd, ctx.training, need_w, need_b)
    db = db.to(ctx.bias_dtype) if need_b else None
    return (dx if need_x else None), _grad_to(dw, weight, need_w), db, None, None, None


batch_forward.register_autograd(partial(_batch_backward, batch_backward), setup_context=_batch_setup)


_TritonBatch = _eager_function(
    "_TritonBatch", _batch_forward, _batch_setup, partial(_batch_backward, _batch_backward_kernels)
)


def batch(
    x: Tensor, weight: Tensor | None, bias: Tensor | None, fixed_mean: Tensor | None, fixed_var: Tensor | None,
    eps: float, stats: bool = True,
) -> tuple[Tensor, Tensor | None, Tensor | None, Tensor | None]:
    """:func:`batch_forward`: the custom op under torch.compile, else the same functions without it (and
    without statistics in inference with fixed ones; through autograd, only when ``stats``)."""
    if _compiling():
        return batch_forward(x, weight, bias, fixed_mean, fixed_var, eps)
    if _needs_grad(x, weight, bias):
        return _with_stats(_TritonBatch, (x, weight, bias, fixed_mean, fixed_var, eps), stats)
    # inference: no statistics for fixed ones (nothing reads them; not even empty placeholders, whose
    # three allocations were a tenth of an eval BatchNorm call's host time)
    return _batch.batch_forward(x, weight, bias, fixed_mean, fixed_var, eps, need_stats=False)


@torch.library.custom_op(f"{_NS}::update_running_stats", mutates_args=("running_mean", "running_var"))
def update_running_stats_op(
    running_mean: Tensor, running_var: Tensor, mean: Tensor, var: Tensor, momentum: float, count: int
) -> None:
    """``running = (1 - momentum) · running + momentum · batch`` in place (the variance unbiased)."""
    _update_running_stats(running_mean, running_var, mean, var, momentum, count)


@update_running_stats_op.register_fake
def _(running_mean, running_var, mean, var, momentum, count):
    return None


def update_running_stats(
    running_mean: Tensor, running_var: Tensor, mean: Tensor, var: Tensor, momentum: float, count: int
) -> None:
    """:func:`update_running_stats_op`: the custom op under torch.compile, else the kernel directly."""
    if _compiling():
        update_running_stats_op(running_mean, running_var, mean, var, momentum, count)
    else:
        _update_running_stats(running_mean, running_var, mean, var, momentum, count)
