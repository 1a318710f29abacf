r"""Reference implementation of the five normalization layers: the readable oracle.

Every norm computes the same thing,

.. math::

    \hat x = \frac{x - \mu_S}{\sqrt{\sigma^2_S + \epsilon}}, \qquad y = \gamma \odot \hat x + \beta

(RMSNorm drops the centring: :math:`\hat x = x / \sqrt{\overline{x^2}_S + \epsilon}`), and the norms differ
only in **the set S of elements that share one mean and variance** and **the axis the affine
parameters** :math:`\gamma, \beta` **run along**. For an input of shape ``(N, C, *spatial)``:

============  =============================  ================  ===============
norm          S (statistics over)            one statistic per  affine per
============  =============================  ================  ===============
BatchNorm     N and spatial                  channel            channel
LayerNorm     the trailing normalized_shape  row                element of it
RMSNorm       the trailing normalized_shape  row                element of it
InstanceNorm  spatial                        (n, c)             channel
GroupNorm     C/G channels and spatial       (n, group)         channel
============  =============================  ================  ===============

Each public ``<norm>`` function returns ``(y, mean, rstd)`` (RMSNorm: ``(y, rstd)``) and each
``<norm>_backward`` is the hand-derived gradient (``dx`` in the input's dtype, parameter gradients in
the accumulation dtype); both are checked against autograd in float64 by the
test suite. With :math:`g = \partial L / \partial \hat x = \gamma \odot \partial L / \partial y` and
:math:`n = |S|`, the input gradient of every centred norm is

.. math::

    \frac{\partial L}{\partial x} = \mathrm{rstd} \cdot \Big(g - \overline{g}_S
        - \hat x \, \overline{g \hat x}_S\Big)

and of RMSNorm the same without :math:`\overline{g}_S` (there is no mean to differentiate through).
BatchNorm in eval mode (fixed statistics) reduces to :math:`\partial L/\partial x = g \cdot \mathrm{rstd}`.
Parameter gradients are :math:`\partial L/\partial\gamma = \sum \partial L/\partial y \odot \hat x` and
:math:`\partial L/\partial\beta = \sum \partial L/\partial y`, summed over every axis the parameter does
not run along. ``docs/backward.md`` gives the derivation.

Numerics: statistics and arithmetic run in float64 whatever the input's dtype (float32 on Apple's MPS,
which has no float64), and outputs are rounded once, to the input's dtype. An oracle must be more exact
than what it checks: with float32 arithmetic the rounding of a large mean alone (1e4 + N(0, 1): half an
ulp of 1e4 is 5e-4) shifts every normalized value by more than torch's own error, and a float32 sum of
many products leaves parameter gradients of float16/bfloat16 layers a few ulps from the truth. Fast
backends accumulate in float32, as torch does; the test suite holds them to the float64 truth with a
per-dtype tolerance. The variance is computed in two passes (mean first, then the mean of squared
deviations), never as :math:`E[x^2] - E[x]^2`, which cancels catastrophically when |mean| >> std.
Running statistics are updated in place, without autograd.

Fused ops: :func:`group_norm_silu` is GroupNorm followed by SiLU with one rounding, and its backward
recomputes the GroupNorm output from x and the statistics instead of storing it. The fused residual
adds (``normkit.functional.fused_add_rms_norm``/``fused_add_layer_norm``) need no function here: they
are :func:`rms_norm`/:func:`layer_norm` of ``h = x + residual`` (rounded to x's dtype, as torch's add
rounds it), and the add's gradient is the identity with respect to both operands.

This module holds math only: argument checking, layouts and dispatch live in :mod:`normkit.functional`.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import Tensor

__all__ = [
    "LOW_PRECISION_DTYPES",
    "accumulation_dtype",
    "rms_norm_eps",
    "batch_norm",
    "batch_norm_backward",
    "layer_norm",
    "layer_norm_backward",
    "instance_norm",
    "instance_norm_backward",
    "group_norm",
    "group_norm_backward",
    "rms_norm",
    "rms_norm_backward",
    "group_norm_silu",
    "group_norm_silu_backward",
]


# --------------------------------------------------------------------------------------------------
# Shared pieces: accumulation precision, statistics, the normalize step and its gradient.
# --------------------------------------------------------------------------------------------------


#: the 16-bit float formats, which every norm accepts with float32 parameters
LOW_PRECISION_DTYPES = (torch.float16, torch.bfloat16)


def accumulation_dtype(x: Tensor) -> torch.dtype:
    """The precision the reference computes ``x`` in, whatever its dtype: float64 (float32 on MPS,
    which has no float64)."""
    return torch.float32 if x.device.type == "mps" else torch.float64


def rms_norm_eps(dtype: torch.dtype, eps: float | None) -> float:
    """RMSNorm's ``eps=None``: machine epsilon of float64 for float64 input, of float32 otherwise."""
    if eps is not None:
        return eps
    return torch.finfo(torch.float64 if dtype == torch.float64 else torch.float32).eps


def _moments(x: Tensor, dims: Sequence[int]) -> tuple[Tensor, Tensor]:
    """Mean and *biased* variance over ``dims`` (kept), two-pass: no E[x^2]-E[x]^2 cancellation."""
    mean = x.mean(dim=tuple(dims), keepdim=True)
    var = (x - mean).square().mean(dim=tuple(dims), keepdim=True)
    return mean, var


def _count(x: Tensor, dims: Sequence[int]) -> int:
    return math.prod([x.shape[d] for d in dims])


def _normalize_backward(g: Tensor, xhat: Tensor, rstd: Tensor, dims: Sequence[int], center: bool) -> Tensor:
    r"""dL/dx from g = dL/dxhat for xhat = (x - mean) * rstd (``center``) or x * rstd, stats over ``dims``.

    Differentiating xhat_i = (x_i - mu) * rstd with mu = mean(x), rstd = (var + eps)^(-1/2):
    d xhat_i / d x_j = rstd * (delta_ij - 1/n - xhat_i xhat_j / n), so
    dx = rstd * (g - mean(g) - xhat * mean(g * xhat)). Without centring the ``mean(g)`` term vanishes.
    """
    dims = tuple(dims)
    c2 = (g * xhat).mean(dim=dims, keepdim=True)
    inner = g - xhat * c2
    if center:
        c1 = g.mean(dim=dims, keepdim=True)
        inner = inner - c1
    return inner * rstd


def _sum_leading(t: Tensor, k: int) -> Tensor:
    """Sum over all but the trailing ``k`` dims (none to sum for 1-D input: ``sum(dim=())`` sums all)."""
    lead_dims = tuple(range(t.dim() - k))
    return t.sum(dim=lead_dims) if lead_dims else t


def _channel_view(p: Tensor | None, ndim: int, acc: torch.dtype) -> Tensor | None:
    """A per-channel vector (C,) viewed as (1, C, 1, ...) to broadcast against an (N, C, *) tensor."""
    if p is None:
        return None
    return p.to(acc).view([1, -1] + [1] * (ndim - 2))


def _affine(xhat: Tensor, weight: Tensor | None, bias: Tensor | None) -> Tensor:
    y = xhat
    if weight is not None:
        y = y * weight
    if bias is not None:
        y = y + bias
    return y


@torch.no_grad()
def _update_running(running: Tensor | None, batch_stat: Tensor, momentum: float) -> None:
    """running <- (1 - momentum) * running + momentum * batch_stat, in place and outside autograd."""
    if running is None:
        return
    updated = running.to(batch_stat.dtype) * (1.0 - momentum) + batch_stat.detach() * momentum
    running.copy_(updated)


# --------------------------------------------------------------------------------------------------
# LayerNorm
# --------------------------------------------------------------------------------------------------


def layer_norm(
    x: Tensor,
    normalized_shape: Sequence[int],
    weight: Tensor | None = None,
    bias: Tensor | None = None,
    eps: float = 1e-5,
) -> tuple[Tensor, Tensor, Tensor]:
    r"""Layer Normalization (Ba, Kiros & Hinton, 2016, arXiv:1607.06450).

    .. math::
        y = \frac{x - \mathrm{E}[x]}{\sqrt{\mathrm{Var}[x] + \epsilon}} \odot \gamma + \beta

    S = the trailing ``len(normalized_shape)`` dimensions of one row: every leading index (a token, a
    sample) gets its own mean and biased variance. ``weight``/``bias`` have ``normalized_shape`` and
    run element-wise along S.

    Returns ``(y, mean, rstd)``; ``mean`` and ``rstd`` have the leading shape ``x.shape[:-k]``.
    """
    acc = accumulation_dtype(x)
    dims = tuple(range(x.dim() - len(normalized_shape), x.dim()))
    xf = x.to(acc)
    mean, var = _moments(xf, dims)  # one (mean, var) per row
    rstd = torch.rsqrt(var + eps)
    xhat = (xf - mean) * rstd
    y = _affine(xhat, None if weight is None else weight.to(acc), None if bias is None else bias.to(acc))
    lead = x.shape[: x.dim() - len(normalized_shape)]
    return y.to(x.dtype), mean.reshape(lead), rstd.reshape(lead)


def layer_norm_backward(
    dy: Tensor,
    x: Tensor,
    normalized_shape: Sequence[int],
    weight: Tensor | None,
    mean: Tensor,
    rstd: Tensor,
) -> tuple[Tensor, Tensor | None, Tensor]:
    """Gradients ``(dx, dweight, dbias)`` of :func:`layer_norm` (``dweight`` is None without weight)."""
    acc = accumulation_dtype(x)
    k = len(normalized_shape)
    dims = tuple(range(x.dim() - k, x.dim()))
    stat_shape = list(x.shape[: x.dim() - k]) + [1] * k
    mean, rstd = mean.reshape(stat_shape), rstd.reshape(stat_shape)
    dyf = dy.to(acc)
    xhat = (x.to(acc) - mean) * rstd
    g = dyf if weight is None else dyf * weight.to(acc)
    dx = _normalize_backward(g, xhat, rstd, dims, center=True)
    dweight = None if weight is None else _sum_leading(dyf * xhat, k)
    dbias = _sum_leading(dyf, k)
    return dx.to(x.dtype), dweight, dbias


# --------------------------------------------------------------------------------------------------
# RMSNorm
# --------------------------------------------------------------------------------------------------


def rms_norm(
    x: Tensor,
    normalized_shape: Sequence[int],
    weight: Tensor | None = None,
    eps: float | None = None,
) -> tuple[Tensor, Tensor]:
    r"""Root Mean Square Layer Normalization (Zhang & Sennrich, NeurIPS 2019, arXiv:1910.07467).

    .. math::
        y = \frac{x}{\sqrt{\frac{1}{n}\sum_{i \in S} x_i^2 + \epsilon}} \odot \gamma

    S is LayerNorm's (the trailing ``normalized_shape`` dims of one row) but nothing is subtracted:
    RMSNorm keeps LayerNorm's re-scaling invariance and drops re-centring. There is no bias.
    ``eps=None`` means the machine epsilon of float32 (of float64 for float64 input).

    Returns ``(y, rstd)`` with ``rstd`` of the leading shape ``x.shape[:-k]``.
    """
    acc = accumulation_dtype(x)
    eps = rms_norm_eps(x.dtype, eps)
    dims = tuple(range(x.dim() - len(normalized_shape), x.dim()))
    xf = x.to(acc)
    rstd = torch.rsqrt(xf.square().mean(dim=dims, keepdim=True) + eps)  # 1 / RMS(x) per row
    y = _affine(xf * rstd, None if weight is None else weight.to(acc), None)
    lead = x.shape[: x.dim() - len(normalized_shape)]
    return y.to(x.dtype), rstd.reshape(lead)


def rms_norm_backward(
    dy: Tensor,
    x: Tensor,
    normalized_shape: Sequence[int],
    weight: Tensor | None,
    rstd: Tensor,
) -> tuple[Tensor, Tensor | None]:
    """Gradients ``(dx, dweight)`` of :func:`rms_norm`."""
    acc = accumulation_dtype(x)
    k = len(normalized_shape)
    dims = tuple(range(x.dim() - k, x.dim()))
    rstd = rstd.reshape(list(x.shape[: x.dim() - k]) + [1] * k)
    dyf = dy.to(acc)
    xhat = x.to(acc) * rstd
    g = dyf if weight is None else dyf * weight.to(acc)
    dx = _normalize_backward(g, xhat, rstd, dims, center=False)
    dweight = None if weight is None else _sum_leading(dyf * xhat, k)
    return dx.to(x.dtype), dweight


# --------------------------------------------------------------------------------------------------
# GroupNorm
# --------------------------------------------------------------------------------------------------


def _grouped(x: Tensor, num_groups: int) -> Tensor:
    """View (N, C, *spatial) as (N, G, C/G * prod(spatial)): one row per (sample, group)."""
    return x.reshape(x.shape[0], num_groups, x.shape[1] // num_groups * math.prod(x.shape[2:]))


def group_norm(
    x: Tensor,
    num_groups: int,
    weight: Tensor | None = None,
    bias: Tensor | None = None,
    eps: float = 1e-5,
) -> tuple[Tensor, Tensor, Tensor]:
    r"""Group Normalization (Wu & He, ECCV 2018, arXiv:1803.08494).

    .. math::
        y_{n,c,\ldots} = \frac{x_{n,c,\ldots} - \mu_{n,g}}{\sqrt{\sigma^2_{n,g} + \epsilon}}
            \gamma_c + \beta_c, \qquad g = \lfloor c / (C/G) \rfloor

    S = all C/G channels of one group **and** all their spatial positions, for one sample: the
    statistics of channel c are shared with the other channels of its group. (Reducing over the
    spatial dims only, as the origin notes did, gives every channel its own statistics: that is
    InstanceNorm, whatever G is.) G = 1 is LayerNorm over (C, *spatial) with per-channel affine;
    G = C is InstanceNorm. No running statistics; train and eval are the same.

    Returns ``(y, mean, rstd)``; ``mean`` and ``rstd`` have shape (N, G).
    """
    mean, rstd = _group_stats(x, num_groups, eps)
    y = _group_norm_affine(x, num_groups, weight, bias, mean, rstd)
    return y.to(x.dtype), mean.reshape(x.shape[0], num_groups), rstd.reshape(x.shape[0], num_groups)


def _group_stats(x: Tensor, num_groups: int, eps: float) -> tuple[Tensor, Tensor]:
    """Mean and rstd of each (sample, group), shaped (N, G, 1), in the accumulation dtype."""
    mean, var = _moments(_grouped(x.to(accumulation_dtype(x)), num_groups), (2,))
    return mean, torch.rsqrt(var + eps)


def _group_norm_affine(
    x: Tensor, num_groups: int, weight: Tensor | None, bias: Tensor | None, mean: Tensor, rstd: Tensor
) -> Tensor:
    """GroupNorm's output before rounding, ``z = xhat * weight + bias``, in the accumulation dtype,
    from the (N, G) statistics."""
    acc = accumulation_dtype(x)
    mean, rstd = mean.reshape(x.shape[0], num_groups, 1), rstd.reshape(x.shape[0], num_groups, 1)
    xhat = ((_grouped(x.to(acc), num_groups) - mean) * rstd).reshape(x.shape)
    return _affine(xhat, _channel_view(weight, x.dim(), acc), _channel_view(bias, x.dim(), acc))


def _channel_sum(t: Tensor) -> Tensor:
    """Sum an (N, C, *) tensor over every axis but the channel axis."""
    return t.sum(dim=[d for d in range(t.dim()) if d != 1])


def group_norm_backward(
    dy: Tensor,
    x: Tensor,
    num_groups: int,
    weight: Tensor | None,
    mean: Tensor,
    rstd: Tensor,
) -> tuple[Tensor, Tensor | None, Tensor]:
    """Gradients ``(dx, dweight, dbias)`` of :func:`group_norm`."""
    acc = accumulation_dtype(x)
    dyf = dy.to(acc)
    mean, rstd = mean.reshape(x.shape[0], num_groups, 1), rstd.reshape(x.shape[0], num_groups, 1)
    xhat_g = (_grouped(x.to(acc), num_groups) - mean) * rstd
    xhat = xhat_g.reshape(x.shape)
    w = _channel_view(weight, x.dim(), acc)
    g = dyf if w is None else dyf * w
    dx = _normalize_backward(_grouped(g, num_groups), xhat_g, rstd, (2,), center=True)
    dweight = None if weight is None else _channel_sum(dyf * xhat)
    return dx.reshape(x.shape).to(x.dtype), dweight, _channel_sum(dyf)


# --------------------------------------------------------------------------------------------------
# GroupNorm + SiLU
# --------------------------------------------------------------------------------------------------


def group_norm_silu(
    x: Tensor,
    num_groups: int,
    weight: Tensor | None = None,
    bias: Tensor | None = None,
    eps: float = 1e-5,
) -> tuple[Tensor, Tensor, Tensor]:
    r"""GroupNorm followed by SiLU (Elfwing, Uchibe & Doya, 2018, arXiv:1702.03118), rounded once.

    .. math::
        z = \mathrm{GroupNorm}(x) = \hat x \, \gamma_c + \beta_c, \qquad
        y = \mathrm{silu}(z) = z \, s(z), \qquad s(z) = \frac{1}{1 + e^{-z}}

    :func:`group_norm`'s statistics and affine step in the accumulation dtype, then SiLU on the
    unrounded ``z``, then one rounding to x's dtype (the two-op composition rounds ``z`` to x's
    dtype first). Returns ``(y, mean, rstd)`` with (N, G) statistics, as :func:`group_norm` does:
    they and x are all that :func:`group_norm_silu_backward` needs.
    """
    mean, rstd = _group_stats(x, num_groups, eps)
    z = _group_norm_affine(x, num_groups, weight, bias, mean, rstd)
    y = z * torch.sigmoid(z)
    return y.to(x.dtype), mean.reshape(x.shape[0], num_groups), rstd.reshape(x.shape[0], num_groups)


def group_norm_silu_backward(
    dy: Tensor,
    x: Tensor,
    num_groups: int,
    weight: Tensor | None,
    bias: Tensor | None,
    mean: Tensor,
    rstd: Tensor,
) -> tuple[Tensor, Tensor | None, Tensor]:
    r"""Gradients ``(dx, dweight, dbias)`` of :func:`group_norm_silu`, recomputing ``z`` from x.

    By the chain rule the gradient at GroupNorm's output is :math:`\partial L/\partial z =
    \partial L/\partial y \cdot \mathrm{silu}'(z)`, and from there it is :func:`group_norm_backward`.
    With :math:`s = s(z)` and :math:`s'(z) = e^{-z}/(1 + e^{-z})^2 = s\,(1 - s)`,

    .. math::
        \mathrm{silu}'(z) = \frac{d}{dz}\big(z\,s(z)\big) = s + z\,s\,(1 - s)
            = s\,\big(1 + z\,(1 - s)\big).

    ``z`` is not saved by the forward: it is recomputed here from x, the (N, G) statistics,
    ``weight`` and ``bias`` (which is why the bias, unused by GroupNorm's own backward, is an
    argument). Storing it would cost one more tensor of x's size per layer.
    """
    acc = accumulation_dtype(x)
    z = _group_norm_affine(x, num_groups, weight, bias, mean, rstd)
    s = torch.sigmoid(z)
    dz = dy.to(acc) * s * (1 + z * (1 - s))
    return group_norm_backward(dz, x, num_groups, weight, mean, rstd)


# --------------------------------------------------------------------------------------------------
# BatchNorm
# --------------------------------------------------------------------------------------------------


def batch_norm(
    x: Tensor,
    running_mean: Tensor | None,
    running_var: Tensor | None,
    weight: Tensor | None = None,
    bias: Tensor | None = None,
    training: bool = False,
    momentum: float = 0.1,
    eps: float = 1e-5,
) -> tuple[Tensor, Tensor, Tensor]:
    r"""Batch Normalization (Ioffe & Szegedy, ICML 2015, arXiv:1502.03167).

    .. math::
        y_{n,c,\ldots} = \frac{x_{n,c,\ldots} - \mu_c}{\sqrt{\sigma^2_c + \epsilon}} \gamma_c + \beta_c

    S = every sample and every spatial position of one channel: one (mean, variance) per channel.

    * ``training=True``: normalize with the batch's mean and **biased** variance; if running
      statistics are given, update them in place as ``running = (1 - momentum) * running +
      momentum * batch_stat`` with the **unbiased** variance (n / (n - 1) times the biased one).
      An empty batch leaves them untouched.
    * ``training=False``: normalize with ``running_mean``/``running_var`` (fixed statistics).

    Returns ``(y, mean, rstd)``, each statistic of shape (C,).
    """
    acc = accumulation_dtype(x)
    dims = [0] + list(range(2, x.dim()))
    xf = x.to(acc)
    if training:
        mean, var = _moments(xf, dims)
        mean, var = mean.flatten(), var.flatten()
        n = _count(x, dims)
        if n > 0:
            _update_running(running_mean, mean, momentum)
            _update_running(running_var, var * (n / max(n - 1, 1)), momentum)
    else:
        # copies: a later training step updates the buffers in place, and backward needs these values
        mean, var = running_mean.to(acc, copy=True), running_var.to(acc, copy=True)
    rstd = torch.rsqrt(var + eps)
    xhat = (xf - _channel_view(mean, x.dim(), acc)) * _channel_view(rstd, x.dim(), acc)
    y = _affine(xhat, _channel_view(weight, x.dim(), acc), _channel_view(bias, x.dim(), acc))
    return y.to(x.dtype), mean, rstd


def batch_norm_backward(
    dy: Tensor,
    x: Tensor,
    weight: Tensor | None,
    mean: Tensor,
    rstd: Tensor,
    training: bool,
) -> tuple[Tensor, Tensor | None, Tensor]:
    """Gradients ``(dx, dweight, dbias)`` of :func:`batch_norm`.

    In training the statistics depend on x (the full normalize gradient); in eval they are
    constants and dx is just ``dy * weight * rstd``.
    """
    acc = accumulation_dtype(x)
    dims = [0] + list(range(2, x.dim()))
    dyf = dy.to(acc)
    mean_v, rstd_v = _channel_view(mean, x.dim(), acc), _channel_view(rstd, x.dim(), acc)
    xhat = (x.to(acc) - mean_v) * rstd_v
    w = _channel_view(weight, x.dim(), acc)
    g = dyf if w is None else dyf * w
    dx = _normalize_backward(g, xhat, rstd_v, dims, center=True) if training else g * rstd_v
    dweight = None if weight is None else _channel_sum(dyf * xhat)
    return dx.to(x.dtype), dweight, _channel_sum(dyf)


# --------------------------------------------------------------------------------------------------
# InstanceNorm
# --------------------------------------------------------------------------------------------------


def instance_norm(
    x: Tensor,
    running_mean: Tensor | None = None,
    running_var: Tensor | None = None,
    weight: Tensor | None = None,
    bias: Tensor | None = None,
    use_input_stats: bool = True,
    momentum: float = 0.1,
    eps: float = 1e-5,
) -> tuple[Tensor, Tensor, Tensor]:
    r"""Instance Normalization (Ulyanov, Vedaldi & Lempitsky, 2016, arXiv:1607.08022).

    .. math::
        y_{n,c,\ldots} = \frac{x_{n,c,\ldots} - \mu_{n,c}}{\sqrt{\sigma^2_{n,c} + \epsilon}}
            \gamma_c + \beta_c

    S = the spatial positions of one channel of one sample: one (mean, variance) per (n, c). It is
    GroupNorm with G = C, and BatchNorm applied to each sample on its own.

    * ``use_input_stats=True``: normalize with each instance's statistics; if running statistics
      are given, update them in place with the batch average of the per-instance means and of the
      per-instance **unbiased** variances.
    * ``use_input_stats=False``: normalize every instance with ``running_mean``/``running_var``.

    Returns ``(y, mean, rstd)``: shape (N, C) with input statistics, (C,) with running ones.
    """
    if not use_input_stats:
        return batch_norm(x, running_mean, running_var, weight, bias, False, momentum, eps)
    acc = accumulation_dtype(x)
    dims = tuple(range(2, x.dim()))
    xf = x.to(acc)
    mean, var = _moments(xf, dims)  # one (mean, var) per (sample, channel)
    n = _count(x, dims)
    if x.shape[0] > 0 and n > 0:
        _update_running(running_mean, mean.mean(dim=0).flatten(), momentum)
        _update_running(running_var, (var * (n / max(n - 1, 1))).mean(dim=0).flatten(), momentum)
    rstd = torch.rsqrt(var + eps)
    xhat = (xf - mean) * rstd
    y = _affine(xhat, _channel_view(weight, x.dim(), acc), _channel_view(bias, x.dim(), acc))
    return y.to(x.dtype), mean.reshape(x.shape[:2]), rstd.reshape(x.shape[:2])


def instance_norm_backward(
    dy: Tensor,
    x: Tensor,
    weight: Tensor | None,
    mean: Tensor,
    rstd: Tensor,
    use_input_stats: bool,
) -> tuple[Tensor, Tensor | None, Tensor]:
    """Gradients ``(dx, dweight, dbias)`` of :func:`instance_norm`."""
    if not use_input_stats:
        return batch_norm_backward(dy, x, weight, mean, rstd, training=False)
    acc = accumulation_dtype(x)
    dims = tuple(range(2, x.dim()))
    dyf = dy.to(acc)
    stat_shape = list(x.shape[:2]) + [1] * len(dims)
    mean, rstd = mean.reshape(stat_shape), rstd.reshape(stat_shape)
    xhat = (x.to(acc) - mean) * rstd
    w = _channel_view(weight, x.dim(), acc)
    g = dyf if w is None else dyf * w
    dx = _normalize_backward(g, xhat, rstd, dims, center=True)
    dweight = None if weight is None else _channel_sum(dyf * xhat)
    return dx.to(x.dtype), dweight, _channel_sum(dyf)
