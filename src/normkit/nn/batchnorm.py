"""BatchNorm1d/2d/3d: torch.nn's classes, computed by :func:`normkit.functional.batch_norm`."""

from __future__ import annotations

import torch
from torch import Tensor

from .. import functional as F
from ._compat import BiasKwargMixin, init_with_bias

__all__ = ["BatchNorm1d", "BatchNorm2d", "BatchNorm3d"]


class _BatchNormMixin(BiasKwargMixin):
    """Constructor with ``bias``, and a forward that follows torch's (momentum, buffers, eval)."""

    def __init__(
        self,
        num_features: int,
        eps: float = 1e-5,
        momentum: float | None = 0.1,
        affine: bool = True,
        track_running_stats: bool = True,
        device=None,
        dtype=None,
        *,
        bias: bool = True,
    ) -> None:
        init_with_bias(
            self, super().__init__, bias, affine,
            num_features, eps, momentum, affine, track_running_stats, device, dtype,
        )

    def _step(self) -> tuple[Tensor | None, Tensor | None, bool, float]:
        """Advance ``num_batches_tracked`` as torch does, and give ``F.batch_norm``'s arguments.

        Returns ``(running_mean, running_var, use_batch_stats, momentum)``: the buffers are passed
        when they are updated (training and tracked) or used (eval); batch statistics are used in
        training, and in eval when there are no running ones.
        """
        # buffers read from the dict Module.__getattr__ would search (this runs on every call)
        buffers = self._buffers
        running_mean, running_var = buffers.get("running_mean"), buffers.get("running_var")
        momentum, training = self.momentum, self.training
        factor = 0.0 if momentum is None else momentum
        tracked = buffers.get("num_batches_tracked")
        if training and self.track_running_stats and tracked is not None:
            tracked.add_(1)
            # momentum=None: cumulative moving average over every batch seen so far
            factor = 1.0 / float(tracked) if momentum is None else momentum
        use_batch_stats = training or (running_mean is None and running_var is None)
        if training and not self.track_running_stats:  # buffers are passed when updated or used
            running_mean = running_var = None
        return running_mean, running_var, use_batch_stats, factor

    def forward(self, input: Tensor) -> Tensor:
        self._check_input_dim(input)
        running_mean, running_var, use_batch_stats, factor = self._step()
        return F.batch_norm(
            input, running_mean, running_var, self.weight, self.bias, use_batch_stats, factor, self.eps
        )


class BatchNorm1d(_BatchNormMixin, torch.nn.BatchNorm1d):
    r"""Drop-in :class:`torch.nn.BatchNorm1d` over (N, C) or (N, C, L) input, computed by normkit.

    .. math:: y = \frac{x - \mathrm{E}[x]}{\sqrt{\mathrm{Var}[x] + \epsilon}} \gamma + \beta

    Statistics per channel over the batch (and length); see :func:`normkit.reference.batch_norm`.

    Example::

        >>> bn = normkit.nn.BatchNorm1d(16)
        >>> bn(torch.randn(8, 16, 32)).shape
        torch.Size([8, 16, 32])
    """


class BatchNorm2d(_BatchNormMixin, torch.nn.BatchNorm2d):
    r"""Drop-in :class:`torch.nn.BatchNorm2d` over (N, C, H, W) input, computed by normkit.

    .. math:: y = \frac{x - \mathrm{E}[x]}{\sqrt{\mathrm{Var}[x] + \epsilon}} \gamma + \beta

    Statistics per channel over (N, H, W); see :func:`normkit.reference.batch_norm`.

    Example::

        >>> bn = normkit.nn.BatchNorm2d(3)
        >>> bn(torch.randn(8, 3, 32, 32)).shape
        torch.Size([8, 3, 32, 32])
    """


class BatchNorm3d(_BatchNormMixin, torch.nn.BatchNorm3d):
    r"""Drop-in :class:`torch.nn.BatchNorm3d` over (N, C, D, H, W) input, computed by normkit.

    .. math:: y = \frac{x - \mathrm{E}[x]}{\sqrt{\mathrm{Var}[x] + \epsilon}} \gamma + \beta

    Statistics per channel over (N, D, H, W); see :func:`normkit.reference.batch_norm`.
    """
