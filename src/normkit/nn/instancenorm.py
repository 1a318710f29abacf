"""InstanceNorm1d/2d/3d: torch.nn's classes, computed by :func:`normkit.functional.instance_norm`."""

from __future__ import annotations

import warnings

import torch
from torch import Tensor

from .. import functional as F
from ._compat import BiasKwargMixin, init_with_bias

__all__ = ["InstanceNorm1d", "InstanceNorm2d", "InstanceNorm3d"]


class _InstanceNormMixin(BiasKwargMixin):
    """Constructor with ``bias``, and torch's forward (checks, unbatched input) over normkit."""

    def __init__(
        self,
        num_features: int,
        eps: float = 1e-5,
        momentum: float = 0.1,
        affine: bool = False,
        track_running_stats: bool = False,
        device=None,
        dtype=None,
        *,
        bias: bool = True,
    ) -> None:
        init_with_bias(
            self, super().__init__, bias, affine,
            num_features, eps, momentum, affine, track_running_stats, device, dtype,
        )

    def _apply_instance_norm(self, input: Tensor) -> Tensor:
        return F.instance_norm(
            input,
            self.running_mean,
            self.running_var,
            self.weight,
            self.bias,
            self.training or not self.track_running_stats,
            # momentum=None freezes the running statistics
            self.momentum if self.momentum is not None else 0.0,
            self.eps,
        )

    def forward(self, input: Tensor) -> Tensor:
        self._check_input_dim(input)
        feature_dim = input.dim() - self._get_no_batch_dim()
        if input.size(feature_dim) != self.num_features:
            if self.affine:
                raise ValueError(
                    f"expected input's size at dim={feature_dim} to match num_features"
                    f" ({self.num_features}), but got: {input.size(feature_dim)}."
                )
            warnings.warn(
                f"input's size at dim={feature_dim} does not match num_features. "
                "You can silence this warning by not passing in num_features, "
                "which is not used because affine=False",
                stacklevel=2,
            )
        if input.dim() == self._get_no_batch_dim():  # unbatched: run as a batch of one
            return self._apply_instance_norm(input.unsqueeze(0)).squeeze(0)
        return self._apply_instance_norm(input)


class InstanceNorm1d(_InstanceNormMixin, torch.nn.InstanceNorm1d):
    r"""Drop-in :class:`torch.nn.InstanceNorm1d` over (N, C, L) or unbatched (C, L) input.

    .. math:: y_{n,c} = \frac{x_{n,c} - \mathrm{E}[x_{n,c}]}{\sqrt{\mathrm{Var}[x_{n,c}] + \epsilon}} \gamma_c + \beta_c

    Statistics per (sample, channel) over L; see :func:`normkit.reference.instance_norm`.
    """


class InstanceNorm2d(_InstanceNormMixin, torch.nn.InstanceNorm2d):
    r"""Drop-in :class:`torch.nn.InstanceNorm2d` over (N, C, H, W) or unbatched (C, H, W) input.

    .. math:: y_{n,c} = \frac{x_{n,c} - \mathrm{E}[x_{n,c}]}{\sqrt{\mathrm{Var}[x_{n,c}] + \epsilon}} \gamma_c + \beta_c

    Statistics per (sample, channel) over (H, W); see :func:`normkit.reference.instance_norm`.

    Example::

        >>> norm = normkit.nn.InstanceNorm2d(3, affine=True)
        >>> norm(torch.randn(2, 3, 16, 16)).shape
        torch.Size([2, 3, 16, 16])
    """


class InstanceNorm3d(_InstanceNormMixin, torch.nn.InstanceNorm3d):
    r"""Drop-in :class:`torch.nn.InstanceNorm3d` over (N, C, D, H, W) or unbatched (C, D, H, W) input.

    Statistics per (sample, channel) over (D, H, W); see :func:`normkit.reference.instance_norm`.
    """
