"""Functional API: the signatures of ``torch.nn.functional``'s norms, dispatched to a normkit backend.

Each function checks its arguments exactly as torch does (same exception types and messages), picks
a backend with :func:`normkit.backends.resolve`, and gives the output the memory layout torch gives
it. The math lives in the backends; :mod:`normkit.reference` is the readable version of it.

The fused ops (:func:`fused_add_rms_norm`, :func:`fused_add_layer_norm`, :func:`group_norm_silu`) have
no torch.nn.functional counterpart: they check their arguments as the norm they end in does (same
exception types and messages), and additionally require ``residual`` to match ``x`` exactly.

Under CUDA autocast, torch runs ``layer_norm`` and ``group_norm`` in float32 (they are on autocast's
float32 list: float16/bfloat16 inputs are cast to float32 and the output is float32), and ``rms_norm``
too where the installed torch lists it (2.13 and 2.14 do, 2.11 does not: there it keeps the input's
dtype); so do the functions here that compute them, the channels-first and fused ones included (the
fused adds then return ``x + residual`` in x's dtype and the norm of it in float32, as the composition
does). BatchNorm and InstanceNorm are not on the list: they run in the input's dtype.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor
from torch.overrides import handle_torch_function, has_torch_function_variadic

from . import _checks
from .backends import get_backend, resolve
from .backends.base import ACTIVATIONS, GATE_ACTIVATIONS

__all__ = [
    "batch_norm",
    "batch_norm_act",
    "instance_norm",
    "layer_norm",
    "group_norm",
    "rms_norm",
    "channel_layer_norm",
    "channel_rms_norm",
    "fused_add_rms_norm",
    "fused_add_layer_norm",
    "group_norm_silu",
]


def _suggested_format(x: Tensor) -> torch.memory_format:
    """channels_last(_3d) when ``x`` is laid out that way and not also plain-contiguous."""
    if x.is_contiguous():
        return torch.contiguous_format
    if x.dim() == 4 and x.is_contiguous(memory_format=torch.channels_last):
        return torch.channels_last
    if x.dim() == 5 and x.is_contiguous(memory_format=torch.channels_last_3d):
        return torch.channels_last_3d
    return torch.contiguous_format


def _laid_out(y: Tensor, memory_format: torch.memory_format = torch.contiguous_format) -> Tensor:
    """``y`` in ``memory_format``, untouched when it already is (no alias op for torch.compile to trace)."""
    return y if y.is_contiguous(memory_format=memory_format) else y.contiguous(memory_format=memory_format)


#: whether torch's CUDA autocast lists rms_norm among its float32 ops (it joined the list after torch
#: 2.11; layer_norm and group_norm are on it in every supported version): an AutocastCUDA kernel is
#: registered for it exactly then
_RMS_NORM_AUTOCASTS = torch._C._dispatch_has_kernel_for_dispatch_key("aten::rms_norm", "AutocastCUDA")


def _cuda_autocast(x: Tensor, listed: bool = True) -> bool:
    """Whether torch's CUDA autocast would run a norm of ``x`` that is on its float32 list (``listed``)
    in float32."""
    return listed and x.is_cuda and torch.is_autocast_enabled("cuda")


def _fp32(t: Tensor | None) -> Tensor | None:
    """``t`` as autocast's float32 policy passes it on: a float16/bfloat16 CUDA tensor as float32, any
    other (float32, float64, not floating, not on CUDA, None) as it is."""
    if t is not None and t.is_cuda and t.dtype in (torch.float16, torch.bfloat16):
        return t.float()
    return t


def _as_shape(normalized_shape: int | Sequence[int]) -> tuple[int, ...]:
    if isinstance(normalized_shape, int):
        return (normalized_shape,)
    return tuple(int(s) for s in normalized_shape)


def _layer_norm_checks(input: Tensor, shape: tuple[int, ...], weight: Tensor | None, bias: Tensor | None) -> None:
    _checks.normalized_shape(input, shape, weight, bias)
    _checks.floating(input, "LayerNormKernelImpl")
    _checks.parameter_dtypes(input, weight, bias, cuda="same")


def _rms_norm_checks(input: Tensor, shape: tuple[int, ...], weight: Tensor | None) -> None:
    _checks.normalized_shape(input, shape, weight, None, rms=True)
    _checks.floating(input, "rms_norm")


def _group_norm_checks(input: Tensor, num_groups: int, weight: Tensor | None, bias: Tensor | None) -> None:
    _checks.group_norm_args(input, num_groups, weight, bias)
    _checks.floating(input, "GroupNormKernelImpl")
    _checks.parameter_dtypes(input, weight, bias, cuda="mixed_then_same")


def _batch_norm_checks(input, running_mean, running_var, weight, bias, training, eps) -> None:
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
    _batch_norm_checks(input, running_mean, running_var, weight, bias, training, eps)
    y = resolve(input).batch_norm(input, running_mean, running_var, weight, bias, training, momentum, eps)
    return _laid_out(y, _suggested_format(input))


def batch_norm_act(
    input: Tensor,
    running_mean: Tensor | None,
    running_var: Tensor | None,
    weight: Tensor | None = None,
    bias: Tensor | None = None,
    training: bool = False,
    momentum: float = 0.1,
    eps: float = 1e-5,
    activation: str = "relu",
) -> Tensor:
    r"""Batch Normalization followed by an activation: ``activation(batch_norm(input, ...))``.

    .. math:: y = \phi\left(\frac{x - \mathrm{E}[x]}{\sqrt{\mathrm{Var}[x] + \epsilon}} \gamma + \beta\right),
        \qquad \phi \in \{\mathrm{relu}, \mathrm{hardswish}, \mathrm{silu}\}

    The norm-activation pair of ResNets, MobileNets and EfficientNets (timm's ``BatchNormAct2d``).
    Arguments as :func:`batch_norm`, checked the same way. In inference with running statistics the
    cpu backend applies the activation as it writes the output (one pass over memory instead of two),
    rounding once to the input's dtype: identical to the composition for ReLU, and within a rounding
    of it for Hardswish and SiLU in bfloat16/float16 (float32: Hardswish identical, SiLU within a few
    ulps). Training, and anything that needs a gradient, runs the composition.

    Args:
        activation (str): ``"relu"``, ``"hardswish"`` or ``"silu"``. Default: ``"relu"``.

    Shape:
        - input: :math:`(N, C)` or :math:`(N, C, *)`
        - output: same shape, laid out as :func:`batch_norm` lays it out.

    Example::

        >>> bn = torch.nn.BatchNorm2d(16).eval()
        >>> x = torch.randn(2, 16, 8, 8)
        >>> y = normkit.functional.batch_norm_act(x, bn.running_mean, bn.running_var, bn.weight, bn.bias)
        >>> y.shape
        torch.Size([2, 16, 8, 8])
    """
    if has_torch_function_variadic(input, running_mean, running_var, weight, bias):
        return handle_torch_function(
            batch_norm_act, (input, running_mean, running_var, weight, bias), input, running_mean, running_var,
            weight=weight, bias=bias, training=training, momentum=momentum, eps=eps, activation=activation,
        )
    if activation not in ACTIVATIONS:
        raise ValueError(f"batch_norm_act: activation must be one of {sorted(ACTIVATIONS)}, got {activation!r}")
    _batch_norm_checks(input, running_mean, running_var, weight, bias, training, eps)
    y = resolve(input).batch_norm_act(
        input, running_mean, running_var, weight, bias, training, momentum, eps, activation
    )
    return _laid_out(y, _suggested_format(input))


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
    return _laid_out(y)


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
    if _cuda_autocast(input):
        with torch.autocast("cuda", enabled=False):
            return layer_norm(_fp32(input), normalized_shape, _fp32(weight), _fp32(bias), eps)
    shape = _as_shape(normalized_shape)
    _layer_norm_checks(input, shape, weight, bias)
    return _laid_out(resolve(input).layer_norm(input, shape, weight, bias, eps))


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
    if _cuda_autocast(input):
        with torch.autocast("cuda", enabled=False):
            return group_norm(_fp32(input), num_groups, _fp32(weight), _fp32(bias), eps)
    _group_norm_checks(input, num_groups, weight, bias)
    y = resolve(input).group_norm(input, num_groups, weight, bias, eps)
    return _laid_out(y, _suggested_format(input))


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
    if _cuda_autocast(input, _RMS_NORM_AUTOCASTS):
        with torch.autocast("cuda", enabled=False):
            return rms_norm(_fp32(input), normalized_shape, _fp32(weight), eps)
    shape = _as_shape(normalized_shape)
    _rms_norm_checks(input, shape, weight)
    y = resolve(input).rms_norm(input, shape, weight, eps)
    return _laid_out(y, _suggested_format(input))


def _rms_norm_rounded_scale(
    input: Tensor, normalized_shape: Sequence[int], weight: Tensor, eps: float | None
) -> Tensor:
    """``weight * rms_norm(input, normalized_shape, None, eps).to(input.dtype)``: Hugging Face Llama's
    RMSNorm, whose normalized value is rounded to the input's dtype before the weight multiplies it.
    One pass on a backend with the kernel for it (cpu and triton, for a weight in the input's dtype),
    which also saves nothing for the backward but the input and one float per row: the composition
    saves the rounded normalized value for the weight's gradient. Used by converted Llama-style norms."""
    if has_torch_function_variadic(input, weight) or _cuda_autocast(input, _RMS_NORM_AUTOCASTS):
        return weight * rms_norm(input, normalized_shape, None, eps).to(input.dtype)
    shape = _as_shape(normalized_shape)
    _rms_norm_checks(input, shape, weight)
    y = resolve(input).rms_norm_rounded_scale(input, shape, weight, eps)
    return _laid_out(y, _suggested_format(input))


def _rms_norm_rounded_rstd(input: Tensor, normalized_shape: Sequence[int], eps: float) -> Tensor:
    """``input * rsqrt(mean(input.float()²) + eps).to(input.dtype)``: DeepSeek-V4's weightless RMSNorm,
    whose float32 scale is rounded to the input's dtype before it multiplies the input. One pass on a
    backend with the kernel for it (cpu and triton), saving the input and one float per row for the
    backward. Used by converted DeepSeek-V4-style norms."""
    shape = _as_shape(normalized_shape)
    if has_torch_function_variadic(input):  # a tensor subclass sees the original's torch ops
        return get_backend("reference").rms_norm_rounded_rstd(input, shape, eps)
    _rms_norm_checks(input, shape, None)
    y = resolve(input).rms_norm_rounded_rstd(input, shape, eps)
    return _laid_out(y, _suggested_format(input))


def _gated_rms_norm(
    input: Tensor,
    gate: Tensor,
    normalized_shape: Sequence[int],
    weight: Tensor,
    eps: float | None,
    activation: str = "silu",
    round_first: bool = False,
    gate_first: bool = False,
    group_size: int | None = None,
) -> Tensor:
    """The gated RMSNorm of linear-attention layers, rounded to the input's dtype once at the end (see
    :meth:`normkit.backends.Backend.gated_rms_norm`): ``norm · act(gate.float())`` (GLM-5-Next, Qwen3-Next,
    Falcon-H1), or with ``gate_first`` the norm of ``input.float() · act(gate.float())`` (Mamba-2,
    Falcon-H1's other order); ``act`` is ``"silu"`` or ``"sigmoid"``. ``norm`` is RMSNorm over the last dim,
    or over each ``group_size`` elements of it, times the weight (over the whole last dim) in float32, or
    with ``round_first`` rounded to the input's dtype and then times the weight in its dtype (Hugging Face
    Llama's order; the weight in the input's dtype). ``gate`` has the input's shape and dtype. In inference
    the cpu and triton backends compute it in one pass over the input and the gate (the composition makes
    several full-size float32 temporaries); with a gradient, under torch.compile and for float64 it is that
    composition. Used by converted gated norms."""
    if activation not in GATE_ACTIVATIONS:
        raise ValueError(f"_gated_rms_norm: activation must be one of {sorted(GATE_ACTIVATIONS)}, got {activation!r}")
    if gate.shape != input.shape or gate.dtype != input.dtype:
        raise ValueError(
            f"_gated_rms_norm: gate must have the input's shape and dtype, got {tuple(gate.shape)} {gate.dtype} "
            f"for {tuple(input.shape)} {input.dtype}"
        )
    shape = _as_shape(normalized_shape)
    if len(shape) != 1:
        raise ValueError(f"_gated_rms_norm: normalized_shape must be the last dim, (n,), got {list(shape)}")
    if group_size is not None and (group_size <= 0 or shape[0] % group_size):
        raise ValueError(f"_gated_rms_norm: group_size {group_size} must divide normalized_shape {list(shape)}")
    args = (eps, activation, round_first, gate_first, group_size)
    if has_torch_function_variadic(input, gate, weight):  # a tensor subclass sees the composition's torch ops
        return get_backend("reference").gated_rms_norm(input, gate, shape, weight, *args)
    _rms_norm_checks(input, shape, weight)
    y = resolve(input).gated_rms_norm(input, gate, shape, weight, *args)
    return _laid_out(y, _suggested_format(input))


# --------------------------------------------------------------------------------------------------
# Channels-first row norms: LayerNorm/RMSNorm over dim 1 at every position (timm's LayerNorm2d)
# --------------------------------------------------------------------------------------------------


def _channel_checks(op: str, input: Tensor, weight: Tensor | None, bias: Tensor | None, rms: bool) -> None:
    """The row norm's checks on ``input`` with its channels moved last, as ``layer_norm(x.permute(0, 2,
    3, 1), ...)`` runs them (same errors); the view is made only where a shape does not fit."""
    if input.dim() < 2:
        raise ValueError(f"{op}: expected input of shape (N, C, *), but got {input.dim()}-D input")
    c = (input.shape[1],)
    if (weight is None or weight.shape == c) and (bias is None or bias.shape == c):
        # the shapes fit: what is left to check is the dtypes, which moving the channels does not change
        _checks.floating(input, "rms_norm" if rms else "LayerNormKernelImpl")
        if not rms:
            _checks.parameter_dtypes(input, weight, bias, cuda="same")
    elif rms:
        _rms_norm_checks(input.movedim(1, -1), c, weight)
    else:
        _layer_norm_checks(input.movedim(1, -1), c, weight, bias)


def channel_layer_norm(
    input: Tensor,
    weight: Tensor | None = None,
    bias: Tensor | None = None,
    eps: float = 1e-5,
) -> Tensor:
    r"""Layer Normalization over the channels (dim 1) of ``input``, separately at every position.

    .. math::
        y_{n,:,s} = \frac{x_{n,:,s} - \mathrm{E}[x_{n,:,s}]}{\sqrt{\mathrm{Var}[x_{n,:,s}] + \epsilon}}
        \odot \gamma + \beta

    The channels-first LayerNorm of ConvNeXt and timm's ``LayerNorm2d``: the same result as
    ``layer_norm(x.movedim(1, -1), (C,), weight, bias, eps).movedim(-1, 1)`` without its transposed
    copy: the cpu backend reads a contiguous (N, C, H, W) tensor where it lies, tile by tile.

    Args:
        input (Tensor): of shape :math:`(N, C, *)`.
        weight (Tensor, optional): :math:`\gamma`, of shape :math:`(C,)`. Default: None.
        bias (Tensor, optional): :math:`\beta`, of shape :math:`(C,)`. Default: None.
        eps (float): added to the variance. Default: 1e-5.

    Shape:
        - input: :math:`(N, C, *)`
        - output: same shape, laid out channels-last (channels innermost in memory) whatever the
          input's layout, as ``layer_norm(x.movedim(1, -1), ...).movedim(-1, 1)`` lays it out: the
          layers after a LayerNorm2d run on channels-last data, as they do in the original model.

    Example::

        >>> x = torch.randn(2, 96, 56, 56)
        >>> normkit.functional.channel_layer_norm(x, torch.ones(96), torch.zeros(96), 1e-6).shape
        torch.Size([2, 96, 56, 56])
    """
    if has_torch_function_variadic(input, weight, bias):
        return handle_torch_function(
            channel_layer_norm, (input, weight, bias), input, weight=weight, bias=bias, eps=eps
        )
    if _cuda_autocast(input):
        with torch.autocast("cuda", enabled=False):
            return channel_layer_norm(_fp32(input), _fp32(weight), _fp32(bias), eps)
    _channel_checks("channel_layer_norm", input, weight, bias, rms=False)
    return resolve(input).channel_layer_norm(input, weight, bias, eps)


def channel_rms_norm(input: Tensor, weight: Tensor | None = None, eps: float | None = None) -> Tensor:
    r"""Root Mean Square Layer Normalization over the channels (dim 1) of ``input``, at every position.

    .. math::
        y_{n,:,s} = \frac{x_{n,:,s}}{\sqrt{\frac{1}{C}\sum_c x_{n,c,s}^2 + \epsilon}} \odot \gamma

    timm's ``RmsNorm2d``: the same result as ``rms_norm(x.movedim(1, -1), (C,), weight, eps).movedim(-1, 1)``.

    Args:
        input (Tensor): of shape :math:`(N, C, *)`.
        weight (Tensor, optional): :math:`\gamma`, of shape :math:`(C,)`. Default: None.
        eps (float, optional): added to the mean square. Default: None, which means
            ``torch.finfo(torch.float32).eps`` (float64's for float64 input).

    Shape:
        - input: :math:`(N, C, *)`
        - output: same shape, laid out channels-last whatever the input's layout (as
          :func:`channel_layer_norm`).

    Example::

        >>> x = torch.randn(2, 96, 56, 56)
        >>> normkit.functional.channel_rms_norm(x, torch.ones(96), 1e-6).shape
        torch.Size([2, 96, 56, 56])
    """
    if has_torch_function_variadic(input, weight):
        return handle_torch_function(channel_rms_norm, (input, weight), input, weight=weight, eps=eps)
    if _cuda_autocast(input, _RMS_NORM_AUTOCASTS):
        with torch.autocast("cuda", enabled=False):
            return channel_rms_norm(_fp32(input), _fp32(weight), eps)
    _channel_checks("channel_rms_norm", input, weight, None, rms=True)
    return resolve(input).channel_rms_norm(input, weight, eps)


# --------------------------------------------------------------------------------------------------
# Fused ops: a residual add before the norm, an activation after it
# --------------------------------------------------------------------------------------------------


def _check_residual(op: str, x: Tensor, residual: Tensor) -> None:
    """``residual`` must match ``x`` exactly: no broadcasting, no type promotion, one device.

    ``x + residual`` would broadcast shapes and promote dtypes; a fused kernel adds element by element
    in x's dtype, so anything but an exact match is an error (a RuntimeError, as torch raises for
    mismatched tensors), naming both arguments.
    """
    if not isinstance(residual, Tensor):
        raise TypeError(f"{op}(): argument 'residual' must be Tensor, not {type(residual).__name__}")
    if x.shape != residual.shape:
        raise RuntimeError(
            f"{op}: expected x and residual to have the same shape, but got x of shape "
            f"{list(x.shape)} and residual of shape {list(residual.shape)}"
        )
    if x.dtype != residual.dtype:
        raise RuntimeError(
            f"{op}: expected x and residual to have the same dtype, but got x of dtype {x.dtype} "
            f"and residual of dtype {residual.dtype}"
        )
    if x.device != residual.device:
        raise RuntimeError(
            f"{op}: expected x and residual to be on the same device, but got x on {x.device} "
            f"and residual on {residual.device}"
        )


def fused_add_rms_norm(
    x: Tensor,
    residual: Tensor,
    normalized_shape: Sequence[int],
    weight: Tensor | None = None,
    eps: float | None = None,
) -> tuple[Tensor, Tensor]:
    r"""Residual add followed by RMSNorm, in one op: returns ``(rms_norm(h), h)`` with ``h = x + residual``.

    .. math::
        h = x + r, \qquad y = \frac{h}{\sqrt{\frac{1}{n}\sum_{i \in S} h_i^2 + \epsilon}} \odot \gamma

    The pre-norm transformer block's ``residual = x + residual; x = norm(residual)``: ``h`` (the
    updated residual stream, rounded to x's dtype) is returned so that the next block can add to it.
    The result equals ``torch.nn.functional.rms_norm(x + residual, normalized_shape, weight, eps)``
    and ``x + residual``; a backend with a fused kernel reads x and residual once.

    Args:
        x (Tensor): the input, of shape ``(*, *normalized_shape)``.
        residual (Tensor): added to ``x``; must have x's shape, dtype and device exactly (no
            broadcasting or type promotion: a ``RuntimeError`` naming both otherwise).
        normalized_shape (int or list of int): the trailing dims to normalize over.
        weight (Tensor, optional): :math:`\gamma`, of shape ``normalized_shape``. Default: None.
        eps (float, optional): added to the mean square. Default: None, which means
            ``torch.finfo(torch.float32).eps`` (float64's for float64 input).

    Shape:
        - x, residual: :math:`(*, \text{normalized\_shape})`
        - outputs ``y`` and ``h``: same shape as ``x``; channels_last when ``x`` is (as
          :func:`rms_norm` keeps it), contiguous otherwise.

    Example::

        >>> x, residual = torch.randn(2, 16, 512), torch.randn(2, 16, 512)
        >>> y, residual = normkit.functional.fused_add_rms_norm(x, residual, (512,))
        >>> y.shape, residual.shape
        (torch.Size([2, 16, 512]), torch.Size([2, 16, 512]))
    """
    if has_torch_function_variadic(x, residual, weight):
        return handle_torch_function(
            fused_add_rms_norm, (x, residual, weight), x, residual, normalized_shape, weight=weight, eps=eps
        )
    _check_residual("fused_add_rms_norm", x, residual)
    if _cuda_autocast(x, _RMS_NORM_AUTOCASTS):  # the composition's dtypes: h in x's dtype, its norm float32
        h = x + residual
        return rms_norm(h, normalized_shape, weight, eps), h
    shape = _as_shape(normalized_shape)
    _rms_norm_checks(x, shape, weight)
    y, h = resolve(x).fused_add_rms_norm(x, residual, shape, weight, eps)
    fmt = _suggested_format(x)
    return y.contiguous(memory_format=fmt), h.contiguous(memory_format=fmt)


def fused_add_layer_norm(
    x: Tensor,
    residual: Tensor,
    normalized_shape: Sequence[int],
    weight: Tensor | None = None,
    bias: Tensor | None = None,
    eps: float = 1e-5,
) -> tuple[Tensor, Tensor]:
    r"""Residual add followed by LayerNorm, in one op: returns ``(layer_norm(h), h)`` with ``h = x + residual``.

    .. math::
        h = x + r, \qquad y = \frac{h - \mathrm{E}[h]}{\sqrt{\mathrm{Var}[h] + \epsilon}} \odot \gamma + \beta

    The result equals ``torch.nn.functional.layer_norm(x + residual, normalized_shape, weight, bias,
    eps)`` and ``x + residual`` (rounded to x's dtype); a backend with a fused kernel reads x and
    residual once.

    Args:
        x (Tensor): the input, of shape ``(*, *normalized_shape)``.
        residual (Tensor): added to ``x``; must have x's shape, dtype and device exactly (no
            broadcasting or type promotion: a ``RuntimeError`` naming both otherwise).
        normalized_shape (int or list of int): the trailing dims to normalize over.
        weight (Tensor, optional): :math:`\gamma`, of shape ``normalized_shape``. Default: None.
        bias (Tensor, optional): :math:`\beta`, of shape ``normalized_shape``. Default: None.
        eps (float): added to the variance. Default: 1e-5.

    Shape:
        - x, residual: :math:`(*, \text{normalized\_shape})`
        - output ``y``: same shape as ``x``, contiguous (as :func:`layer_norm` returns it);
          ``h``: same shape, channels_last when ``x`` is (as ``x + residual`` is), contiguous otherwise.

    Example::

        >>> x, residual = torch.randn(2, 16, 768), torch.randn(2, 16, 768)
        >>> w, b = torch.ones(768), torch.zeros(768)
        >>> y, residual = normkit.functional.fused_add_layer_norm(x, residual, (768,), w, b)
        >>> y.shape
        torch.Size([2, 16, 768])
    """
    if has_torch_function_variadic(x, residual, weight, bias):
        return handle_torch_function(
            fused_add_layer_norm, (x, residual, weight, bias), x, residual, normalized_shape,
            weight=weight, bias=bias, eps=eps,
        )
    _check_residual("fused_add_layer_norm", x, residual)
    if _cuda_autocast(x):  # the composition's dtypes: h in x's dtype, the norm of it in float32
        h = x + residual
        return layer_norm(h, normalized_shape, weight, bias, eps), h
    shape = _as_shape(normalized_shape)
    _layer_norm_checks(x, shape, weight, bias)
    y, h = resolve(x).fused_add_layer_norm(x, residual, shape, weight, bias, eps)
    return _laid_out(y), _laid_out(h, _suggested_format(x))


def group_norm_silu(
    x: Tensor,
    num_groups: int,
    weight: Tensor | None = None,
    bias: Tensor | None = None,
    eps: float = 1e-5,
) -> Tensor:
    r"""Group Normalization followed by SiLU, in one op: ``silu(group_norm(x))``.

    .. math::
        z = \frac{x - \mu_{n,g}}{\sqrt{\sigma^2_{n,g} + \epsilon}} \gamma_c + \beta_c, \qquad
        y = \mathrm{silu}(z) = z \, \sigma(z) = \frac{z}{1 + e^{-z}}

    The norm-activation pair of diffusion U-Nets and VAEs. The result equals
    ``torch.nn.functional.silu(torch.nn.functional.group_norm(x, num_groups, weight, bias, eps))``,
    rounded once to x's dtype. A backend may save less for backward than the two ops do: the
    reference backend keeps x and the (N, G) statistics and recomputes :math:`z` in backward
    instead of storing the GroupNorm output (``docs/fused.md``).

    Args:
        x (Tensor): the input, of shape :math:`(N, C, *)`.
        num_groups (int): number of groups G; must divide C.
        weight (Tensor, optional): :math:`\gamma`, of shape :math:`(C,)`. Default: None.
        bias (Tensor, optional): :math:`\beta`, of shape :math:`(C,)`. Default: None.
        eps (float): added to the variance. Default: 1e-5.

    Shape:
        - x: :math:`(N, C, *)`
        - output: same shape as ``x``; channels_last(_3d) when ``x`` is (as :func:`group_norm`
          keeps it), contiguous otherwise.

    Example::

        >>> x = torch.randn(2, 64, 16, 16)
        >>> normkit.functional.group_norm_silu(x, 32, torch.ones(64), torch.zeros(64)).shape
        torch.Size([2, 64, 16, 16])
    """
    if has_torch_function_variadic(x, weight, bias):
        return handle_torch_function(
            group_norm_silu, (x, weight, bias), x, num_groups, weight=weight, bias=bias, eps=eps
        )
    if _cuda_autocast(x):  # GroupNorm in float32, then SiLU of the float32 result
        with torch.autocast("cuda", enabled=False):
            return group_norm_silu(_fp32(x), num_groups, _fp32(weight), _fp32(bias), eps)
    _group_norm_checks(x, num_groups, weight, bias)
    y = resolve(x).group_norm_silu(x, num_groups, weight, bias, eps)
    return _laid_out(y, _suggested_format(x))
