r"""Which elements share statistics: a picture and a summary of every norm.

All of normkit's norms compute ``y = (x - mean) / sqrt(var + eps) * weight + bias`` (RMSNorm:
``x / sqrt(mean(x²) + eps) * weight``); they differ in **which elements share one mean and variance**
and in the axis the affine parameters run along. This module draws the first of those as the
N x C x (H·W) cube of the GroupNorm paper's Figure 2 (Wu & He, 2018): a batch of N samples with C
channels and H·W spatial positions, with the elements of one statistic highlighted and the boundaries
between statistics drawn as thick lines.

* :data:`NORMS` the names; :func:`describe` a plain-text summary of one norm (paper, formula, axes,
  learnable parameters, running statistics, normkit's API);
* :func:`statistic_index` / :func:`shared_mask` the pure functions the pictures are drawn from: which
  statistic each element of an ``(n, c, hw)`` input uses, and the set one element shares with;
* :func:`draw` one picture (a matplotlib ``Figure``, or a PNG file), :func:`draw_overview` the five
  norms side by side, :func:`draw_all` every picture and the overview into a directory, and
  :func:`main_explain` the ``normkit explain`` command.

LayerNorm and RMSNorm are drawn with ``normalized_shape = (C, H, W)``, the convolutional setting of
the figure: one statistic per sample. In a transformer (input ``(B, T, D)``, ``normalized_shape =
(D,)``) the same rule gives one statistic per token.

matplotlib (the ``bench`` extra) is needed only to draw, and is imported when a picture is drawn; it
renders with the Agg backend, without pyplot and without a display.
"""

from __future__ import annotations

import math
import os
import re
import textwrap
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

if TYPE_CHECKING:
    from matplotlib.figure import Figure

__all__ = [
    "DPI",
    "FIVE",
    "NORMS",
    "describe",
    "draw",
    "draw_all",
    "draw_overview",
    "main_explain",
    "normalize_name",
    "rank_of_sample",
    "shared_mask",
    "statistic_index",
]


@dataclass(frozen=True)
class _Norm:
    """What :func:`describe` says and :func:`draw` draws for one norm."""

    name: str
    title: str
    #: which statistic an element uses: "channel", "sample", "sample_channel" or "sample_group"
    key: str
    paper: str
    year: int
    shares: str  # the one-line caption: what one statistic is shared by
    affine: str  # the second caption line: the affine parameters (and running statistics)
    formula: str
    axes: str
    learnable: str
    running: str
    api: tuple[str, ...]
    page: str
    #: the picture's subtitle ({groups} and {ranks} are filled in) and the overview's one-line caption
    cite: str = ""
    short: str = ""
    note: str = ""


_SPEC: dict[str, _Norm] = {
    spec.name: spec
    for spec in (
        _Norm(
            name="batch_norm",
            title="BatchNorm",
            key="channel",
            paper=(
                "Sergey Ioffe, Christian Szegedy. Batch Normalization: Accelerating Deep Network Training "
                "by Reducing Internal Covariate Shift. ICML 2015. arXiv:1502.03167"
            ),
            year=2015,
            shares="one mean and variance per channel, shared by all N × H·W elements of that channel",
            affine="γ, β: one per channel · eval uses the running statistics",
            formula="y = (x - mean[c]) / sqrt(var[c] + eps) * weight[c] + bias[c]",
            axes=(
                "statistics over N and the spatial axes (H, W): dims (0, 2, 3, ...) of (N, C, *); "
                "one (mean, biased variance) per channel"
            ),
            learnable="weight (γ) and bias (β) of shape (C,), initialised to 1 and 0 (affine=True; bias=False drops β)",
            running=(
                "running_mean, running_var (C,) and num_batches_tracked: in training "
                "running = (1 - momentum) * running + momentum * batch_stat with the unbiased batch "
                "variance (momentum=None: cumulative average); eval normalizes with them "
                "(track_running_stats=False: with the batch statistics)"
            ),
            api=(
                "normkit.nn.BatchNorm1d / BatchNorm2d / BatchNorm3d(num_features, eps=1e-5, momentum=0.1, "
                "affine=True, track_running_stats=True, *, bias=True)",
                "normkit.functional.batch_norm(input, running_mean, running_var, weight=None, bias=None, "
                "training=False, momentum=0.1, eps=1e-5)",
            ),
            page="docs/norms/batch-norm.md",
            cite="Ioffe & Szegedy, 2015",
            short="one mean and variance per channel, over N and H·W",
        ),
        _Norm(
            name="layer_norm",
            title="LayerNorm",
            key="sample",
            paper="Jimmy Lei Ba, Jamie Ryan Kiros, Geoffrey E. Hinton. Layer Normalization. 2016. arXiv:1607.06450",
            year=2016,
            shares="one mean and variance per sample, shared by all C × H·W elements of that sample",
            affine="γ, β: one per element of normalized_shape · no running statistics",
            formula="y = (x - mean) / sqrt(var + eps) * weight + bias, over the trailing normalized_shape dims",
            axes=(
                "statistics over the trailing len(normalized_shape) dims: (C, H, W) for normalized_shape "
                "= (C, H, W); (D,) of a (B, T, D) transformer input, one statistic per token. "
                "N is never mixed"
            ),
            learnable=(
                "weight (γ) and bias (β) of shape normalized_shape, initialised to 1 and 0 "
                "(elementwise_affine=True; bias=False drops β)"
            ),
            running="none: training and eval compute the same",
            api=(
                "normkit.nn.LayerNorm(normalized_shape, eps=1e-5, elementwise_affine=True, bias=True)",
                "normkit.functional.layer_norm(input, normalized_shape, weight=None, bias=None, eps=1e-5)",
            ),
            page="docs/norms/layer-norm.md",
            cite="Ba, Kiros & Hinton, 2016",
            short="one mean and variance per sample, over C and H·W",
        ),
        _Norm(
            name="instance_norm",
            title="InstanceNorm",
            key="sample_channel",
            paper=(
                "Dmitry Ulyanov, Andrea Vedaldi, Victor Lempitsky. Instance Normalization: The Missing "
                "Ingredient for Fast Stylization. 2016. arXiv:1607.08022"
            ),
            year=2016,
            shares="one mean and variance per (sample, channel), shared by the H·W elements of one channel map",
            affine="γ, β: one per channel, off by default (affine=False)",
            formula="y = (x - mean[n, c]) / sqrt(var[n, c] + eps) * weight[c] + bias[c]",
            axes=(
                "statistics over the spatial axes (H, W) only: dims (2, 3, ...) of (N, C, *); "
                "one (mean, biased variance) per (n, c)"
            ),
            learnable=(
                "none by default (affine=False); with affine=True weight (γ) and bias (β) of shape (C,), "
                "initialised to 1 and 0"
            ),
            running=(
                "none by default (track_running_stats=False); with it, training updates running_mean and "
                "running_var with the batch averages of the per-instance means and unbiased variances, "
                "and eval normalizes every instance with them"
            ),
            api=(
                "normkit.nn.InstanceNorm1d / InstanceNorm2d / InstanceNorm3d(num_features, eps=1e-5, "
                "momentum=0.1, affine=False, track_running_stats=False, *, bias=True)",
                "normkit.functional.instance_norm(input, running_mean=None, running_var=None, weight=None, "
                "bias=None, use_input_stats=True, momentum=0.1, eps=1e-5)",
            ),
            page="docs/norms/instance-norm.md",
            cite="Ulyanov, Vedaldi & Lempitsky, 2016",
            short="one mean and variance per (sample, channel), over H·W",
        ),
        _Norm(
            name="group_norm",
            title="GroupNorm",
            key="sample_group",
            paper="Yuxin Wu, Kaiming He. Group Normalization. ECCV 2018. arXiv:1803.08494",
            year=2018,
            shares="one mean and variance per (sample, group), shared by the C/G channels × H·W of a group",
            affine="γ, β: one per channel (not per group) · no running statistics",
            formula="y = (x - mean[n, g]) / sqrt(var[n, g] + eps) * weight[c] + bias[c],  g = c // (C/G)",
            axes=(
                "statistics over the C/G channels of a group and the spatial axes (H, W): view (N, C, *) "
                "as (N, G, C/G, *) and reduce dims (2, 3, ...); one (mean, biased variance) per (n, g). "
                "G = 1 is LayerNorm over (C, H, W) with per-channel affine; G = C is InstanceNorm"
            ),
            learnable="weight (γ) and bias (β) of shape (C,), initialised to 1 and 0 (affine=True; bias=False drops β)",
            running="none: training and eval compute the same",
            api=(
                "normkit.nn.GroupNorm(num_groups, num_channels, eps=1e-5, affine=True, *, bias=True)",
                "normkit.functional.group_norm(input, num_groups, weight=None, bias=None, eps=1e-5)",
            ),
            page="docs/norms/group-norm.md",
            cite="Wu & He, 2018 · G = {groups}",
            short="one mean and variance per (sample, group), over C/G and H·W",
        ),
        _Norm(
            name="rms_norm",
            title="RMSNorm",
            key="sample",
            paper=(
                "Biao Zhang, Rico Sennrich. Root Mean Square Layer Normalization. NeurIPS 2019. "
                "arXiv:1910.07467"
            ),
            year=2019,
            shares=(
                "one root mean square per sample, over LayerNorm's set: no mean is subtracted, only the "
                "scale is normalized"
            ),
            affine="γ: one per element of normalized_shape · no bias, no running statistics",
            formula="y = x / sqrt(mean(x²) + eps) * weight, over the trailing normalized_shape dims",
            axes=(
                "the root mean square over the trailing len(normalized_shape) dims: (C, H, W) for "
                "normalized_shape = (C, H, W); (D,) of a (B, T, D) transformer input, one per token. "
                "Nothing is subtracted"
            ),
            learnable="weight (γ) of shape normalized_shape, initialised to 1 (elementwise_affine=True); no bias",
            running="none: training and eval compute the same",
            api=(
                "normkit.nn.RMSNorm(normalized_shape, eps=None, elementwise_affine=True)",
                "normkit.functional.rms_norm(input, normalized_shape, weight=None, eps=None)",
            ),
            page="docs/norms/rms-norm.md",
            cite="Zhang & Sennrich, 2019",
            short="one root mean square per sample, over C and H·W; no mean",
            note=(
                "eps=None means torch.finfo(torch.float32).eps (1.19e-07) for float32, float16 and bfloat16 "
                "input, and torch.finfo(torch.float64).eps for float64 input"
            ),
        ),
        _Norm(
            name="sync_batch_norm",
            title="SyncBatchNorm",
            key="channel",
            paper=(
                "Chao Peng, Tete Xiao, Zeming Li, Yuning Jiang, Xiangyu Zhang, Kai Jia, Gang Yu, Jian Sun. "
                "MegDet: A Large Mini-Batch Object Detector (cross-GPU batch normalization). CVPR 2018. "
                "arXiv:1711.07240"
            ),
            year=2018,
            shares=(
                "BatchNorm's set over the global batch: one mean and variance per channel, "
                "spanning every rank's slice of N"
            ),
            affine="γ, β: one per channel · running statistics of the global batch",
            formula="y = (x - mean[c]) / sqrt(var[c] + eps) * weight[c] + bias[c], statistics of all ranks",
            axes=(
                "statistics over N of every rank and the spatial axes (H, W): each rank's per-channel "
                "(count, mean, M2) are all-gathered and combined; one (mean, biased variance) per channel"
            ),
            learnable="weight (γ) and bias (β) of shape (C,), initialised to 1 and 0 (affine=True; bias=False drops β)",
            running=(
                "as BatchNorm's, updated with the global batch's mean and unbiased variance; eval (or no "
                "process group) is plain BatchNorm, with no communication"
            ),
            api=(
                "normkit.nn.SyncBatchNorm(num_features, eps=1e-5, momentum=0.1, affine=True, "
                "track_running_stats=True, process_group=None, *, bias=True)",
                "normkit.nn.SyncBatchNorm.convert_sync_batchnorm(module, process_group=None)",
            ),
            page="docs/sync-batchnorm.md",
            cite="BatchNorm over {ranks} ranks",
            short="one mean and variance per channel, over every rank's N and H·W",
        ),
        _Norm(
            name="group_norm_silu",
            title="GroupNorm + SiLU",
            key="sample_group",
            paper=(
                "GroupNorm (Wu & He, ECCV 2018, arXiv:1803.08494) followed by SiLU (Elfwing, Uchibe & Doya, "
                "2018, arXiv:1702.03118), fused into one op"
            ),
            year=2018,
            shares="GroupNorm's set: one mean and variance per (sample, group); SiLU is element-wise",
            affine="γ, β: one per channel · then silu(z) = z · sigmoid(z)",
            formula="z = (x - mean[n, g]) / sqrt(var[n, g] + eps) * weight[c] + bias[c];  y = z * sigmoid(z)",
            axes="GroupNorm's: the C/G channels of a group and the spatial axes (H, W), per sample",
            learnable="GroupNorm's: weight (γ) and bias (β) of shape (C,)",
            running="none: training and eval compute the same",
            api=(
                "normkit.nn.GroupNormSiLU(num_groups, num_channels, eps=1e-5, affine=True, *, bias=True)",
                "normkit.functional.group_norm_silu(x, num_groups, weight=None, bias=None, eps=1e-5)",
            ),
            page="docs/fused.md",
            cite="fused · G = {groups}",
            short="GroupNorm's: one mean and variance per (sample, group)",
        ),
        _Norm(
            name="fused_add_rms_norm",
            title="Residual add + RMSNorm",
            key="sample",
            paper=(
                "RMSNorm (Zhang & Sennrich, NeurIPS 2019, arXiv:1910.07467) of h = x + residual, fused "
                "with the add"
            ),
            year=2019,
            shares=(
                "RMSNorm's set of h = x + residual: one root mean square per sample (per token in a "
                "transformer), no mean"
            ),
            affine="γ: one per element of normalized_shape · returns (y, h)",
            formula="h = x + residual;  y = h / sqrt(mean(h²) + eps) * weight;  returns (y, h)",
            axes="RMSNorm's: the trailing len(normalized_shape) dims of h",
            learnable="RMSNorm's: weight (γ) of shape normalized_shape; no bias",
            running="none: training and eval compute the same",
            api=(
                "normkit.nn.FusedAddRMSNorm(normalized_shape, eps=None, elementwise_affine=True)",
                "normkit.functional.fused_add_rms_norm(x, residual, normalized_shape, weight=None, eps=None)",
            ),
            page="docs/fused.md",
            cite="fused · RMSNorm of h = x + residual",
            short="one root mean square of h per sample; no mean",
        ),
        _Norm(
            name="fused_add_layer_norm",
            title="Residual add + LayerNorm",
            key="sample",
            paper=(
                "LayerNorm (Ba, Kiros & Hinton, 2016, arXiv:1607.06450) of h = x + residual, fused with the add"
            ),
            year=2016,
            shares=(
                "LayerNorm's set of h = x + residual: one mean and variance per sample (per token in a "
                "transformer)"
            ),
            affine="γ, β: one per element of normalized_shape · returns (y, h)",
            formula="h = x + residual;  y = (h - mean) / sqrt(var + eps) * weight + bias;  returns (y, h)",
            axes="LayerNorm's: the trailing len(normalized_shape) dims of h",
            learnable="LayerNorm's: weight (γ) and bias (β) of shape normalized_shape",
            running="none: training and eval compute the same",
            api=(
                "normkit.nn.FusedAddLayerNorm(normalized_shape, eps=1e-5, elementwise_affine=True, bias=True)",
                "normkit.functional.fused_add_layer_norm(x, residual, normalized_shape, weight=None, "
                "bias=None, eps=1e-5)",
            ),
            page="docs/fused.md",
            cite="fused · LayerNorm of h = x + residual",
            short="one mean and variance of h per sample",
        ),
    )
}

NORMS: tuple[str, ...] = tuple(_SPEC)
"""Every name :func:`describe` and :func:`draw` know: the five norms first, then ``sync_batch_norm``
and the fused ops (``group_norm_silu``, ``fused_add_rms_norm``, ``fused_add_layer_norm``)."""

FIVE: tuple[str, ...] = ("batch_norm", "layer_norm", "instance_norm", "group_norm", "rms_norm")
"""The five norms, drawn side by side by :func:`draw_overview`."""

#: the default picture: 4 samples, 6 channels in 3 groups, 5 spatial positions (H·W flattened)
_DEFAULT_SIZES = {"n": 4, "c": 6, "hw": 5, "groups": 3}


def _squash(name: str) -> str:
    return name.lower().replace("-", "").replace("_", "").replace(" ", "").replace("+", "")


_ALIASES = {_squash(name): name for name in NORMS}


def normalize_name(norm: str) -> str:
    """The canonical name of ``norm``: case, ``-`` and ``_`` are ignored, so ``"group-norm"``,
    ``"GroupNorm"`` and ``"group_norm"`` are all ``"group_norm"``.

    Raises:
        ValueError: for an unknown name, listing the known ones.
    """
    key = _squash(str(norm))
    if key not in _ALIASES:
        raise ValueError(f"unknown norm {norm!r}: choose from {', '.join(NORMS)}")
    return _ALIASES[key]


# --------------------------------------------------------------------------------------------------
# The sets: pure functions on an (n, c, hw) grid
# --------------------------------------------------------------------------------------------------


def _check_sizes(n: int, c: int, hw: int, groups: int) -> None:
    for label, value in (("n", n), ("c", c), ("hw", hw), ("groups", groups)):
        if int(value) != value or value < 1:
            raise ValueError(f"{label} must be a positive integer, got {value!r}")
    if c % groups != 0:
        raise ValueError(f"num_channels ({c}) must be divisible by num_groups ({groups})")


def statistic_index(
    norm: str, n: int = 4, c: int = 6, hw: int = 5, groups: int = 3
) -> torch.Tensor:
    """Which statistic each element of an ``(n, c, hw)`` input is normalized with.

    Returns an int64 tensor of shape ``(n, c, hw)``: elements with equal entries share one mean and
    variance (one root mean square for RMSNorm). The ids count the statistics in the order the norm
    stores them: channel ``c`` (BatchNorm, SyncBatchNorm), sample ``n`` (LayerNorm and RMSNorm with
    ``normalized_shape = (C, H, W)``), ``n * C + c`` (InstanceNorm), ``n * G + c // (C/G)`` (GroupNorm).
    """
    spec = _SPEC[normalize_name(norm)]
    _check_sizes(n, c, hw, groups)
    ni = torch.arange(n).view(n, 1, 1)
    ci = torch.arange(c).view(1, c, 1)
    if spec.key == "channel":
        ids = ci
    elif spec.key == "sample":
        ids = ni
    elif spec.key == "sample_channel":
        ids = ni * c + ci
    else:  # sample_group
        ids = ni * groups + ci // (c // groups)
    return ids.expand(n, c, hw).contiguous()


def shared_mask(
    norm: str,
    n: int = 4,
    c: int = 6,
    hw: int = 5,
    groups: int = 3,
    which: Sequence[int] = (0, 0, 0),
) -> torch.Tensor:
    """The elements that share their statistics with element ``which = (sample, channel, position)``.

    A bool tensor of shape ``(n, c, hw)``, True on the set S that is normalized together with
    ``which`` (``which`` included): the highlighted cells of :func:`draw`'s picture.
    """
    ids = statistic_index(norm, n, c, hw, groups)
    if len(which) != 3:
        raise ValueError(f"which must be (sample, channel, position), got {tuple(which)!r}")
    for label, i, size in zip(("sample", "channel", "position"), which, (n, c, hw), strict=True):
        if not 0 <= i < size:
            raise ValueError(f"which: {label} index {i} is out of range for size {size}")
    return ids == ids[tuple(which)]


def rank_of_sample(n: int, ranks: int) -> list[int]:
    """The rank that holds each of ``n`` samples when the global batch is split into ``ranks`` slices
    as evenly as possible (the first ``n % ranks`` ranks take one sample more)."""
    if not 1 <= ranks <= n:
        raise ValueError(f"ranks must be between 1 and n ({n}), got {ranks}")
    base, extra = divmod(n, ranks)
    out: list[int] = []
    for r in range(ranks):
        out += [r] * (base + (1 if r < extra else 0))
    return out


# --------------------------------------------------------------------------------------------------
# The summary
# --------------------------------------------------------------------------------------------------


def _fields(norm: str) -> list[tuple[str, str]]:
    spec = _SPEC[normalize_name(norm)]
    fields = [
        ("Paper", spec.paper),
        ("Computes", spec.formula),
        ("Shares", spec.shares),
        ("Axes", spec.axes),
        ("Learnable", spec.learnable),
        ("Running stats", spec.running),
    ]
    if spec.note:
        fields.append(("Note", spec.note))
    fields.append(("normkit", "\n".join(spec.api)))
    fields.append(("Docs", spec.page))
    return fields


def describe(norm: str) -> str:
    """A plain-text summary of ``norm``: its paper (authors, venue, year, arXiv id), what it computes,
    which elements share statistics and over which axes, its learnable parameters, its running
    statistics and normkit's class and function.

    Raises:
        ValueError: for an unknown name, listing the known ones.
    """
    spec = _SPEC[normalize_name(norm)]
    width = max(len(label) for label, _ in _fields(norm)) + 2
    lines = [f"{spec.title} ({spec.name})", ""]
    for label, text in _fields(norm):
        for k, para in enumerate(text.split("\n")):
            wrapped = textwrap.wrap(para, 100 - width) or [""]
            for j, line in enumerate(wrapped):
                head = label if (k == 0 and j == 0) else ""
                lines.append(f"{head:<{width}}{line}")
    return "\n".join(lines)


# --------------------------------------------------------------------------------------------------
# The picture
# --------------------------------------------------------------------------------------------------

# oblique projection of the sample axis: one sample moves a cell this far right and up
_DEPTH = 0.7
_ANGLE = math.radians(35)
_DX = _DEPTH * math.cos(_ANGLE)
_DY = _DEPTH * math.sin(_ANGLE)
_RANK_GAP = 0.9  # sync_batch_norm: the gap between two ranks' slices, in samples

_COLORS = {
    # (front, top, side) shading of a cell face: plain and highlighted
    "plain": ("#f4f5f7", "#fbfbfc", "#e3e6ea"),
    "shared": ("#3b78d8", "#6b9be6", "#2a5caf"),
    # RMSNorm's set: the same cells, another colour (a root mean square, no mean)
    "shared_rms": ("#e8890c", "#f2a94a", "#b86a06"),
    "edge": "#8a929c",
    "boundary": "#1d232b",
    "text": "#1d232b",
    "muted": "#4d5560",
}


def _project(x: float, y: float, z: float) -> tuple[float, float]:
    return x + z * _DX, y + z * _DY


def _cube(
    ax: Any,
    norm: str,
    n: int,
    c: int,
    hw: int,
    groups: int,
    which: Sequence[int],
    ranks: int,
    compact: bool,
) -> None:
    """Draw the cube of cells onto ``ax``: painter's order, back to front, bottom to top, left to right."""
    from matplotlib.collections import LineCollection, PolyCollection

    spec = _SPEC[normalize_name(norm)]
    ids = statistic_index(norm, n, c, hw, groups)
    mask = shared_mask(norm, n, c, hw, groups, which)
    sync = spec.name == "sync_batch_norm"
    hue = "shared_rms" if "rms" in spec.name else "shared"
    owner = rank_of_sample(n, ranks) if sync else [0] * n
    # depth position of each sample's front face: ranks' slices are apart by a gap
    z0 = [i + _RANK_GAP * owner[i] for i in range(n)]

    polys: list[list[tuple[float, float]]] = []
    faces: list[str] = []
    for i in sorted(range(n), key=lambda i: -z0[i]):
        for s in range(hw):  # s = 0 at the bottom
            for ch in range(c):
                x, y, z = ch, s, z0[i]
                shade = _COLORS[hue] if bool(mask[i, ch, s]) else _COLORS["plain"]
                polys.append([_project(x, y, z), _project(x + 1, y, z), _project(x + 1, y + 1, z),
                              _project(x, y + 1, z)])
                faces.append(shade[0])
                polys.append([_project(x, y + 1, z), _project(x + 1, y + 1, z), _project(x + 1, y + 1, z + 1),
                              _project(x, y + 1, z + 1)])
                faces.append(shade[1])
                polys.append([_project(x + 1, y, z), _project(x + 1, y, z + 1), _project(x + 1, y + 1, z + 1),
                              _project(x + 1, y + 1, z)])
                faces.append(shade[2])
    lw = 0.5 if compact else 0.6
    ax.add_collection(PolyCollection(polys, facecolors=faces, edgecolors=_COLORS["edge"], linewidths=lw))

    # thick lines between different statistics, on the faces that nothing covers: the front face of
    # the front slice, the top face and the right face of every slice
    segs: list[list[tuple[float, float]]] = []
    # front face of the first sample (z = 0): vertical boundaries between channels
    for ch in range(1, c):
        if bool(ids[0, ch - 1, 0] != ids[0, ch, 0]):
            segs.append([_project(ch, 0, z0[0]), _project(ch, hw, z0[0])])
    for i in range(n):
        last = i == n - 1 or owner[i + 1] != owner[i]
        first = i == 0 or owner[i - 1] != owner[i]
        # top face (y = hw) of sample i: boundaries between channels, and to the next sample
        for ch in range(1, c):
            if bool(ids[i, ch - 1, 0] != ids[i, ch, 0]):
                segs.append([_project(ch, hw, z0[i]), _project(ch, hw, z0[i] + 1)])
        if not last and bool((ids[i] != ids[i + 1]).any()):
            segs.append([_project(0, hw, z0[i] + 1), _project(c, hw, z0[i] + 1)])
            segs.append([_project(c, 0, z0[i] + 1), _project(c, hw, z0[i] + 1)])
        # outline of each slice (sync: each rank's block)
        if first:
            segs.append([_project(0, hw, z0[i]), _project(c, hw, z0[i]), _project(c, 0, z0[i])])
        if last:
            segs.append([_project(0, hw, z0[i] + 1), _project(c, hw, z0[i] + 1), _project(c, 0, z0[i] + 1)])
    segs.append([_project(0, 0, 0), _project(c, 0, 0), _project(c, hw, 0), _project(0, hw, 0), _project(0, 0, 0)])
    for i in range(n):
        if i == 0 or owner[i - 1] != owner[i]:
            j = max(k for k in range(n) if owner[k] == owner[i])
            segs.append([_project(0, hw, z0[i]), _project(0, hw, z0[j] + 1)])
            segs.append([_project(c, hw, z0[i]), _project(c, hw, z0[j] + 1)])
            segs.append([_project(c, 0, z0[i]), _project(c, 0, z0[j] + 1)])
    ax.add_collection(LineCollection(segs, colors=_COLORS["boundary"], linewidths=1.2 if compact else 1.5,
                                     capstyle="round", joinstyle="round"))

    # axis labels with arrows along three edges of the front slice
    fs = 12 if compact else 11
    arrow = {"arrowstyle": "-|>", "color": _COLORS["muted"], "lw": 1.0, "shrinkA": 0, "shrinkB": 0}
    ax.annotate("", xy=(c, -0.45), xytext=(0, -0.45), arrowprops=arrow)
    ax.text(c / 2, -0.65, "C  (channels)", ha="center", va="top", fontsize=fs, color=_COLORS["text"])
    ax.annotate("", xy=(-0.45, hw), xytext=(-0.45, 0), arrowprops=arrow)
    ax.text(-0.7, hw / 2, "H, W  (spatial)", ha="right", va="center", rotation=90, fontsize=fs,
            color=_COLORS["text"])
    zt = z0[-1] + 1
    start = _project(c + 0.3, -0.3, 0)
    end = _project(c + 0.3, -0.3, zt)
    ax.annotate("", xy=end, xytext=start, arrowprops=arrow)
    mid = _project(c + 0.55, -0.55, zt / 2)
    ax.text(mid[0], mid[1], "N  (batch)", ha="left", va="top", fontsize=fs, color=_COLORS["text"],
            rotation=math.degrees(_ANGLE), rotation_mode="anchor")
    if sync:
        for r in range(ranks):
            members = [k for k in range(n) if owner[k] == r]
            top = _project(0, hw + 0.15, (z0[members[0]] + z0[members[-1]] + 1) / 2)
            ax.text(top[0] - 0.15, top[1], f"rank {r}", ha="right", va="bottom", fontsize=fs - 1,
                    color=_COLORS["text"], style="italic")

    lo_x, hi_x = -1.6, c + zt * _DX + 2.2
    lo_y, hi_y = -1.5, hw + zt * _DY + 0.4
    ax.set_xlim(lo_x, hi_x)
    ax.set_ylim(lo_y, hi_y)
    ax.set_aspect("equal")
    ax.axis("off")


def _keep_parentheses(text: str) -> str:
    """No line break inside "(sample, group)": its spaces become no-break spaces."""
    return re.sub(r"\([^)]*\)", lambda m: m[0].replace(" ", "\u00a0"), text)


def _draw_into(fig: Figure, rect: Sequence[float], norm: str, sizes: dict[str, int], which: Sequence[int],
               ranks: int, compact: bool) -> None:
    """One picture in ``rect`` of ``fig``: title, citation, cube, and the caption below it (the
    overview's ``compact`` panels have the one-line caption only)."""
    spec = _SPEC[normalize_name(norm)]
    ax = fig.add_axes(rect)
    _cube(ax, norm, sizes["n"], sizes["c"], sizes["hw"], sizes["groups"], which, ranks, compact)
    left, bottom, width, height = rect
    cx = left + width / 2
    title = spec.title if spec.name != "rms_norm" else "RMSNorm: only the scale"
    cite = spec.cite.format(groups=sizes["groups"], ranks=ranks)
    fig.text(cx, bottom + height + (0.1 if compact else 0.085), title, ha="center", va="bottom",
             fontsize=17, weight="bold", color=_COLORS["text"])
    fig.text(cx, bottom + height + (0.09 if compact else 0.075), cite, ha="center", va="top",
             fontsize=12 if compact else 11, color=_COLORS["muted"])
    if compact:
        fig.text(cx, bottom - 0.02, textwrap.fill(_keep_parentheses(spec.short), 36), ha="center", va="top",
                 fontsize=13, color=_COLORS["text"], linespacing=1.3)
        return
    caption = textwrap.fill(_keep_parentheses(spec.shares), 64)
    fig.text(cx, bottom - 0.015, caption, ha="center", va="top", fontsize=11, color=_COLORS["text"],
             linespacing=1.3)
    lines = caption.count("\n") + 1
    fig.text(cx, bottom - 0.025 - lines * 0.045, textwrap.fill(spec.affine, 80), ha="center", va="top",
             fontsize=10, color=_COLORS["muted"], style="italic", linespacing=1.3)


def _new_figure(width: float, height: float) -> Figure:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height), dpi=100, facecolor="white")
    FigureCanvasAgg(fig)
    return fig


#: the resolution of the PNG files: 6.4 x 6.0 inches, 704 x 660 pixels for one norm
DPI = 110


def _save(fig: Figure, out: str | os.PathLike[str], dpi: float) -> Path:
    path = Path(out)
    path.parent.mkdir(parents=True, exist_ok=True)
    # no "Software" stamp: the committed pictures do not change when matplotlib does
    fig.savefig(path, dpi=dpi, facecolor="white", metadata={"Software": None})
    return path


def draw(
    norm: str,
    out: str | os.PathLike[str] | None = None,
    *,
    n: int = _DEFAULT_SIZES["n"],
    c: int = _DEFAULT_SIZES["c"],
    hw: int = _DEFAULT_SIZES["hw"],
    groups: int = _DEFAULT_SIZES["groups"],
    ranks: int = 2,
    which: Sequence[int] = (0, 0, 0),
    dpi: float = DPI,
) -> Figure | Path:
    """Draw which elements share statistics in ``norm``, on an ``n`` x ``c`` x ``hw`` cube.

    The set of element ``which = (sample, channel, position)`` (:func:`shared_mask`) is filled
    (blue; orange for RMSNorm, whose statistic is a root mean square); thick lines separate
    different statistics. ``groups`` is GroupNorm's G (it must divide ``c``); ``ranks`` splits N
    for ``sync_batch_norm``. The default element lies on the front face, so its whole set is visible.

    Returns the matplotlib ``Figure``, or, with ``out``, the path of the PNG written there (at
    ``dpi`` dots per inch).

    Raises:
        ValueError: an unknown name (listing the known ones), or sizes that do not fit.
    """
    name = normalize_name(norm)
    sizes = {"n": n, "c": c, "hw": hw, "groups": groups}
    _check_sizes(n, c, hw, groups)
    shared_mask(name, n, c, hw, groups, which)  # validate ``which`` before drawing
    if name == "sync_batch_norm":
        rank_of_sample(n, ranks)
    fig = _new_figure(6.4, 6.0)
    _draw_into(fig, (0.04, 0.2, 0.92, 0.62), name, sizes, which, ranks, compact=False)
    if out is None:
        return fig
    return _save(fig, out, dpi)


def draw_overview(
    out: str | os.PathLike[str] | None = None,
    norms: Sequence[str] = FIVE,
    *,
    n: int = _DEFAULT_SIZES["n"],
    c: int = _DEFAULT_SIZES["c"],
    hw: int = _DEFAULT_SIZES["hw"],
    groups: int = _DEFAULT_SIZES["groups"],
    dpi: float = DPI,
) -> Figure | Path:
    """The pictures of ``norms`` (the five norms by default) side by side on one figure, each with
    a one-line caption. Returns the ``Figure``, or, with ``out``, the path of the PNG written there."""
    names = [normalize_name(name) for name in norms]
    sizes = {"n": n, "c": c, "hw": hw, "groups": groups}
    _check_sizes(n, c, hw, groups)
    k = len(names)
    fig = _new_figure(3.6 * k, 4.6)
    for j, name in enumerate(names):
        _draw_into(fig, (j / k + 0.005, 0.22, 1 / k - 0.01, 0.58), name, sizes, (0, 0, 0), 2, compact=True)
    if out is None:
        return fig
    return _save(fig, out, dpi)


def draw_all(out_dir: str | os.PathLike[str], *, dpi: float = DPI) -> list[Path]:
    """Write ``<name>.png`` for every name in :data:`NORMS` and ``overview.png`` (the five norms side
    by side) into ``out_dir``, creating it. Returns the paths written."""
    out = Path(out_dir)
    paths = [draw(name, out / f"{name}.png", dpi=dpi) for name in NORMS]
    paths.append(draw_overview(out / "overview.png", dpi=dpi))
    return [Path(p) for p in paths]


# --------------------------------------------------------------------------------------------------
# normkit explain
# --------------------------------------------------------------------------------------------------


def main_explain(norm: str, out: str | None = None) -> int:
    """``normkit explain NORM [--out FILE]``: print :func:`describe` and, with ``out``, draw the picture.

    ``NORM`` may also be ``all``: a table of every norm, and with ``out`` (a directory) every picture
    (:func:`draw_all`). An ``out`` that is an existing directory receives ``<name>.png``. Returns the
    exit status: 0, or 2 for an unknown name (the message lists the known ones).
    """
    from rich.console import Console
    from rich.panel import Panel
    from rich.table import Table
    from rich.text import Text

    console = Console()
    err = Console(stderr=True)
    if _squash(norm) == "all":
        table = Table(title="normkit: which elements share statistics", show_lines=False)
        table.add_column("norm", style="bold")
        table.add_column("year")
        table.add_column("one statistic")
        for name in NORMS:
            spec = _SPEC[name]
            table.add_row(Text(name), Text(str(spec.year)), Text(spec.short))
        console.print(table)
        if out is not None:
            try:
                paths = draw_all(out)
            except ImportError:
                err.print("matplotlib is not installed: no pictures (pip install 'normkit[bench]')", markup=False)
                return 1
            console.print(f"wrote {len(paths)} pictures to {out}", markup=False, highlight=False)
        return 0
    try:
        name = normalize_name(norm)
    except ValueError as e:
        err.print(f"normkit explain: {e}", markup=False)
        return 2
    grid = Table.grid(padding=(0, 2))
    grid.add_column(style="bold", no_wrap=True)
    grid.add_column()
    for label, text in _fields(name):
        grid.add_row(Text(label), Text(text))  # Text: "[c]" in a formula is not markup
    console.print(Panel(grid, title=f"[bold]{_SPEC[name].title}[/bold] ({name})", expand=False))
    if out is not None:
        target = Path(out)
        if target.is_dir():
            target = target / f"{name}.png"
        try:
            path = draw(name, target)
        except ImportError:
            err.print("matplotlib is not installed: no picture (pip install 'normkit[bench]')", markup=False)
            return 1
        console.print(f"wrote {path}", markup=False, highlight=False)
    return 0
