"""The reference backend: :mod:`normkit.reference`'s forward and hand-derived backward under autograd.

One :class:`torch.autograd.Function` serves all five norms. It saves only what each backward needs,
the input and the per-row/per-channel statistics (never a float32 copy of a low-precision input),
and its backward is written in differentiable torch ops, so double backward works too.
"""

from __future__ import annotations

from typing import Any, Callable

import torch
from torch import Tensor

from .. import reference as ref
from .base import Backend


class _Norm(torch.autograd.Function):
    """``y = forward(x, weight, bias, *args)`` with ``backward(dy, x, weight, *stats, *args)``."""

    @staticmethod
    def forward(ctx, forward: Callable, backward: Callable, x: Tensor, weight, bias, *args: Any) -> Tensor:
        y, *stats = forward(x, weight, bias, *args)
        ctx.backward_fn, ctx.args = backward, args
        ctx.bias_dtype = None if bias is None else bias.dtype  # bias itself is not needed by backward
        ctx.save_for_backward(x, weight, *stats)
        return y

    @staticmethod
    def backward(ctx, dy: Tensor):
        x, weight, *stats = ctx.saved_tensors
        dx, dweight, *dbias = ctx.backward_fn(dy, x, weight, *stats, *ctx.args)
        need_x, need_w, need_b = ctx.needs_input_grad[2:5]
        return (
            None,
            None,
            dx if need_x else None,
            dweight.to(weight.dtype) if need_w else None,
            dbias[0].to(ctx.bias_dtype) if need_b else None,
            *([None] * len(ctx.args)),
        )


# Adapters from the uniform (x, weight, bias, *args) calling convention to the readable functions.


def _ln_fwd(x, weight, bias, normalized_shape, eps):
    return ref.layer_norm(x, normalized_shape, weight, bias, eps)


def _ln_bwd(dy, x, weight, mean, rstd, normalized_shape, eps):
    return ref.layer_norm_backward(dy, x, normalized_shape, weight, mean, rstd)


def _rms_fwd(x, weight, bias, normalized_shape, eps):
    return ref.rms_norm(x, normalized_shape, weight, eps)


def _rms_bwd(dy, x, weight, rstd, normalized_shape, eps):
    return ref.rms_norm_backward(dy, x, normalized_shape, weight, rstd)


def _gn_fwd(x, weight, bias, num_groups, eps):
    return ref.group_norm(x, num_groups, weight, bias, eps)


def _gn_bwd(dy, x, weight, mean, rstd, num_groups, eps):
    return ref.group_norm_backward(dy, x, num_groups, weight, mean, rstd)


def _bn_fwd(x, weight, bias, running_mean, running_var, training, momentum, eps):
    return ref.batch_norm(x, running_mean, running_var, weight, bias, training, momentum, eps)


def _bn_bwd(dy, x, weight, mean, rstd, running_mean, running_var, training, momentum, eps):
    return ref.batch_norm_backward(dy, x, weight, mean, rstd, training)


def _in_fwd(x, weight, bias, running_mean, running_var, use_input_stats, momentum, eps):
    return ref.instance_norm(x, running_mean, running_var, weight, bias, use_input_stats, momentum, eps)


def _in_bwd(dy, x, weight, mean, rstd, running_mean, running_var, use_input_stats, momentum, eps):
    return ref.instance_norm_backward(dy, x, weight, mean, rstd, use_input_stats)


class ReferenceBackend(Backend):
    """Readable torch-op implementation of every norm; runs on any device and dtype torch supports."""

    name = "reference"

    def layer_norm(self, x, normalized_shape, weight, bias, eps):
        return _Norm.apply(_ln_fwd, _ln_bwd, x, weight, bias, tuple(normalized_shape), eps)

    def rms_norm(self, x, normalized_shape, weight, eps):
        return _Norm.apply(_rms_fwd, _rms_bwd, x, weight, None, tuple(normalized_shape), eps)

    def group_norm(self, x, num_groups, weight, bias, eps):
        return _Norm.apply(_gn_fwd, _gn_bwd, x, weight, bias, num_groups, eps)

    def batch_norm(self, x, running_mean, running_var, weight, bias, training, momentum, eps):
        return _Norm.apply(
            _bn_fwd, _bn_bwd, x, weight, bias, running_mean, running_var, training, momentum, eps
        )

    def instance_norm(self, x, running_mean, running_var, weight, bias, use_input_stats, momentum, eps):
        return _Norm.apply(
            _in_fwd, _in_bwd, x, weight, bias, running_mean, running_var, use_input_stats, momentum, eps
        )
