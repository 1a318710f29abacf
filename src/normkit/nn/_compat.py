"""The keyword-only ``bias`` of BatchNorm/InstanceNorm/GroupNorm (torch 2.13) on torches without it."""

from __future__ import annotations

import inspect
from collections.abc import Callable

import torch

#: whether the installed torch.nn norms take ``bias=`` (added in PyTorch 2.13)
TORCH_HAS_BIAS_KWARG = "bias" in inspect.signature(torch.nn.GroupNorm.__init__).parameters


def init_with_bias(module: torch.nn.Module, parent_init: Callable, bias: bool, affine: bool, *args) -> None:
    """Call the torch.nn constructor, passing ``bias`` where torch knows it and emulating it elsewhere.

    Emulation: build with a bias, then register ``bias`` as None, which is what torch 2.13 does
    for ``affine=True, bias=False`` (no ``bias`` key in the state_dict, ``module.bias is None``).
    """
    if TORCH_HAS_BIAS_KWARG:
        parent_init(*args, bias=bias)
        return
    parent_init(*args)
    if affine and not bias:
        module.register_parameter("bias", None)


def extra_repr_with_bias(module: torch.nn.Module, torch_repr: str) -> str:
    """torch's ``extra_repr``, plus ``bias=False`` where the installed torch cannot say it.

    On torch >= 2.13 this is torch's string unchanged. On older torches the string stays the
    installed torch's (matching torch is relative to the installed version) and only a module built
    with ``bias=False``, which that torch cannot build, gets 2.13's ``bias=False`` after ``affine``.
    """
    if TORCH_HAS_BIAS_KWARG or not module.affine or module.bias is not None:
        return torch_repr
    return torch_repr.replace(f"affine={module.affine}", f"affine={module.affine}, bias=False", 1)
