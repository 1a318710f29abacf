"""LayerNorm, GroupNorm and RMSNorm: torch.nn's classes, computed by :mod:`normkit.functional`.

Also the fused variants, subclasses of those with the same constructor, parameters and state_dict:
:class:`FusedAddRMSNorm`, :class:`FusedAddLayerNorm` (residual add + norm) and :class:`GroupNormSiLU`.
"""

from __future__ import annotations

import torch
from torch import Tensor

from .. import functional as F
from ._compat import BiasKwargMixin, init_with_bias

__all__ = ["LayerNorm", "GroupNorm", "RMSNorm", "FusedAddLayerNorm", "FusedAddRMSNorm", "GroupNormSiLU"]


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


class FusedAddRMSNorm(RMSNorm):
    r"""Residual add + :class:`RMSNorm` in one op: ``forward(x, residual) -> (rms_norm(h), h)``.

    ``h = x + residual`` (rounded to x's dtype) is returned as the updated residual stream.

    .. math:: h = x + r, \qquad y = \frac{h}{\sqrt{\frac{1}{n}\sum_i h_i^2 + \epsilon}} \odot \gamma

    :class:`RMSNorm`'s constructor, parameters and state_dict (it loads into ``torch.nn.RMSNorm``
    and back); ``residual`` must have x's shape, dtype and device. See
    :func:`normkit.functional.fused_add_rms_norm`.

    Example::

        >>> norm = normkit.nn.FusedAddRMSNorm(512)
        >>> x, residual = torch.randn(2, 16, 512), torch.randn(2, 16, 512)
        >>> y, residual = norm(x, residual)   # was: residual = x + residual; y = norm(residual)
    """

    def forward(self, x: Tensor, residual: Tensor) -> tuple[Tensor, Tensor]:  # type: ignore[override]
        return F.fused_add_rms_norm(x, residual, self.normalized_shape, self.weight, self.eps)


class FusedAddLayerNorm(LayerNorm):
    r"""Residual add + :class:`LayerNorm` in one op: ``forward(x, residual) -> (layer_norm(h), h)``.

    ``h = x + residual`` (rounded to x's dtype) is returned as the updated residual stream.

    .. math:: h = x + r, \qquad y = \frac{h - \mathrm{E}[h]}{\sqrt{\mathrm{Var}[h] + \epsilon}} \odot \gamma + \beta

    :class:`LayerNorm`'s constructor, parameters and state_dict (it loads into
    ``torch.nn.LayerNorm`` and back); ``residual`` must have x's shape, dtype and device. See
    :func:`normkit.functional.fused_add_layer_norm`.

    Example::

        >>> norm = normkit.nn.FusedAddLayerNorm(768)
        >>> x, residual = torch.randn(4, 128, 768), torch.randn(4, 128, 768)
        >>> y, residual = norm(x, residual)
    """

    def forward(self, x: Tensor, residual: Tensor) -> tuple[Tensor, Tensor]:  # type: ignore[override]
        return F.fused_add_layer_norm(x, residual, self.normalized_shape, self.weight, self.bias, self.eps)


class GroupNormSiLU(GroupNorm):
    r""":class:`GroupNorm` followed by SiLU in one op: ``silu(group_norm(x))``.

    .. math:: y = \mathrm{silu}(z) = \frac{z}{1 + e^{-z}}, \qquad
        z = \frac{x - \mathrm{E}[x]}{\sqrt{\mathrm{Var}[x] + \epsilon}} \gamma_c + \beta_c

    :class:`GroupNorm`'s constructor (``bias=False`` included), parameters and state_dict (it loads
    into ``torch.nn.GroupNorm`` and back). Replaces ``nn.Sequential(GroupNorm(G, C), SiLU())``; with
    the reference backend the backward keeps x and the statistics, not the GroupNorm output. See
    :func:`normkit.functional.group_norm_silu`.

    Example::

        >>> gn = normkit.nn.GroupNormSiLU(32, 256)
        >>> gn(torch.randn(2, 256, 16, 16)).shape
        torch.Size([2, 256, 16, 16])
    """

    def forward(self, input: Tensor) -> Tensor:
        return F.group_norm_silu(input, self.num_groups, self.weight, self.bias, self.eps)
