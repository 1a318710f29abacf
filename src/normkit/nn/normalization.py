"""LayerNorm, GroupNorm and RMSNorm: torch.nn's classes, computed by :mod:`normkit.functional`."""

from __future__ import annotations

import torch
from torch import Tensor

from .. import functional as F
from ._compat import BiasKwargMixin, init_with_bias

__all__ = ["LayerNorm", "GroupNorm", "RMSNorm"]


class LayerNorm(torch.nn.LayerNorm):
    r"""Drop-in :class:`torch.nn.LayerNorm`: normalizes the trailing ``normalized_shape`` dims.

    .. math:: y = \frac{x - \mathrm{E}[x]}{\sqrt{\mathrm{Var}[x] + \epsilon}} \odot \gamma + \beta

    One mean and biased variance per leading index (row); ``weight``/``bias`` have
    ``normalized_shape``. See :func:`normkit.reference.layer_norm`.

    Example::

        >>> ln = normkit.nn.LayerNorm(768)
        >>> ln(torch.randn(4, 128, 768)).shape
        torch.Size([4, 128, 768])
    """

    def forward(self, input: Tensor) -> Tensor:
        return F.layer_norm(input, self.normalized_shape, self.weight, self.bias, self.eps)


class RMSNorm(torch.nn.RMSNorm):
    r"""Drop-in :class:`torch.nn.RMSNorm`: ``x / sqrt(mean(x^2) + eps) * weight`` over trailing dims.

    .. math:: y = \frac{x}{\sqrt{\frac{1}{n}\sum_i x_i^2 + \epsilon}} \odot \gamma

    ``eps=None`` means ``torch.finfo(torch.float32).eps`` (float64's for float64 input). See
    :func:`normkit.reference.rms_norm`.

    Example::

        >>> norm = normkit.nn.RMSNorm(4096)
        >>> norm(torch.randn(2, 16, 4096)).shape
        torch.Size([2, 16, 4096])
    """

    def forward(self, x: Tensor) -> Tensor:
        return F.rms_norm(x, self.normalized_shape, self.weight, self.eps)


class GroupNorm(BiasKwargMixin, torch.nn.GroupNorm):
    r"""Drop-in :class:`torch.nn.GroupNorm`: statistics per (sample, group of C/G channels).

    .. math:: y = \frac{x - \mathrm{E}[x]}{\sqrt{\mathrm{Var}[x] + \epsilon}} \gamma_c + \beta_c

    The mean and variance of a group span **all** of its channels and spatial positions (not one
    channel at a time, which would be InstanceNorm). See :func:`normkit.reference.group_norm`.

    Example::

        >>> gn = normkit.nn.GroupNorm(32, 256)
        >>> gn(torch.randn(2, 256, 16, 16)).shape
        torch.Size([2, 256, 16, 16])
    """

    def __init__(
        self,
        num_groups: int,
        num_channels: int,
        eps: float = 1e-5,
        affine: bool = True,
        device=None,
        dtype=None,
        *,
        bias: bool = True,
    ) -> None:
        init_with_bias(self, super().__init__, bias, affine, num_groups, num_channels, eps, affine, device, dtype)

    def forward(self, input: Tensor) -> Tensor:
        return F.group_norm(input, self.num_groups, self.weight, self.bias, self.eps)
