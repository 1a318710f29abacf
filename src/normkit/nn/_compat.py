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
