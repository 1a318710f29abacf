"""The cpu backend's kernels as torch custom ops, for torch.compile.

torch.compile cannot look inside a ctypes call, so under compilation the backend calls these ops
instead of its autograd.Functions: each op is opaque to the compiler, with a fake implementation
that gives its outputs' shapes, dtypes and strides, and an autograd formula that calls the backward
op. Outside compilation the backend calls the kernels directly (a custom op's dispatch costs a few
microseconds, which matters for small inputs). Both paths run the same kernels, so a compiled model
gives the same results as the eager one.
"""


import torch
from torch import Tensor

from . import kernels as K

__all__ = [
    "row_forward",
    "row_backward",
    "channel_row_forward",
    "channel_row_backward",
    "chan_forward",
    "chan_backward",
]

_F64 = torch.float64


def _empty_vec(like: Tensor, n: int = 0, dtype: torch.dtype = _F64) -> Tensor:
    return like.new_empty(n, dtype=dtype)


def channel_layout(x: Tensor, per_channel: bool) -> tuple[Tensor, tuple[int, int, int], bool]:
    """x (N, C, *) as the kernel reads it: ``(tensor, (N, C, S), channels_last)``; see the backend."""
    from .backend import _channel_layout

    return _channel_layout(x, per_channel)


def chan_output(x: Tensor, groups: int, out_channels_first: bool) -> tuple[Tensor, Tensor, tuple, bool, bool]:
    """``(empty y, x as the kernel reads it, dims, nhwc, out_nhwc)``: shared by the op and its fake."""
    xk, dims, nhwc = channel_layout(x, per_channel=groups == 0)
    if nhwc and out_channels_first and x.dim() > 2:  # InstanceNorm's output is channels-first
        return x.new_empty(x.shape), xk, dims, nhwc, False
    return torch.empty_like(xk), xk, dims, nhwc, nhwc


# --------------------------------------------------------------------------------------------------
# row norms
# --------------------------------------------------------------------------------------------------


@torch.library.custom_op("normkit::cpu_row_forward", mutates_args=())
def row_forward(
    x: Tensor, residual: Tensor | None, weight: Tensor | None, bias: Tensor | None, n: int, eps: float, rms: bool
) -> tuple[Tensor, Tensor, Tensor]:
    """``(y, h, rstd)`` of LayerNorm/RMSNorm over rows of ``n`` (h = x + residual; empty without one)."""
    rc = residual.contiguous() if residual is not None else None
    y, h, rstd = K.row_forward(x.contiguous(), rc, weight, bias, n, eps, rms)
    return y, (h if h is not None else _empty_vec(x, dtype=x.dtype)), rstd


@row_forward.register_fake
def _(x, residual, weight, bias, n, eps, rms):
    h = x.new_empty(x.shape) if residual is not None else _empty_vec(x, dtype=x.dtype)
    return x.new_empty(x.shape), h, _empty_vec(x, x.numel() // n, K.arithmetic_dtype(x.dtype))


@torch.library.custom_op("normkit::cpu_row_backward", mutates_args=())
def row_backward(
    dy: Tensor,
    h: Tensor,
    dh: Tensor | None,
    weight: Tensor | None,
    rstd: Tensor,
    n: int,
    rms: bool,
    need_weight: bool,
    need_bias: bool,
) -> tuple[Tensor, Tensor, Tensor]:
    """``(dx, dweight, dbias)``; the parameter gradients are float64 (empty when not needed)."""
    dhc = dh.contiguous() if dh is not None else None
    dx, dw, db = K.row_backward(dy.contiguous(), h.contiguous(), dhc, weight, rstd, n, rms, need_weight, need_bias)
    return dx, (dw if dw is not None else _empty_vec(h)), (db if db is not None else _empty_vec(h))


@row_backward.register_fake
def _(dy, h, dh, weight, rstd, n, rms, need_weight, need_bias):
    return h.new_empty(h.shape), _empty_vec(h, n if need_weight else 0), _empty_vec(h, n if need_bias else 0)


def _row_setup(ctx, inputs, output) -> None:
    x, residual, weight, bias, n, eps, rms = inputs
    _, h, rstd = output
    ctx.fused = residual is not None
    ctx.n, ctx.rms = n, rms
    ctx.bias_shape, ctx.bias_dtype = (None, None) if bias is None else (bias.shape, bias.dtype)
    ctx.save_for_backward(h if ctx.fused else x, weight, rstd)


def _row_grads(ctx, dy, dh, _drstd):
    h, weight, rstd = ctx.saved_tensors
    need_x, need_r, need_w, need_b = ctx.needs_input_grad[:4]
    need_w, need_b = need_w and weight is not None, need_b and ctx.bias_shape is not None
    dx, dw, db = row_backward(dy, h, dh if ctx.fused else None, weight, rstd, ctx.n, ctx.rms, need_w, need_b)
    dx = dx.view(h.shape)
    return (
        dx if need_x else None,
        dx if ctx.fused and need_r else None,
        dw.view(weight.shape).to(weight.dtype) if need_w else None,
        db.view(ctx.bias_shape).to(ctx.bias_dtype) if need_b else None,
        None, None, None,
    )


row_forward.register_autograd(_row_grads, setup_context=_row_setup)


# --------------------------------------------------------------------------------------------------
# channels-first row norms
# --------------------------------------------------------------------------------------------------


@torch.library.custom_op("normkit::cpu_channel_row_forward", mutates_args=())
def channel_row_forward(
    x: Tensor, weight: Tensor | None, bias: Tensor | None, eps: float, rms: bool
) -> tuple[Tensor, Tensor]:
    """``(y, rstd)`` of LayerNorm/RMSNorm over dim 1 of (N, C, *), y laid out channels-last."""
    from .backend import _cf_layout

    return K.channel_row_forward(_cf_layout(x), weight, bias, eps, rms)


@channel_row_forward.register_fake
def _(x, weight, bias, eps, rms):
    s = x.numel() // max(x.shape[0] * x.shape[1], 1)
    return K.channels_last_like(x), x.new_empty((x.shape[0], s), dtype=K.arithmetic_dtype(x.dtype))


@torch.library.custom_op("normkit::cpu_channel_row_backward", mutates_args=())
def channel_row_backward(
    dy: Tensor, x: Tensor, weight: Tensor | None, rstd: Tensor, rms: bool, need_weight: bool, need_bias: bool
) -> tuple[Tensor, Tensor, Tensor]:
    """``(dx, dweight, dbias)``, dx laid out channels-last; float64 parameter gradients (empty when not needed)."""
    from .backend import _cf_layout

    dx, dw, db = K.channel_row_backward(_cf_layout(dy), _cf_layout(x), weight, rstd, rms, need_weight, need_bias)
    return dx, (dw if dw is not None else _empty_vec(x)), (db if db is not None else _empty_vec(x))


@channel_row_backward.register_fake
def _(dy, x, weight, rstd, rms, need_weight, need_bias):
    c = x.shape[1]
    return K.channels_last_like(x), _empty_vec(x, c if need_weight else 0), _empty_vec(x, c if need_bias else 0)


def _channel_row_setup(ctx, inputs, output) -> None:
    x, weight, bias, _, rms = inputs
    ctx.rms = rms
    ctx.bias_dtype = None if bias is None else bias.dtype
    ctx.mark_non_differentiable(output[1])
    ctx.save_for_backward(x, weight, output[1])


def _channel_row_grads(ctx, dy, _drstd):
    x, weight, rstd = ctx.saved_tensors
    need_x, need_w, need_b = ctx.needs_input_grad[:3]
    need_w, need_b = need_w and weight is not None, need_b and ctx.bias_dtype is not None
    dx, dw, db = channel_row_backward(dy, x, weight, rstd, ctx.rms, need_w, need_b)
    return (
        dx if need_x else None,
        dw.to(weight.dtype) if need_w else None,
        db.to(ctx.bias_dtype) if need_b else None,
        None, None,
    )


channel_row_forward.register_autograd(_channel_row_grads, setup_context=_channel_row_setup)


# --------------------------------------------------------------------------------------------------
# channel norms
# --------------------------------------------------------------------------------------------------


@torch.library.custom_op("normkit::cpu_chan_forward", mutates_args=())
def chan_forward(
    x: Tensor,
    weight: Tensor | None,
    bias: Tensor | None,
    groups: int,
    fixed_mean: Tensor | None,
    fixed_var: Tensor | None,
    eps: float,
    silu: bool,
    out_channels_first: bool,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """``(y, mean, rstd, var)`` of BatchNorm (groups == 0) or GroupNorm/InstanceNorm; float64 statistics.

    rstd stays float64 here, though the kernel writes it in the arithmetic dtype (as the eager path keeps
    it): a changed output dtype under an unchanged op name would meet graphs compiled before the change
    in torch.compile's on-disk caches, which key on the op's name, not on its fake's outputs."""
    y, xk, dims, nhwc, out_nhwc = chan_output(x, groups, out_channels_first)
    mean, rstd, var = K.chan_forward(xk, y, dims, nhwc, out_nhwc, groups, weight, bias, fixed_mean, fixed_var, eps,
                                     silu)
    return y, mean, rstd.to(torch.float64), var


@chan_forward.register_fake
def _(x, weight, bias, groups, fixed_mean, fixed_var, eps, silu, out_channels_first):
    y = chan_output(x, groups, out_channels_first)[0]
    sets = x.shape[0] * groups if groups > 0 else x.shape[1]
    return y, _empty_vec(x, sets), _empty_vec(x, sets), _empty_vec(x, sets)


@torch.library.custom_op("normkit::cpu_chan_backward", mutates_args=())
def chan_backward(
    dy: Tensor,
    x: Tensor,
    weight: Tensor | None,
    bias: Tensor | None,
    mean: Tensor | None,
    rstd: Tensor,
    groups: int,
    train: bool,
    silu: bool,
    need_weight: bool,
    need_bias: bool,
) -> tuple[Tensor, Tensor, Tensor]:
    """``(dx, dweight, dbias)`` of :func:`chan_forward`; float64 parameter gradients (empty if unneeded)."""
    from .backend import _like_layout

    xk, dims, nhwc = channel_layout(x, per_channel=groups == 0)
    dx, dw, db = K.chan_backward(
        _like_layout(dy, xk, nhwc), xk, dims, nhwc, groups, weight, bias,
        mean, rstd.to(K.arithmetic_dtype(x.dtype)), train, silu, need_weight, need_bias,
    )
    return dx.view(x.shape), (dw if dw is not None else _empty_vec(x)), (db if db is not None else _empty_vec(x))


@chan_backward.register_fake
def _(dy, x, weight, bias, mean, rstd, groups, train, silu, need_weight, need_bias):
    xk = channel_layout(x, per_channel=groups == 0)[0]
    c = x.shape[1]
    return torch.empty_like(xk).view(x.shape), _empty_vec(x, c if need_weight else 0), _empty_vec(
        x, c if need_bias else 0
    )


def _chan_setup(ctx, inputs, output) -> None:
    x, weight, bias, groups, fixed_mean, fixed_var, eps, silu, _ = inputs
    _, mean, rstd, _ = output
    ctx.groups, ctx.silu, ctx.train = groups, silu, fixed_mean is None
    ctx.has_bias = bias is not None
    ctx.bias_dtype = None if bias is None else bias.dtype
    ctx.mark_non_differentiable(*output[1:])
    # the mean only where the backward kernel needs it before recomputing it (see the backend)
    keep_mean = silu or not ctx.train
    ctx.save_for_backward(x, weight, bias if silu else None, mean if keep_mean else None, rstd)


def _chan_grads(ctx, dy, _dmean, _drstd, _dvar):
    x, weight, bias, mean, rstd = ctx.saved_tensors
    need_x, need_w, need_b = ctx.needs_input_grad[:3]
    need_w, need_b = need_w and weight is not None, need_b and ctx.has_bias
    dx, dw, db = chan_backward(dy, x, weight, bias, mean, rstd, ctx.groups, ctx.train, ctx.silu, need_w, need_b)
    return (
        dx if need_x else None,
        dw.to(weight.dtype) if need_w else None,
        db.to(ctx.bias_dtype) if need_b else None,
        None, None, None, None, None, None,
    )


chan_forward.register_autograd(_chan_grads, setup_context=_chan_setup)
