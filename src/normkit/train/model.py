"""A compact CNN for the 8x8 digits whose normalization layer is chosen by name.

Every norm is one of :mod:`normkit.nn`'s drop-in modules, placed after each convolution:

========== ====================================== ==================================== ==============
name       module                                 statistics per                       running stats
========== ====================================== ==================================== ==============
batch      ``BatchNorm2d(C)``                     channel, over the worker's batch     yes
sync-batch ``SyncBatchNorm(C)``                   channel, over every worker's batch   yes
group      ``GroupNorm(4, C)``                    sample and group of C/4 channels     no
layer      ``GroupNorm(1, C)``                    sample, over (C, H, W)               no
instance   ``InstanceNorm2d(C, affine=True)``     sample and channel, over (H, W)      no
rms        ``RMSNorm(C)`` at each pixel           sample and pixel, over C (no mean)   no
none       ``Identity``                           --                                   --
========== ====================================== ==================================== ==============

Choices, and why:

* ``layer`` is LayerNorm as the GroupNorm paper (Wu & He, 2018) defines it for conv maps: one mean and
  variance per sample over all of (C, H, W), with a per-channel affine. That is ``GroupNorm(1, C)``;
  ``LayerNorm([C, H, W])`` would normalize the same elements but learn a weight per element, tying the
  model to one input size.
* ``rms`` normalizes each pixel's C-vector (a "token" of C features, as in transformers and ConvNeXt's
  channel LayerNorm), with a per-channel weight. RMSNorm has no mean and no bias, so the convolutions
  before it keep theirs.
* ``group`` uses 4 groups (4 and 8 channels per group here): the GroupNorm paper finds any choice from
  4 to 32 groups within about half a point of error on ImageNet.
* ``instance`` has learnable affine parameters and no running statistics (eval uses each sample's own).

The network: conv3x3(1→16) → norm → ReLU → conv3x3/2(16→32) → norm → ReLU → 2x2 average pool →
linear(128→10). The stride-2 convolution leaves 4x4 maps, so the second norm's statistics rest on only
16 pixels per image: with a few images per worker, batch statistics are noisy, which is what the
batch-size experiment (:mod:`normkit.train.experiment`) measures.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from .. import nn as nk

__all__ = ["GROUPS", "NORMS", "ChannelRMSNorm", "DigitsCNN", "build_model", "make_norm"]

#: the norm names accepted by :func:`build_model` (and ``normkit train --norm``)
NORMS = ("batch", "sync-batch", "group", "layer", "instance", "rms", "none")
#: groups of GroupNorm for ``norm="group"``
GROUPS = 4
#: norms without a shift of their own: the convolution before them keeps its bias
_NORMS_WITHOUT_BIAS = ("rms", "none")


class ChannelRMSNorm(nn.Module):
    """:class:`normkit.nn.RMSNorm` over the channels of each pixel of an ``(N, C, H, W)`` map.

    RMSNorm normalizes trailing dimensions; the channels are moved last and back (a view, no copy).
    The state_dict is that of the inner RMSNorm (``norm.weight``).
    """

    def __init__(self, num_channels: int, eps: float | None = None) -> None:
        super().__init__()
        self.norm = nk.RMSNorm(num_channels, eps=eps)

    def forward(self, x: Tensor) -> Tensor:
        return self.norm(x.movedim(1, -1)).movedim(-1, 1)


def make_norm(norm: str, num_channels: int) -> nn.Module:
    """The normalization module called ``norm`` (one of :data:`NORMS`) for ``num_channels`` channels."""
    if norm == "batch":
        return nk.BatchNorm2d(num_channels)
    if norm == "sync-batch":
        # Imported here so the other norms work with a normkit that predates SyncBatchNorm.
        from ..nn import SyncBatchNorm

        return SyncBatchNorm(num_channels)
    if norm == "group":
        return nk.GroupNorm(GROUPS, num_channels)
    if norm == "layer":
        return nk.GroupNorm(1, num_channels)
    if norm == "instance":
        return nk.InstanceNorm2d(num_channels, affine=True)
    if norm == "rms":
        return ChannelRMSNorm(num_channels)
    if norm == "none":
        return nn.Identity()
    raise ValueError(f"unknown norm {norm!r}; choose from {', '.join(NORMS)}")


class DigitsCNN(nn.Sequential):
    """Two 3x3 convolutions with a norm and ReLU after each, average pooling and a linear classifier."""

    def __init__(self, norm: str = "batch", channels: tuple[int, int] = (16, 32), num_classes: int = 10) -> None:
        c1, c2 = channels
        bias = norm in _NORMS_WITHOUT_BIAS  # a norm that subtracts the mean makes a conv bias redundant
        super().__init__(
            nn.Conv2d(1, c1, kernel_size=3, padding=1, bias=bias),
            make_norm(norm, c1),
            nn.ReLU(inplace=True),
            nn.Conv2d(c1, c2, kernel_size=3, stride=2, padding=1, bias=bias),
            make_norm(norm, c2),
            nn.ReLU(inplace=True),
            nn.AdaptiveAvgPool2d(2),
            nn.Flatten(),
            nn.Linear(c2 * 4, num_classes),
        )
        self.norm = norm


def build_model(norm: str, *, seed: int | None = None, channels: tuple[int, int] = (16, 32)) -> DigitsCNN:
    """A :class:`DigitsCNN` with ``norm``; with ``seed``, its initial weights are a function of the seed alone.

    The global RNG is left as it was (``torch.random.fork_rng``). Every worker builds the same model, and
    the norms that drop the convolution bias (all but ``rms`` and ``none``) start from the same weights.
    """
    if norm not in NORMS:
        raise ValueError(f"unknown norm {norm!r}; choose from {', '.join(NORMS)}")
    if seed is None:
        return DigitsCNN(norm, channels)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return DigitsCNN(norm, channels)
