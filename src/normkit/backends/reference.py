"""The reference backend: :mod:`normkit.reference`'s forward and hand-derived backward under autograd.

One :class:`torch.autograd.Function` serves all five norms and GroupNorm+SiLU. It saves only what
each backward needs, the input and the per-row/per-channel statistics (never a float32 copy of a
low-precision input, never an output): GroupNorm+SiLU recomputes its GroupNorm output in backward
from x, the statistics and the parameters. The fused residual adds keep :class:`Backend`'s
composition: the norm saves ``h = x + residual``, the tensor the op returns anyway.
The backward is written in differentiable torch ops; for double backward (``create_graph=True``) it
recomputes the statistics from the saved input so that they, too, are differentiated.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from .. import reference as ref
from .base import Backend

__all__ = ["ReferenceBackend"]


def _same(args: tuple) -> tuple:
    return args


def _input_stats_without_update(args: tuple) -> tuple | None:
    """BatchNorm/InstanceNorm args ``(running_mean, running_var, use_batch_stats, ...)``: recompute
    batch statistics without touching the running ones; None when the statistics are the (fixed)
    running ones, which do not depend on x."""
    return (None, None, *args[2:]) if args[2] else None


@dataclass(frozen=True)
class _Op:
    """One norm in the uniform calling convention of :class:`_Norm`."""

    #: ``forward(x, weight, bias, *args) -> (y, *stats)``
    forward: Callable
    #: ``backward(dy, x, weight, *stats, *args) -> (dx, dweight, [dbias])``
    backward: Callable
    #: the ``args`` of a forward that recomputes x's statistics without updating running ones, or
    #: None where the statistics are constants
    recompute_args: Callable[[tuple], tuple | None] = _same
    #: whether backward needs the bias too (saved after the weight, passed after it:
    #: ``backward(dy, x, weight, bias, *stats, *args)``); the norms' backward does not
    needs_bias: bool = False


class _Norm(torch.autograd.Function):
    """Returns ``(y, *stats)``; the statistics are non-differentiable outputs (see :func:`_apply`).

    forward/setup_context are split, and the vmap rule generated, so that torch.func's transforms
    (``grad``, ``vmap`` over ``grad`` for per-sample gradients) work as they do on torch's norms.
    """

    generate_vmap_rule = True

    @staticmethod
    def forward(op: _Op, x: Tensor, weight, bias, *args: Any) -> tuple[Tensor, ...]:
        return tuple(op.forward(x, weight, bias, *args))

    @staticmethod
    def setup_context(ctx, inputs: tuple, output: tuple) -> None:
        op, x, weight, bias, *args = inputs
        y, *stats = output
        ctx.op, ctx.args = op, tuple(args)
        ctx.bias_dtype = None if bias is None else bias.dtype
        ctx.mark_non_differentiable(*stats)
        params = (weight, bias) if op.needs_bias else (weight,)  # the norms' backward needs no bias
        ctx.save_for_backward(x, *params, *stats)

    @staticmethod
    def backward(ctx, dy: Tensor, *unused_stat_grads: Tensor):
        x, *saved = ctx.saved_tensors
        n_params = 2 if ctx.op.needs_bias else 1
        params, stats = saved[:n_params], saved[n_params:]
        weight = params[0]
        recompute = ctx.op.recompute_args(ctx.args) if torch.is_grad_enabled() else None
        if recompute is not None:  # create_graph: statistics computed from x must be differentiated too
            _, *stats = ctx.op.forward(x, weight, None, *recompute)
        dx, dweight, *dbias = ctx.op.backward(dy, x, *params, *stats, *ctx.args)
        need_x, need_w, need_b = ctx.needs_input_grad[1:4]
        return (
            None,
            dx if need_x else None,
            dweight.to(weight.dtype) if need_w else None,
            dbias[0].to(ctx.bias_dtype) if need_b else None,
            *([None] * len(ctx.args)),
        )


_LAYER_NORM = _Op(
    forward=lambda x, w, b, shape, eps: ref.layer_norm(x, shape, w, b, eps),
    backward=lambda dy, x, w, mean, rstd, shape, eps: ref.layer_norm_backward(dy, x, shape, w, mean, rstd),
)
_RMS_NORM = _Op(
    forward=lambda x, w, b, shape, eps: ref.rms_norm(x, shape, w, eps),
    backward=lambda dy, x, w, rstd, shape, eps: ref.rms_norm_backward(dy, x, shape, w, rstd),
)
_GROUP_NORM = _Op(
    forward=lambda x, w, b, groups, eps: ref.group_norm(x, groups, w, b, eps),
    backward=lambda dy, x, w, mean, rstd, groups, eps: ref.group_norm_backward(dy, x, groups, w, mean, rstd),
)
_GROUP_NORM_SILU = _Op(
    forward=lambda x, w, b, groups, eps: ref.group_norm_silu(x, groups, w, b, eps),
    backward=lambda dy, x, w, b, mean, rstd, groups, eps: ref.group_norm_silu_backward(
        dy, x, groups, w, b, mean, rstd
    ),
    needs_bias=True,
)
_BATCH_NORM = _Op(
    forward=lambda x, w, b, rm, rv, training, momentum, eps: ref.batch_norm(x, rm, rv, w, b, training, momentum, eps),
    backward=lambda dy, x, w, mean, rstd, rm, rv, training, momentum, eps: ref.batch_norm_backward(
        dy, x, w, mean, rstd, training
    ),
    recompute_args=_input_stats_without_update,
)
_INSTANCE_NORM = _Op(
    forward=lambda x, w, b, rm, rv, use_input, momentum, eps: ref.instance_norm(
        x, rm, rv, w, b, use_input, momentum, eps
    ),
    backward=lambda dy, x, w, mean, rstd, rm, rv, use_input, momentum, eps: ref.instance_norm_backward(
        dy, x, w, mean, rstd, use_input
    ),
    recompute_args=_input_stats_without_update,
)


def _apply(op: _Op, x: Tensor, weight: Tensor | None, bias: Tensor | None, *args: Any) -> Tensor:
    if torch.compiler.is_compiling():
        # the forward's torch ops, traced as they are: the compiler derives (and fuses) the backward
        return op.forward(x, weight, bias, *args)[0]
    return _Norm.apply(op, x, weight, bias, *args)[0]


class ReferenceBackend(Backend):
    """Readable torch-op implementation of every norm; runs on any device and dtype torch supports."""

    name = "reference"

    def layer_norm(self, x, normalized_shape, weight, bias, eps):
        return _apply(_LAYER_NORM, x, weight, bias, tuple(normalized_shape), eps)

    def rms_norm(self, x, normalized_shape, weight, eps):
        return _apply(_RMS_NORM, x, weight, None, tuple(normalized_shape), eps)

    def group_norm(self, x, num_groups, weight, bias, eps):
        return _apply(_GROUP_NORM, x, weight, bias, num_groups, eps)

    def group_norm_silu(self, x, num_groups, weight, bias, eps):
        return _apply(_GROUP_NORM_SILU, x, weight, bias, num_groups, eps)

    def batch_norm(self, x, running_mean, running_var, weight, bias, training, momentum, eps):
        return _apply(_BATCH_NORM, x, weight, bias, running_mean, running_var, training, momentum, eps)

    def instance_norm(self, x, running_mean, running_var, weight, bias, use_input_stats, momentum, eps):
        return _apply(
            _INSTANCE_NORM, x, weight, bias, running_mean, running_var, use_input_stats, momentum, eps
        )
