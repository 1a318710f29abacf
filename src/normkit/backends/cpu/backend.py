"""The ``cpu`` backend: normkit's C kernels (:mod:`.kernels`) under autograd.

Each norm is one :class:`torch.autograd.Function` whose forward runs one kernel and saves only what
the backward kernel needs: the input (for the fused add, the sum ``h`` instead) and ``rstd`` per row
or per set in float32 (float64 for float64 data), plus the mean where the backward needs it before it
can recompute it — never a float32 copy of a bfloat16 activation, never the output. Without a
gradient to compute, the kernel runs without the Function. Running statistics are updated in place
from the batch statistics the kernel returns.

What the kernels do not cover goes to the reference backend, unchanged in meaning: empty tensors,
tensors under torch.func transforms (vmap/grad wrappers have no data pointer), and double backward
(``create_graph=True``), whose backward must itself be differentiable — there the backward is the
reference's formula in torch ops, with statistics recomputed from the saved input.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from ... import reference as ref
from ..base import Backend, gated_needs_composition
from ..base import needs_grad as _needs_grad
from . import kernels as K
from . import ops

__all__ = ["CpuBackend"]


# --------------------------------------------------------------------------------------------------
# layouts
# --------------------------------------------------------------------------------------------------


_CHANNELS_LAST = {4: torch.channels_last, 5: torch.channels_last_3d}


def _channel_layout(x: Tensor, per_channel: bool) -> tuple[Tensor, tuple[int, int, int], bool]:
    """x (N, C, *) as ``(tensor, (N, C, S), channels_last)``: channels-first if contiguous, else
    channels-last if the channel dim is innermost and dense, else a contiguous copy.

    ``per_channel`` (BatchNorm: statistics over every sample) lets a 2-D (N, C) input be seen as one
    sample of N positions, channels-last, instead of N*C runs of length 1."""
    n, c = x.shape[0], x.shape[1]
    s = math.prod(x.shape[2:])
    if x.dim() == 2 and per_channel:
        return x.contiguous(), (1, c, n), True
    if x.is_contiguous():
        return x, (n, c, s), False
    # channels innermost and dense: torch's cached flag where it has one (a movedim view costs 3 µs)
    fmt = _CHANNELS_LAST.get(x.dim())
    if x.is_contiguous(memory_format=fmt) if fmt is not None else x.movedim(1, -1).is_contiguous():
        return x, (n, c, s), True
    return x.contiguous(), (n, c, s), False


def _like_layout(t: Tensor, x: Tensor, nhwc: bool) -> Tensor:
    """``t`` (same shape as x) in the layout the kernel sees x in."""
    if not nhwc or x.dim() == 2:
        return t.contiguous()
    fmt = _CHANNELS_LAST.get(t.dim())
    return t.contiguous(memory_format=fmt) if fmt is not None else t.movedim(1, -1).contiguous().movedim(-1, 1)


def _grads(weight: Tensor | None, bias_dtype: torch.dtype | None) -> torch.dtype:
    """The dtype the backward kernel writes the parameter gradients in (see :func:`.kernels.grad_dtype`)."""
    return K.grad_dtype(None if weight is None else weight.dtype, bias_dtype)


def _param_grad(g: Tensor, dtype: torch.dtype, shape: tuple[int, ...] | None = None) -> Tensor:
    """A parameter's gradient from the kernel's vector: cast to ``dtype`` and (given a ``shape`` of more than
    one dim) viewed as it, each only when needed (a view to a torch.Size took 3 µs and a cast to the dtype it
    already has 1.3 µs a call, a tenth of a small LayerNorm's backward)."""
    if shape is not None and len(shape) != 1:
        g = g.view(shape)
    return g if g.dtype == dtype else g.to(dtype)


_is_functorch_wrapped = torch._C._functorch.is_functorch_wrapped_tensor
_is_legacy_batched = torch._C._functorch.is_legacy_batchedtensor


def _wrapped(*tensors: Tensor | None) -> bool:
    """Whether any tensor is a torch.func wrapper or a legacy batched tensor (``is_grads_batched``):
    neither has storage of its own for a kernel to read."""
    for t in tensors:
        if t is not None and (_is_functorch_wrapped(t) or _is_legacy_batched(t)):
            return True
    return False


# --------------------------------------------------------------------------------------------------
# row norms: LayerNorm, RMSNorm, and the fused residual adds
# --------------------------------------------------------------------------------------------------


def _row_backward_differentiable(dy, h, weight, shape, eps, rms):
    """The reference backward in torch ops, statistics recomputed from h (for create_graph)."""
    if rms:
        _, rstd = ref.rms_norm(h, shape, weight, eps)
        dx, dw = ref.rms_norm_backward(dy, h, shape, weight, rstd)
        return dx, dw, None
    _, mean, rstd = ref.layer_norm(h, shape, weight, None, eps)
    return ref.layer_norm_backward(dy, h, shape, weight, mean, rstd)


class _RowNorm(torch.autograd.Function):
    """y = LayerNorm/RMSNorm(x) or, with a residual, (y, h) = (norm(x + residual), x + residual).

    ``rounding``: ``"xhat"``, y = round(round(x̂) · w); ``"rstd"``, y = round(x · round(rstd)) (see
    :func:`.kernels.row_forward`). The backward is the same either way: it differentiates the norm
    without the rounding in between, as it does the rounding of y."""

    @staticmethod
    def forward(ctx, x, residual, weight, bias, shape, eps, rms, rounding=None):
        n = math.prod(shape)
        xc = x.contiguous()
        rc = residual.contiguous() if residual is not None else None
        y, h, rstd = K.row_forward(xc, rc, weight, bias, n, eps, rms, rounding=rounding)
        ctx.shape, ctx.eps, ctx.rms, ctx.fused = shape, eps, rms, residual is not None
        ctx.bias_dtype = None if bias is None else bias.dtype
        # the input itself, not a contiguous copy of it: a copy made here has no grad_fn, and the
        # differentiable backward (create_graph) must reach x through it
        ctx.save_for_backward(h if h is not None else x, weight, rstd)
        if h is None:
            return y
        return y, h

    @staticmethod
    def backward(ctx, dy, dh=None):
        h, weight, rstd = ctx.saved_tensors
        need_x, need_r, need_w, need_b = ctx.needs_input_grad[:4]
        # create_graph needs a differentiable backward; batched gradients (is_grads_batched, vmap'd
        # jacobians) arrive as functorch wrappers with no storage for the kernel: both take torch ops
        if torch.is_grad_enabled() or _wrapped(dy, dh):
            dx, dw, db = _row_backward_differentiable(dy, h, weight, ctx.shape, ctx.eps, ctx.rms)
            if dh is not None:
                dx = dx + dh
        else:
            dx, dw, db = K.row_backward(
                dy.contiguous(), h.contiguous(), None if dh is None else dh.contiguous(), weight, rstd,
                math.prod(ctx.shape), ctx.rms, need_w, need_b and not ctx.rms, _grads(weight, ctx.bias_dtype),
            )
        dw = _param_grad(dw, weight.dtype, weight.shape) if need_w else None
        db = _param_grad(db, ctx.bias_dtype, ctx.shape) if need_b else None
        dx_out = dx if need_x else None
        dres = dx if (ctx.fused and need_r) else None
        return dx_out, dres, dw, db, None, None, None, None


# --------------------------------------------------------------------------------------------------
# channels-first row norms: LayerNorm/RMSNorm over dim 1 at every position (LayerNorm2d)
# --------------------------------------------------------------------------------------------------


def _cf_layout(t: Tensor) -> Tensor:
    """``t`` as the channels-first row kernels read it: contiguous or channels-last, else a contiguous copy."""
    return t if t.is_contiguous() or K.is_channels_last(t) else t.contiguous()


class _ChannelRowNorm(torch.autograd.Function):
    """y = LayerNorm/RMSNorm of (N, C, *) over C at every position; y (and dx) laid out channels-last."""

    @staticmethod
    def forward(ctx, x, weight, bias, eps, rms):
        y, rstd = K.channel_row_forward(_cf_layout(x), weight, bias, eps, rms)
        ctx.eps, ctx.rms = eps, rms
        ctx.bias_dtype = None if bias is None else bias.dtype
        ctx.save_for_backward(x, weight, rstd)  # x itself (see _RowNorm.forward)
        return y

    @staticmethod
    def backward(ctx, dy):
        x, weight, rstd = ctx.saved_tensors
        need_x, need_w, need_b = ctx.needs_input_grad[:3]
        if torch.is_grad_enabled() or _wrapped(dy):  # as in _RowNorm.backward, channels moved last
            shape = (x.shape[1],)
            dx, dw, db = _row_backward_differentiable(dy.movedim(1, -1), x.movedim(1, -1), weight, shape, ctx.eps,
                                                      ctx.rms)
            dx = dx.movedim(-1, 1)
        else:
            dx, dw, db = K.channel_row_backward(
                _cf_layout(dy), _cf_layout(x), weight, rstd, ctx.rms, need_w, need_b and not ctx.rms,
                _grads(weight, ctx.bias_dtype),
            )
        dw = _param_grad(dw, weight.dtype) if need_w else None
        db = _param_grad(db, ctx.bias_dtype) if need_b else None
        return (dx if need_x else None), dw, db, None, None


def _channel_rows(x, weight, bias, eps, rms):
    """A channels-first row norm, its output laid out channels-last (as LayerNorm of x.movedim(1, -1)
    moved back lays it out). Input already laid out channels-last (or 2-D) is rows of C: the row
    kernel takes it as it is; anything else goes to the channels-first kernel, which transposes
    tile by tile as it writes."""
    rows = x.movedim(1, -1)
    if rows.is_contiguous():
        return _row(rows, None, weight, bias, (x.shape[1],), eps, rms).movedim(-1, 1)
    if torch.compiler.is_compiling():
        return ops.channel_row_forward(x, weight, bias, eps, rms)[0]
    if _needs_grad(x, weight, bias):
        return _ChannelRowNorm.apply(x, weight, bias, eps, rms)
    return K.channel_row_forward(_cf_layout(x), weight, bias, eps, rms, save_rstd=False)[0]


# --------------------------------------------------------------------------------------------------
# channel norms: BatchNorm, InstanceNorm, GroupNorm (+ SiLU)
# --------------------------------------------------------------------------------------------------


def _chan_forward(
    x, weight, bias, groups, fixed_mean, fixed_var, eps, silu, out_channels_first, need_stats=True, activation=None,
    need_rstd=None,
):
    """The kernel call: ``(y, x as the kernel saw it, mean, rstd, var)``, the mean and variance in float64
    (None without ``need_stats``), rstd in the arithmetic dtype (None without ``need_rstd``, by default
    ``need_stats``); ``activation`` (inference only) applied as the output is written."""
    xk, dims, nhwc = _channel_layout(x, per_channel=groups == 0)
    if nhwc and out_channels_first and x.dim() > 2:  # InstanceNorm's output is channels-first
        y, out_nhwc = torch.empty(x.shape, dtype=x.dtype), False
    else:
        y, out_nhwc = torch.empty_like(xk), nhwc
    mean, rstd, var = K.chan_forward(
        xk, y, dims, nhwc, out_nhwc, groups, weight, bias, fixed_mean, fixed_var, eps, silu, need_stats, activation,
        need_rstd,
    )
    return y, xk, mean, rstd, var


class _ChanNorm(torch.autograd.Function):
    """One kernel call for BatchNorm (``groups == 0``) and GroupNorm/InstanceNorm (``groups > 0``).

    Returns y. The float64 batch statistics for the caller's running-statistics update are appended to
    ``stats`` (a list, or None when the caller needs none) rather than returned: each output of a
    Function costs autograd bookkeeping on every call, and most callers discard them."""

    @staticmethod
    def forward(ctx, x, weight, bias, groups, fixed_mean, fixed_var, eps, silu, out_channels_first, stats):
        train = fixed_mean is None
        keep_mean = silu or not train
        y, xk, mean, rstd, var = _chan_forward(
            x, weight, bias, groups, fixed_mean, fixed_var, eps, silu, out_channels_first,
            need_stats=keep_mean or stats is not None, need_rstd=True,
        )
        ctx.groups, ctx.silu, ctx.eps, ctx.train = groups, silu, eps, train
        ctx.bias_dtype = None if bias is None else bias.dtype
        if stats is not None:
            stats += (mean, var)
        # the statistics as the kernel returned them, with no conversion op per call (which cost more
        # than the kernel on small inputs): rstd in the arithmetic dtype, and the mean (float64) only
        # where the backward kernel needs it before it has recomputed it from x (SiLU's input; eval's
        # fixed statistics). The bias is needed only to recompute SiLU's input.
        # x itself, not the layout copy the kernel may have read (see _RowNorm.forward)
        ctx.save_for_backward(x, weight, bias if silu else None, mean if keep_mean else None, rstd)
        return y

    @staticmethod
    def backward(ctx, dy):
        x, weight, bias, mean, rstd = ctx.saved_tensors
        need_x, need_w, need_b = ctx.needs_input_grad[:3]
        if torch.is_grad_enabled() or _wrapped(dy):  # as in _RowNorm.backward
            dx, dw, db = _chan_backward_differentiable(ctx, dy, x, weight, bias, mean, rstd)
        else:
            xk, dims, nhwc = _channel_layout(x, per_channel=ctx.groups == 0)
            dx, dw, db = K.chan_backward(
                _like_layout(dy, xk, nhwc), xk, dims, nhwc, ctx.groups, weight, bias, mean, rstd,
                ctx.train, ctx.silu, need_w, need_b, _grads(weight, ctx.bias_dtype),
            )
        return (
            dx if need_x else None,
            _param_grad(dw, weight.dtype) if need_w else None,
            _param_grad(db, ctx.bias_dtype) if need_b else None,
            None, None, None, None, None, None, None,
        )


def _chan_backward_differentiable(ctx, dy, x, weight, bias, mean, rstd):
    """Reference formulas in torch ops (create_graph), statistics recomputed from x when they depend on it."""
    groups = ctx.groups
    if ctx.silu:
        _, m, r = ref.group_norm_silu(x, groups, weight, bias, ctx.eps)
        return ref.group_norm_silu_backward(dy, x, groups, weight, bias, m, r)
    if groups > 0:
        if x.shape[1] == groups and x.dim() > 2:  # InstanceNorm with input statistics
            _, m, r = ref.instance_norm(x, None, None, weight, None, True, 0.0, ctx.eps)
            return ref.instance_norm_backward(dy, x, weight, m, r, True)
        _, m, r = ref.group_norm(x, groups, weight, None, ctx.eps)
        return ref.group_norm_backward(dy, x, groups, weight, m, r)
    if ctx.train:
        _, m, r = ref.batch_norm(x, None, None, weight, None, True, 0.0, ctx.eps)
        return ref.batch_norm_backward(dy, x, weight, m, r, True)
    return ref.batch_norm_backward(dy, x, weight, mean.double(), rstd.double(), False)


def _row(x, residual, weight, bias, shape, eps, rms, rounding=None):
    """A row norm: through autograd when a gradient is wanted, else the kernel alone (inference
    skips the autograd.Function's overhead, which dominates at small sizes); under torch.compile, the
    same kernels as custom ops (the caller composes a ``rounding`` there)."""
    if torch.compiler.is_compiling():
        y, h, _ = ops.row_forward(x, residual, weight, bias, math.prod(shape), eps, rms)
        return y if residual is None else (y, h)
    if _needs_grad(x, residual, weight, bias):
        return _RowNorm.apply(x, residual, weight, bias, shape, eps, rms, rounding)
    rc = residual.contiguous() if residual is not None else None
    y, h, _ = K.row_forward(x.contiguous(), rc, weight, bias, math.prod(shape), eps, rms, save_rstd=False,
                            rounding=rounding)
    return y if residual is None else (y, h)


def _chan(x, weight, bias, groups, fixed_mean, fixed_var, eps, silu, out_channels_first, need_stats=True):
    """A channel norm, ``(y, mean, var)``: through autograd only when a gradient is wanted (custom ops
    under torch.compile). Without ``need_stats`` (the caller updates no running statistics) inference
    returns no statistics either."""
    if torch.compiler.is_compiling():
        y, mean, _, var = ops.chan_forward(x, weight, bias, groups, fixed_mean, fixed_var, eps, silu,
                                           out_channels_first)
        return y, mean, var
    if _needs_grad(x, weight, bias):
        stats = [] if need_stats else None
        y = _ChanNorm.apply(x, weight, bias, groups, fixed_mean, fixed_var, eps, silu, out_channels_first, stats)
        return (y, *stats) if stats else (y, None, None)
    y, _, mean, _, var = _chan_forward(
        x, weight, bias, groups, fixed_mean, fixed_var, eps, silu, out_channels_first, need_stats
    )
    return y, mean, var


# --------------------------------------------------------------------------------------------------
# the backend
# --------------------------------------------------------------------------------------------------


class CpuBackend(Backend):
    """normkit's own multi-threaded C kernels for CPU tensors (float32, float64, bfloat16, float16)."""

    name = "cpu"

    def __init__(self) -> None:
        K.ensure_loaded()  # a BuildError (an ImportError) here makes the backend unavailable
        from ..reference import ReferenceBackend

        self._reference = ReferenceBackend()

    def supports(self, x: Tensor) -> bool:
        return x.is_cpu and x.dtype in K.SUPPORTED_DTYPES

    def _fallback(self, *tensors: Tensor | None) -> bool:
        """Hand the call to the reference: empty input, torch.func wrappers, or a parameter or running
        statistic not on the CPU (the reference's torch ops raise torch's device error for it)."""
        if tensors[0].numel() == 0:
            return True
        for t in tensors[1:]:
            if t is not None and not t.is_cpu:
                return True
        return not torch.compiler.is_compiling() and _wrapped(*tensors)  # dynamo unwraps torch.func itself

    # row norms

    def layer_norm(self, x, normalized_shape, weight, bias, eps):
        if self._fallback(x, weight, bias):
            return self._reference.layer_norm(x, normalized_shape, weight, bias, eps)
        return _row(x, None, weight, bias, tuple(normalized_shape), eps, False)

    def rms_norm(self, x, normalized_shape, weight, eps):
        if self._fallback(x, weight):
            return self._reference.rms_norm(x, normalized_shape, weight, eps)
        return _row(x, None, weight, None, tuple(normalized_shape), ref.rms_norm_eps(x.dtype, eps), True)

    def rms_norm_rounded_scale(self, x, normalized_shape, weight, eps):
        # one pass where the weight has x's dtype (a 16-bit model's own weight); the composition
        # elsewhere, and under torch.compile (its custom op has no such mode)
        if weight.dtype != x.dtype or torch.compiler.is_compiling() or self._fallback(x, weight):
            return super().rms_norm_rounded_scale(x, normalized_shape, weight, eps)
        return _row(x, None, weight, None, tuple(normalized_shape), ref.rms_norm_eps(x.dtype, eps), True, "xhat")

    def rms_norm_rounded_rstd(self, x, normalized_shape, eps):
        # one pass for float32 and 16-bit data; float64 (whose scale the original computes in float32)
        # and torch.compile (the custom op has no such mode) take the composition
        if x.dtype == torch.float64 or torch.compiler.is_compiling() or self._fallback(x):
            return super().rms_norm_rounded_rstd(x, normalized_shape, eps)
        return _row(x, None, None, None, tuple(normalized_shape), ref.rms_norm_eps(x.dtype, eps), True, "rstd")

    def gated_rms_norm(self, x, gate, normalized_shape, weight, eps, activation, round_first, gate_first=False,
                       group_size=None):
        # inference in one pass: the kernel gates in float32 and rounds once (see the base class)
        if gated_needs_composition(x, gate, weight, round_first) or self._fallback(x, gate, weight):
            return super().gated_rms_norm(x, gate, normalized_shape, weight, eps, activation, round_first, gate_first,
                                          group_size)
        n = x.shape[-1]
        size = group_size or n  # groups of a row are rows of the kernel, the weight offset by group
        y, _, _ = K.row_forward(
            x.contiguous(), None, weight, None, size, ref.rms_norm_eps(torch.float32, eps), True, save_rstd=False,
            rounding="xhat" if round_first else None, gate=gate.contiguous(), gate_act=activation,
            gate_first=gate_first, weight_groups=n // size,
        )
        return y

    def fused_add_rms_norm(self, x, residual, normalized_shape, weight, eps):
        if self._fallback(x, residual, weight):
            return self._reference.fused_add_rms_norm(x, residual, normalized_shape, weight, eps)
        return _row(x, residual, weight, None, tuple(normalized_shape), ref.rms_norm_eps(x.dtype, eps), True)

    def fused_add_layer_norm(self, x, residual, normalized_shape, weight, bias, eps):
        if self._fallback(x, residual, weight, bias):
            return self._reference.fused_add_layer_norm(x, residual, normalized_shape, weight, bias, eps)
        return _row(x, residual, weight, bias, tuple(normalized_shape), eps, False)

    def channel_layer_norm(self, x, weight, bias, eps):
        if self._fallback(x, weight, bias):
            return self._reference.channel_layer_norm(x, weight, bias, eps)
        return _channel_rows(x, weight, bias, eps, False)

    def channel_rms_norm(self, x, weight, eps):
        if self._fallback(x, weight):
            return self._reference.channel_rms_norm(x, weight, eps)
        return _channel_rows(x, weight, None, ref.rms_norm_eps(x.dtype, eps), True)

    # channel norms

    def group_norm(self, x, num_groups, weight, bias, eps):
        if self._fallback(x, weight, bias):
            return self._reference.group_norm(x, num_groups, weight, bias, eps)
        return _chan(x, weight, bias, num_groups, None, None, eps, False, False, need_stats=False)[0]

    def group_norm_silu(self, x, num_groups, weight, bias, eps):
        if self._fallback(x, weight, bias):
            return self._reference.group_norm_silu(x, num_groups, weight, bias, eps)
        return _chan(x, weight, bias, num_groups, None, None, eps, True, False, need_stats=False)[0]

    def batch_norm(self, x, running_mean, running_var, weight, bias, training, momentum, eps):
        if self._fallback(x, weight, bias, running_mean, running_var):
            return self._reference.batch_norm(x, running_mean, running_var, weight, bias, training, momentum, eps)
        if not training:
            return self._fixed_stats(x, running_mean, running_var, weight, bias, eps)
        tracked = running_mean is not None or running_var is not None
        y, mean, var = _chan(x, weight, bias, 0, None, None, eps, False, False, need_stats=tracked)
        if tracked:
            count = x.numel() // x.shape[1]
            K.running_update(running_mean, running_var, mean, var, momentum, count / max(count - 1, 1))
        return y

    def instance_norm(self, x, running_mean, running_var, weight, bias, use_input_stats, momentum, eps):
        if self._fallback(x, weight, bias, running_mean, running_var):
            return self._reference.instance_norm(
                x, running_mean, running_var, weight, bias, use_input_stats, momentum, eps
            )
        if not use_input_stats:
            return self._fixed_stats(x, running_mean, running_var, weight, bias, eps)
        n, c = x.shape[0], x.shape[1]
        tracked = running_mean is not None or running_var is not None  # not by default (InstanceNorm's)
        y, mean, var = _chan(x, weight, bias, c, None, None, eps, False, True, need_stats=tracked)
        if tracked:
            count = x.numel() // (n * c)
            unbiased = (var * (count / max(count - 1, 1))).view(n, c).mean(0)
            K.running_update(running_mean, running_var, mean.view(n, c).mean(0), unbiased, momentum, 1.0)
        return y

    def batch_norm_act(self, x, running_mean, running_var, weight, bias, training, momentum, eps, activation):
        # inference with running statistics is one pass: the kernel applies the activation as it
        # writes; training, gradients, torch.compile and batch statistics take the composition
        if (
            training
            or running_mean is None
            or torch.compiler.is_compiling()
            or _needs_grad(x, weight, bias)
            or self._fallback(x, weight, bias, running_mean, running_var)
        ):
            return super().batch_norm_act(
                x, running_mean, running_var, weight, bias, training, momentum, eps, activation
            )
        y, _, _, _, _ = _chan_forward(
            x, weight, bias, 0, running_mean, running_var, eps, False, False, need_stats=False, activation=activation,
        )
        return y

    def _fixed_stats(self, x, running_mean, running_var, weight, bias, eps):
        """Normalize with the running statistics. The kernel reads them as they are stored (no float64
        copy: a small op costs as much as the kernel on a small input) and returns the float64 values
        it used, which are what the backward saves, so a later training step that updates the buffers
        in place does not change them."""
        # the buffers as they are: they never require grad here (the functional checks refuse that)
        return _chan(x, weight, bias, 0, running_mean, running_var, eps, False, False, need_stats=False)[0]
