"""Functional API: the signatures of ``torch.nn.functional``'s norms, dispatched to a normkit backend.

Each function checks its arguments exactly as torch does (same exception types and messages), picks
a backend with :func:`normkit.backends.resolve`, and gives the output the memory layout torch gives
it. The math lives in the backends; :mod:`normkit.reference` is the readable version of it.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor
from torch.overrides import handle_torch_function, has_torch_function_variadic

from . import _checks
from .backends import resolve

__all__ = ["batch_norm", "instance_norm", "layer_norm", "group_norm", "rms_norm"]


def _suggested_format(x: Tensor) -> torch.memory_format:
    """channels_last(_3d) when ``x`` is laid out that way and not also plain-contiguous."""
    if x.is_contiguous():
        return torch.contiguous_format
    if x.dim() == 4 and x.is_contiguous(memory_format=torch.channels_last):
        return torch.channels_last
    if x.dim() == 5 and x.is_contiguous(memory_format=torch.channels_last_3d):
        return torch.channels_last_3d
    return torch.contiguous_format


def _as_shape(normalized_shape: int | Sequence[int]) -> tuple[int, ...]:
    if isinstance(normalized_shape, int):
        return (normalized_shape,)
    return tuple(int(s) for s in normalized_shape)


def batch_norm(
    input: Tensor,
    running_mean: Tensor | None,
    running_var: Tensor | None,
    weight: Tensor | None = None,
    bias: Tensor | None = None,
    training: bool = False,
    momentum: float = 0.1,
    eps: float = 1e-5,
) -> Tensor:
    r"""Batch Normalization over each channel of ``input`` of shape (N, C, *).

    Normalizes with the batch statistics when ``training`` (updating ``running_mean`` and
    ``running_var`` in place with ``momentum``, using the unbiased variance), and with the running
    statistics otherwise. Same signature and semantics as :func:`torch.nn.functional.batch_norm`;
    see :class:`normkit.nn.BatchNorm2d` and :func:`normkit.reference.batch_norm` for the math.
    """
    if has_torch_function_variadic(input, running_mean, running_var, weight, bias):
        return handle_torch_function(
            batch_norm, (input, running_mean, running_var, weight, bias), input, running_mean,
            running_var, weight=weight, bias=bias, training=training, momentum=momentum, eps=eps,
        )
    if training:
        _checks.more_than_one_value_per_channel(input.size())
    _checks.eps_for_batch_norm(eps, training)
    _checks.running_stats_not_differentiable(running_mean, running_var)
    # torch's order: sizes (and running stats defined in eval), the running pair, then dtypes
    features = input.size(1) if input.dim() > 1 else 0
    _checks.per_channel_sizes(features, running_mean, running_var, weight, bias, training)
    _checks.running_stats_pair(running_mean, running_var)
    _checks.floating(input, "batch_norm")
    # torch's training kernel meets the running statistics before the bias
    order = (weight, running_mean, running_var, bias) if training else None
    _checks.parameter_dtypes(input, weight, bias, running_mean, running_var, check_order=order)
    y = resolve(input).batch_norm(input, running_mean, running_var, weight, bias, training, momentum, eps)
    return y.contiguous(memory_format=_suggested_format(input))


def instance_norm(
    input: Tensor,
    running_mean: Tensor | None = None,
    running_var: Tensor | None = None,
    weight: Tensor | None = None,
    bias: Tensor | None = None,
    use_input_stats: bool = True,
    momentum: float = 0.1,
    eps: float = 1e-5,
) -> Tensor:
    r"""Instance Normalization: each channel of each sample of ``input`` (N, C, *) on its own.

    With ``use_input_stats`` every (n, c) is normalized with its own statistics (and running
    statistics, if given, are updated with their batch averages); otherwise with the running ones.
    Same signature and semantics as :func:`torch.nn.functional.instance_norm`.
    """
    if has_torch_function_variadic(input, running_mean, running_var, weight, bias):
        return handle_torch_function(
            instance_norm, (input, running_mean, running_var, weight, bias), input,
            running_mean=running_mean, running_var=running_var, weight=weight, bias=bias,
            use_input_stats=use_input_stats, momentum=momentum, eps=eps,
        )
    if use_input_stats:
        _checks.more_than_one_spatial_element(input.size())
    elif running_mean is None or running_var is None:
        raise RuntimeError(
            "Expected running_mean and running_var to be defined when use_input_stats is false"
        )
    _checks.running_stats_not_differentiable(running_mean, running_var)
    n, c = input.size(0), input.size(1)
    _checks.per_channel_sizes(n * c, running_mean, running_var, weight, bias, True, repeat=n)
    _checks.running_stats_pair(running_mean, running_var)
    _checks.floating(input, "batch_norm")
    # torch's instance_norm checks its running statistics as if they had the weight's dtype (the
    # input's without a weight): their own dtype is free (observed on torch 2.13, CPU)
    stats_as = None if running_mean is None else (weight if weight is not None else input).dtype
    _checks.parameter_dtypes(input, weight, bias, stats_as, stats_as)
    y = resolve(input).instance_norm(
        input, running_mean, running_var, weight, bias, use_input_stats, momentum, eps
    )
    return y.contiguous()


def layer_norm(
    input: Tensor,
    normalized_shape: Sequence[int],
    weight: Tensor | None = None,
    bias: Tensor | None = None,
    eps: float = 1e-5,
) -> Tensor:
    r"""Layer Normalization over the trailing ``normalized_shape`` dimensions of ``input``.

    Same signature and semantics as :func:`torch.nn.functional.layer_norm`.
    """
    if has_torch_function_variadic(input, weight, bias):
        return handle_torch_function(
            layer_norm, (input, weight, bias), input, normalized_shape, weight=weight, bias=bias, eps=eps
        )
    shape = _as_shape(normalized_shape)
    _checks.normalized_shape(input, shape, weight, bias)
    _checks.floating(input, "LayerNormKernelImpl")
    _checks.parameter_dtypes(input, weight, bias)
    return resolve(input).layer_norm(input, shape, weight, bias, eps).contiguous()


def group_norm(
    input: Tensor,
    num_groups: int,
    weight: Tensor | None = None,
    bias: Tensor | None = None,
    eps: float = 1e-5,
) -> Tensor:
    r"""Group Normalization: statistics over each group of C/G channels (and all positions) per sample.

    Same signature and semantics as :func:`torch.nn.functional.group_norm`.
    """
    if has_torch_function_variadic(input, weight, bias):
        return handle_torch_function(
            group_norm, (input, weight, bias), input, num_groups, weight=weight, bias=bias, eps=eps
        )
    _checks.group_norm_args(input, num_groups, weight, bias)
    _checks.floating(input, "GroupNormKernelImpl")
    _checks.parameter_dtypes(input, weight, bias)
    y = resolve(input).group_norm(input, num_groups, weight, bias, eps)
    return y.contiguous(memory_format=_suggested_format(input))


def rms_norm(
    input: Tensor,
    normalized_shape: Sequence[int],
    weight: Tensor | None = None,
    eps: float | None = None,
) -> Tensor:
    r"""Root Mean Square Layer Normalization over the trailing ``normalized_shape`` dimensions.

    ``eps=None`` uses ``torch.finfo(torch.float32).eps`` (float64's for float64 input). Same
    signature and semantics as :func:`torch.nn.functional.rms_norm`.
    """
    if has_torch_function_variadic(input, weight):
        return handle_torch_function(rms_norm, (input, weight), input, normalized_shape, weight=weight, eps=eps)
    shape = _as_shape(normalized_shape)
    _checks.normalized_shape(input, shape, weight, None, rms=True)
    _checks.floating(input, "rms_norm")
    y = resolve(input).rms_norm(input, shape, weight, eps)
    return y.contiguous(memory_format=_suggested_format(input))
