"""Argument checks with torch's exception types and messages (PyTorch 2.13, CPU).

:mod:`normkit.functional` runs these before dispatching, so every backend rejects bad input with the
same error that ``torch.nn.functional`` raises. Messages are copied from torch, quirks included.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor
from torch.torch_version import TorchVersion

from .reference import LOW_PRECISION_DTYPES

# Matching torch is relative to the installed version: where torch changed a check, follow it.
_TORCH = TorchVersion(torch.__version__)
#: 2.13 allows eps == 0 in eval and words the training error differently; before, eps <= 0 is rejected
_EPS_ZERO_ALLOWED_IN_EVAL = _TORCH >= "2.13"
#: 2.14 prints the bias's own shape in GroupNorm's bias-size error (before: the weight's)
_GN_BIAS_MESSAGE_SHOWS_BIAS = _TORCH >= "2.14"

# ScalarType names as torch prints them in "expected scalar type X" and "not implemented for 'X'"
_SCALAR_NAMES = {
    torch.float16: "Half",
    torch.bfloat16: "BFloat16",
    torch.float32: "Float",
    torch.float64: "Double",
    torch.int8: "Char",
    torch.uint8: "Byte",
    torch.int16: "Short",
    torch.int32: "Int",
    torch.int64: "Long",
    torch.bool: "Bool",
    torch.complex64: "ComplexFloat",
    torch.complex128: "ComplexDouble",
}


def scalar_name(dtype: torch.dtype) -> str:
    return _SCALAR_NAMES.get(dtype, str(dtype).removeprefix("torch."))


def floating(x: Tensor, kernel: str) -> None:
    """Integer/bool/complex input: ``NotImplementedError: "<kernel>" not implemented for 'Long'``."""
    if not x.is_floating_point():
        raise NotImplementedError(f'"{kernel}" not implemented for \'{scalar_name(x.dtype)}\'')


def _dtype(p: Tensor | torch.dtype | None) -> torch.dtype | None:
    return p.dtype if isinstance(p, Tensor) else p


def parameter_dtypes(
    x: Tensor,
    *params: Tensor | torch.dtype | None,
    check_order: Sequence[Tensor | torch.dtype | None] | None = None,
    cuda: str = "any",
) -> None:
    """torch's rule for parameters (weight, bias, running stats, in that order).

    ``params`` are tensors or bare dtypes (None: absent). On the CPU the first defined parameter
    decides: if it has the input's dtype, every other one must too (the first that does not, in
    ``check_order`` if given, is reported); otherwise every parameter must be float32 and the input
    float16/bfloat16 ("mixed dtype"). On CUDA, ``cuda`` names torch's rule for the norm: ``"any"``
    (BatchNorm, InstanceNorm, RMSNorm: any dtypes), ``"same"`` (LayerNorm: the input's dtype only),
    ``"mixed_then_same"`` (GroupNorm: the CPU rule, whose messages say "(CPU)" there too, then the
    input's dtype only).
    """
    dtype = x.dtype
    for p in params:
        if p is not None and (p.dtype if isinstance(p, Tensor) else p) != dtype:
            break
    else:
        return  # the common case, every parameter in x's dtype (or absent), passes every rule
    if not x.is_cpu:
        if cuda == "any":
            return
        if cuda == "mixed_then_same":
            _cpu_parameter_rule(x, params, check_order)
        for d in map(_dtype, params):
            if d is not None and d != x.dtype:
                raise RuntimeError(f"expected scalar type {scalar_name(x.dtype)} but found {scalar_name(d)}")
        return
    _cpu_parameter_rule(x, params, check_order)


def _cpu_parameter_rule(
    x: Tensor, params: Sequence[Tensor | torch.dtype | None], check_order: Sequence[Tensor | torch.dtype | None] | None
) -> None:
    defined = [d for d in map(_dtype, params) if d is not None]
    if not defined:
        return
    if defined[0] != x.dtype:
        if any(d != torch.float32 for d in defined):
            raise RuntimeError("mixed dtype (CPU): expect parameter to have scalar type of Float")
        if x.dtype not in LOW_PRECISION_DTYPES:
            raise RuntimeError("mixed dtype (CPU): all inputs must share same datatype.")
        return
    rest = defined[1:] if check_order is None else [d for d in map(_dtype, check_order) if d is not None]
    for d in rest:
        if d != x.dtype:
            raise RuntimeError(f"expected scalar type {scalar_name(x.dtype)} but found {scalar_name(d)}")


def _shape_list(shape: Sequence[int]) -> str:
    return "[" + ", ".join(str(int(s)) for s in shape) + "]"


def normalized_shape(
    x: Tensor,
    shape: Sequence[int],
    weight: Tensor | None,
    bias: Tensor | None,
    *,
    rms: bool = False,
) -> None:
    """LayerNorm/RMSNorm: the trailing dims of ``x`` and the parameters must have ``shape``."""
    k = len(shape)
    if (  # the common case first, without building messages or tuples
        k > 0
        and (weight is None or weight.shape == shape)
        and (bias is None or bias.shape == shape)
        and x.shape[-k:] == shape
    ):
        return
    if len(shape) == 0:
        raise RuntimeError(
            "Expected normalized_shape to be at least 1-dimensional, i.e., containing at least one "
            "element, but got normalized_shape = []"
        )
    for name, p in (("weight", weight), ("bias", bias)):
        if p is not None and tuple(p.shape) != tuple(shape):
            raise RuntimeError(
                f"Expected {name} to be of same shape as normalized_shape, but got {name} of shape "
                f"{_shape_list(p.shape)} and normalized_shape = {_shape_list(shape)}"
            )
    k = len(shape)
    if rms and x.dim() < k:
        raise ValueError(f"Input tensor must have at least {k} dimensions, but got {x.dim()}")
    if x.dim() < k or tuple(x.shape[x.dim() - k :]) != tuple(shape):
        # torch's rms_norm prints "[*4]" where layer_norm prints "[*, 4]"
        expected = ("[*" if rms else "[*, ") + ", ".join(str(int(s)) for s in shape) + "]"
        raise RuntimeError(
            f"Given normalized_shape={_shape_list(shape)}, expected input with shape {expected}, "
            f"but got input of size{_shape_list(x.shape)}"
        )


def more_than_one_value_per_channel(size: Sequence[int]) -> None:
    """BatchNorm/GroupNorm in training need two or more values per statistic."""
    prod = size[0]
    for s in size[2:]:
        prod *= s
    if prod == 1:
        raise ValueError(f"Expected more than 1 value per channel when training, got input size {size}")


def more_than_one_spatial_element(size: Sequence[int]) -> None:
    prod = 1
    for s in size[2:]:
        prod *= s
    if prod == 1:
        raise ValueError(f"Expected more than 1 spatial element when training, got input size {size}")


def group_norm_args(x: Tensor, num_groups: int, weight: Tensor | None, bias: Tensor | None) -> None:
    if x.dim() < 2:
        raise RuntimeError(f"Expected at least 2 dimensions for input tensor but received {x.dim()}")
    more_than_one_value_per_channel([x.size(0) * x.size(1) // num_groups, num_groups] + list(x.shape[2:]))
    if num_groups <= 0:
        raise RuntimeError(f"Expected num groups to be greater than 0, got {num_groups}")
    channels = x.size(1)
    if channels % num_groups != 0:
        raise RuntimeError(
            "Expected number of channels in input to be divisible by num_groups, but got input of "
            f"shape {_shape_list(x.shape)} and num_groups={num_groups}"
        )
    if weight is not None and (weight.dim() != 1 or weight.numel() != channels):
        raise RuntimeError(
            "Expected weight to be a vector of size equal to the number of channels in input, but got "
            f"weight of shape {_shape_list(weight.shape)} and input of shape {_shape_list(x.shape)}"
        )
    if bias is not None and (bias.dim() != 1 or bias.numel() != channels):
        # torch < 2.14 prints the *weight's* shape here ([0] when weight is None)
        if _GN_BIAS_MESSAGE_SHOWS_BIAS:
            bias_shape = _shape_list(bias.shape)
        else:
            bias_shape = "[0]" if weight is None else _shape_list(weight.shape)
        raise RuntimeError(
            "Expected bias to be a vector of size equal to the number of channels in input, but got "
            f"bias of shape {bias_shape} and input of shape {_shape_list(x.shape)}"
        )


def eps_for_batch_norm(eps: float, training: bool) -> None:
    if not _EPS_ZERO_ALLOWED_IN_EVAL:
        if eps <= 0.0:
            raise ValueError(f"batch_norm eps must be positive, but got {eps}")
        return
    if training and eps <= 0.0:
        raise ValueError(f"batch_norm eps must be positive during training, but got {eps}")
    if eps < 0.0:
        raise ValueError(f"batch_norm eps must be non-negative, but got {eps}")


def running_stats_not_differentiable(running_mean: Tensor | None, running_var: Tensor | None) -> None:
    """Running statistics are buffers: torch refuses ones that require grad while grad mode is on."""
    if not torch.is_grad_enabled():
        return
    for name, p in (("running_mean", running_mean), ("running_var", running_var)):
        if p is not None and p.requires_grad:
            raise RuntimeError(
                f"The function 'native_batch_norm' is not differentiable with respect to argument '{name}'. "
                "This input cannot have requires_grad True."
            )


def running_stats_pair(running_mean: Tensor | None, running_var: Tensor | None) -> None:
    if (running_mean is None) != (running_var is None):
        raise ValueError("running_mean and running_var must either both be None or neither be None")


def per_channel_sizes(
    features: int,
    running_mean: Tensor | None,
    running_var: Tensor | None,
    weight: Tensor | None,
    bias: Tensor | None,
    training: bool,
    repeat: int = 1,
) -> None:
    """``<name> should contain C elements not K``; ``repeat`` is N for InstanceNorm (torch repeats)."""
    # torch checks each running stat in turn (defined in eval, then its size), then weight and bias
    for name, p in (("running_mean", running_mean), ("running_var", running_var), ("weight", weight), ("bias", bias)):
        if p is None:
            if not training and name.startswith("running_"):
                raise RuntimeError(f"{name} must be defined in evaluation mode")
        elif p.numel() * repeat != features:
            raise RuntimeError(f"{name} should contain {features} elements not {p.numel() * repeat}")
