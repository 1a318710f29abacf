"""SyncBatchNorm: torch.nn.SyncBatchNorm's interface, over any torch.distributed backend (gloo on CPU too)."""

from __future__ import annotations

import functools
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor
from torch.nn.modules.batchnorm import _BatchNorm

from .. import functional as F
from ..distributed import sync_batch_norm
from ._compat import init_with_bias
from .batchnorm import _BatchNormMixin

__all__ = ["SyncBatchNorm"]


class SyncBatchNorm(_BatchNormMixin, _BatchNorm):
    r"""Batch Normalization with statistics over every process's batch, on any device and backend.

    .. math:: y = \frac{x - \mathrm{E}[x]}{\sqrt{\mathrm{Var}[x] + \epsilon}} \gamma + \beta

    In training, inside an initialized :mod:`torch.distributed` process group of two or more ranks,
    the mean and (biased) variance per channel are those of the concatenation of every rank's batch,
    so each rank's output, input gradient and running statistics equal those of BatchNorm on the
    global batch; see :mod:`normkit.distributed` for the math (Chan's combination of per-rank
    ``(count, mean, M2)``, one ``all_gather`` forward, one ``all_reduce`` backward). Per-rank batch
    sizes may differ and a rank's batch may be empty. Weight and bias gradients are the rank's own
    share; DDP all-reduces them. In eval, outside a process group, or with one rank it is BatchNorm.

    Same constructor, parameters, buffers, state_dict and ``convert_sync_batchnorm`` as
    :class:`torch.nn.SyncBatchNorm`, but it is *not* a subclass of it: DDP refuses every
    ``torch.nn.SyncBatchNorm`` in a CPU module, and this one runs over gloo on CPU as well as NCCL on
    GPU. It is a subclass of torch's ``_BatchNorm``, so code that looks for batch norms finds it.

    Args:
        num_features: :math:`C` of an input of shape :math:`(N, C, *)`.
        eps: added to the variance. Default: ``1e-5``.
        momentum: running statistics' update factor, or ``None`` for a cumulative average. Default: 0.1.
        affine: learnable ``weight`` and ``bias``. Default: ``True``.
        track_running_stats: keep ``running_mean``/``running_var`` for eval. Default: ``True``.
        process_group: the group whose batches are combined. Default: the whole world.
        bias: with ``affine``, whether to learn a bias. Default: ``True``.

    Shape:
        - Input: :math:`(N, C, *)`, at least 2-D (N may be 0 on some ranks).
        - Output: same shape as the input.

    Example::

        >>> # in each of the processes of an initialized group (e.g. under torchrun, backend gloo)
        >>> model = normkit.nn.SyncBatchNorm.convert_sync_batchnorm(model)
        >>> model = torch.nn.parallel.DistributedDataParallel(model)
    """

    def __init__(
        self,
        num_features: int,
        eps: float = 1e-5,
        momentum: float | None = 0.1,
        affine: bool = True,
        track_running_stats: bool = True,
        process_group: Any | None = None,
        device=None,
        dtype=None,
        *,
        bias: bool = True,
    ) -> None:
        init_with_bias(
            self, functools.partial(_BatchNorm.__init__, self), bias, affine,
            num_features, eps, momentum, affine, track_running_stats, device, dtype,
        )
        self.process_group = process_group

    def _check_input_dim(self, input: Tensor) -> None:
        if input.dim() < 2:
            raise ValueError(f"expected at least 2D input (got {input.dim()}D input)")

    def _check_non_zero_input_channels(self, input: Tensor) -> None:
        if input.size(1) == 0:
            raise ValueError("SyncBatchNorm number of input channels should be non-zero")

    def _sync_group(self) -> Any | None:
        """The process group to synchronize over, or None when BatchNorm alone gives the same result."""
        if not (dist.is_available() and dist.is_initialized()):
            return None
        group = self.process_group if self.process_group is not None else dist.group.WORLD
        return group if dist.get_world_size(group) > 1 else None

    def forward(self, input: Tensor) -> Tensor:
        self._check_input_dim(input)
        self._check_non_zero_input_channels(input)
        running_mean, running_var, use_batch_stats, factor = self._step()
        group = self._sync_group() if self.training and use_batch_stats else None
        if group is None:
            return F.batch_norm(
                input, running_mean, running_var, self.weight, self.bias, use_batch_stats, factor, self.eps
            )
        return sync_batch_norm(input, running_mean, running_var, self.weight, self.bias, factor, self.eps, group)

    @classmethod
    def convert_sync_batchnorm(cls, module: torch.nn.Module, process_group: Any | None = None) -> torch.nn.Module:
        """Replace every BatchNorm*D in ``module`` (recursively) by a :class:`SyncBatchNorm`.

        As :meth:`torch.nn.SyncBatchNorm.convert_sync_batchnorm`: the new layers share the old ones'
        parameters and buffers (state_dict keys and values are unchanged), keep ``eps``, ``momentum``,
        ``affine``, ``bias``, ``track_running_stats`` and the training mode; InstanceNorm is left
        alone. Returns the module, or the new layer when ``module`` itself is a batch norm.

        Args:
            module: a model containing ``torch.nn.BatchNorm1d/2d/3d`` (or normkit's) layers.
            process_group: the group to synchronize over. Default: the whole world.

        Example::

            >>> net = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3), torch.nn.BatchNorm2d(8))
            >>> net = normkit.nn.SyncBatchNorm.convert_sync_batchnorm(net)
            >>> type(net[1]).__name__
            'SyncBatchNorm'
        """
        converted = module
        if isinstance(module, _BatchNorm):
            converted = cls(
                module.num_features,
                module.eps,
                module.momentum,
                module.affine,
                module.track_running_stats,
                process_group,
                bias=module.bias is not None,
            )
            if module.affine:
                with torch.no_grad():
                    converted.weight = module.weight
                    converted.bias = module.bias
            converted.running_mean = module.running_mean
            converted.running_var = module.running_var
            converted.num_batches_tracked = module.num_batches_tracked
            converted.training = module.training
            if hasattr(module, "qconfig"):
                converted.qconfig = module.qconfig
        for name, child in module.named_children():
            converted.add_module(name, cls.convert_sync_batchnorm(child, process_group))
        return converted
