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


class BiasKwargMixin:
    """For BatchNorm, InstanceNorm and GroupNorm: torch 2.13's treatment of ``bias=False`` on any torch.

    On torch >= 2.13 both methods are torch's. On older torches ``extra_repr`` stays the installed
    torch's (matching torch is relative to the installed version) and only a module built with
    ``bias=False``, which that torch cannot build, says ``bias=False`` after ``affine``; and
    ``reset_parameters`` skips the None bias that torch's would try to zero.
    """

    def reset_parameters(self) -> None:
        if TORCH_HAS_BIAS_KWARG or not self.affine or self.bias is not None:
            super().reset_parameters()
            return
        reset_running_stats = getattr(self, "reset_running_stats", None)  # BatchNorm, InstanceNorm
        if reset_running_stats is not None:
            reset_running_stats()
        torch.nn.init.ones_(self.weight)

    def extra_repr(self) -> str:
        torch_repr = super().extra_repr()
        if TORCH_HAS_BIAS_KWARG or not self.affine or self.bias is not None:
            return torch_repr
        return torch_repr.replace(f"affine={self.affine}", f"affine={self.affine}, bias=False", 1)
