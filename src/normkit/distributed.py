r"""Batch Normalization over a batch split across processes: the math and collectives of SyncBatchNorm.

Each process (rank) holds a slice of the global batch. BatchNorm on the concatenated batch needs, per
channel, the global mean and biased variance in the forward, and two global sums in the backward:

* **forward** — every rank computes its slice's ``(count, mean, M2)`` per channel (``M2`` = sum of
  squared deviations from the slice's own mean), and one ``all_gather`` gives every rank all of them.
  They are combined with Chan et al.'s pairwise formula,

  .. math::
      n = \sum_r n_r,\quad \mu = \frac{1}{n}\sum_r n_r \mu_r,\quad
      M_2 = \sum_r M_{2,r} + \sum_r n_r (\mu_r - \mu)^2,\quad \sigma^2 = M_2 / n,

  in float64, which never subtracts two large sums of squares (the ``E[x^2] - E[x]^2`` cancellation).
  Counts may differ between ranks, and a rank with an empty slice joins with ``n_r = 0``. Gathering
  rather than summing keeps each rank's mean beside its count; every rank then combines the same
  numbers in the same order, so the running statistics are identical everywhere.
* **backward** — with :math:`g = \partial L / \partial y`, one ``all_reduce`` sums
  :math:`\sum g` and :math:`\sum g\,(x - \mu)` per channel over ranks; then locally

  .. math::
      \frac{\partial L}{\partial x} = \gamma\,\hat\sigma^{-1}\Big(g - \frac{\sum g}{n}
      - (x - \mu)\,\hat\sigma^{-2}\,\frac{\sum g\,(x - \mu)}{n}\Big),
      \qquad \hat\sigma = \sqrt{\sigma^2 + \epsilon}.

  The weight and bias gradients stay per rank (:math:`\sum g\,\hat x` and :math:`\sum g` over the local
  slice): their sum over ranks is BatchNorm's gradient on the global batch, and data-parallel training
  (DDP) all-reduces them anyway.

This works over any :mod:`torch.distributed` backend: gloo on CPU, NCCL on GPU, and others.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor
from torch.autograd.function import once_differentiable

from . import _checks
from .functional import _laid_out, _suggested_format

__all__ = ["combine_moments", "local_moments", "sync_batch_norm"]


def _stats_dtype(device: torch.device) -> torch.dtype:
    """float64 for statistics and collectives (MPS has none: float32 there)."""
    return torch.float32 if device.type == "mps" else torch.float64


def _compute_dtype(x: Tensor) -> torch.dtype:
    """Elementwise work in float32 for float16/bfloat16/float32 input, float64 for float64 input."""
    return torch.float64 if x.dtype == torch.float64 else torch.float32


def _reduce_dims(x: Tensor) -> tuple[int, ...]:
    return (0, *range(2, x.dim()))


def _channel_view(t: Tensor, ndim: int) -> Tensor:
    return t.view(1, -1, *([1] * (ndim - 2)))


def _shifted(x: Tensor) -> tuple[Tensor, Tensor]:
    """``(d, shift)`` with ``d = x - shift`` in the compute dtype and ``shift`` the per-channel float32
    (float64) mean of ``x``, rounded. Statistics and the normalization work on ``d``: its values are
    small where the data are, so a mean that dwarfs the spread costs no precision, and ``mean(d)``
    is a small correction that float64 adds back to ``shift`` exactly."""
    dims = _reduce_dims(x)
    acc = _compute_dtype(x)
    shift = x.mean(dim=dims, keepdim=True, dtype=acc)
    return torch.sub(x, shift), shift.flatten()


def _moments_of_shifted(d: Tensor, shift: Tensor, stats_dtype: torch.dtype) -> Tensor:
    channels = d.size(1)
    count = d.numel() // channels
    dims = _reduce_dims(d)
    # reductions in the compute dtype (torch's are cascaded sums: accurate; float64 ones are 5x slower)
    mean_d = d.mean(dim=dims).to(stats_dtype)
    stats = torch.empty(2 * channels + 1, dtype=stats_dtype, device=d.device)
    stats[0] = count
    stats[1 : channels + 1] = shift.to(stats_dtype) + mean_d
    # M2 = sum((d - mean(d))^2) = sum(d^2) - n mean(d)^2; mean(d) is rounding-sized, so no cancellation
    stats[channels + 1 :] = d.square().sum(dim=dims).to(stats_dtype) - count * mean_d.square()
    return stats


def local_moments(x: Tensor) -> Tensor:
    """This rank's per-channel ``[count, mean_0..mean_{C-1}, M2_0..M2_{C-1}]`` of ``x`` (N, C, *).

    One flat tensor (2C + 1 values, float64) so that one collective moves it. The data are first
    shifted by their rounded mean, so that a mean far larger than the spread survives in full: the
    mean is the shift plus the (small, accurately computed) mean of the shifted data. An empty slice
    gives all zeros.
    """
    channels = x.size(1)
    if x.numel() == 0:
        return torch.zeros(2 * channels + 1, dtype=_stats_dtype(x.device), device=x.device)
    d, shift = _shifted(x)
    return _moments_of_shifted(d, shift, _stats_dtype(x.device))


def combine_moments(gathered: Tensor) -> tuple[float, Tensor, Tensor]:
    """Combine per-rank ``local_moments`` rows (world_size, 2C + 1) into the global ``(n, mean, M2)``.

    Chan, Golub & LeVeque's pairwise update applied to all ranks at once: the global mean is the
    count-weighted mean of the rank means, and ``M2`` adds each rank's spread about its own mean to
    the spread of the rank means about the global one. Ranks with count 0 contribute nothing. With
    ``n == 0`` the mean and ``M2`` are zeros.
    """
    channels = (gathered.size(1) - 1) // 2
    counts = gathered[:, :1]
    means = gathered[:, 1 : channels + 1]
    m2s = gathered[:, channels + 1 :]
    n = float(counts.sum())
    if n == 0:
        return 0.0, torch.zeros_like(means[0]), torch.zeros_like(m2s[0])
    mean = (counts * means).sum(0) / n
    m2 = m2s.sum(0) + (counts * (means - mean).square()).sum(0)
    return n, mean, m2


def _all_gather(stats: Tensor, group: Any, world_size: int) -> Tensor:
    """(world_size, len(stats)) on every rank, in rank order, in one collective."""
    if dist.get_backend(group) == "nccl":
        out = torch.empty(world_size * stats.numel(), dtype=stats.dtype, device=stats.device)
        dist.all_gather_into_tensor(out, stats, group=group)
        return out.view(world_size, -1)
    # gloo (and mpi, ucc, ...): the list form is the one every backend implements
    parts = [torch.empty_like(stats) for _ in range(world_size)]
    dist.all_gather(parts, stats, group=group)
    return torch.stack(parts)


def _update_running(running: Tensor | None, stat: Tensor, momentum: float) -> None:
    if running is None:
        return
    running.copy_(running.to(stat.dtype) * (1.0 - momentum) + stat * momentum)


class _SyncBatchNorm(torch.autograd.Function):
    """Training-mode BatchNorm over the union of every rank's batch: one collective each way."""

    @staticmethod
    def forward(
        ctx: Any,
        x: Tensor,
        weight: Tensor | None,
        bias: Tensor | None,
        running_mean: Tensor | None,
        running_var: Tensor | None,
        momentum: float,
        eps: float,
        group: Any,
        world_size: int,
    ) -> Tensor:
        stats_dtype = _stats_dtype(x.device)
        if x.numel() > 0:
            d, shift = _shifted(x)
            local = _moments_of_shifted(d, shift, stats_dtype)
        else:
            d, shift = None, torch.zeros(x.size(1), dtype=_compute_dtype(x), device=x.device)
            local = torch.zeros(2 * x.size(1) + 1, dtype=stats_dtype, device=x.device)
        n, mean, m2 = combine_moments(_all_gather(local, group, world_size))
        if n == 1:
            # what BatchNorm says of the concatenated batch; every rank sees the same n, so all raise
            size = torch.Size([1, *x.shape[1:]])
            _checks.more_than_one_value_per_channel(size)
        var = m2 / n if n > 0 else m2
        if n > 0:
            # running variance takes the unbiased estimate of the global batch; an empty one leaves them
            _update_running(running_mean, mean, momentum)
            _update_running(running_var, m2 / (n - 1), momentum)
        rstd = torch.rsqrt(var + eps)
        ctx.save_for_backward(x, weight, shift, mean, rstd)
        ctx.count = n
        ctx.group = group
        ctx.bias_dtype = None if bias is None else bias.dtype
        if d is None:
            return torch.empty_like(x)
        # y = (x - mean) * scale + bias = d * scale + (bias - (mean - shift) * scale): one pass over d
        scale = rstd if weight is None else rstd * weight.to(rstd.dtype)
        offset = -(mean - shift.to(mean.dtype)) * scale
        if bias is not None:
            offset = offset + bias.to(offset.dtype)
        acc = d.dtype
        y = torch.addcmul(_channel_view(offset.to(acc), x.dim()), d, _channel_view(scale.to(acc), x.dim()))
        return y.to(x.dtype)

    @staticmethod
    @once_differentiable
    def backward(ctx: Any, grad_output: Tensor) -> tuple[Tensor | None, ...]:
        x, weight, shift, mean, rstd = ctx.saved_tensors
        needs_x, needs_w, needs_b = ctx.needs_input_grad[:3]
        dx = dweight = dbias = None
        dims = _reduce_dims(x)
        channels = x.size(1)
        delta = mean - shift.to(mean.dtype)  # x - mean = d - delta
        if x.numel() > 0:
            acc = _compute_dtype(x)
            d = torch.sub(x, _channel_view(shift, x.dim()))
            g = grad_output.to(acc)
            sum_g = g.sum(dim=dims).to(mean.dtype)
            sum_g_xmu = (g * d).sum(dim=dims).to(mean.dtype) - delta * sum_g
        else:
            sum_g = sum_g_xmu = torch.zeros(channels, dtype=mean.dtype, device=x.device)
        if needs_w and weight is not None:
            dweight = (sum_g_xmu * rstd).to(weight.dtype)
        if needs_b:
            dbias = sum_g.to(ctx.bias_dtype)
        if needs_x:
            # the only collective of the backward: both sums for every channel, summed over ranks
            sums = torch.cat([sum_g, sum_g_xmu])
            dist.all_reduce(sums, op=dist.ReduceOp.SUM, group=ctx.group)
            if x.numel() == 0:
                dx = torch.zeros_like(x)
            else:
                # dx = scale (g - sum(g)/n - (x - mean) rstd^2 sum(g (x - mean))/n), with x - mean = d - delta:
                # dx = scale g - scale k d + scale (delta k - sum(g)/n), k = rstd^2 sum(g (x - mean)) / n
                n = ctx.count
                total_g, total_g_xmu = sums[:channels], sums[channels:]
                scale = rstd if weight is None else rstd * weight.to(rstd.dtype)
                k = rstd.square() * total_g_xmu / n
                const = scale * (delta * k - total_g / n)
                dx = torch.addcmul(_channel_view(const.to(acc), x.dim()), g, _channel_view(scale.to(acc), x.dim()))
                dx.addcmul_(d, _channel_view((-scale * k).to(acc), x.dim()))
                dx = dx.to(x.dtype)
        return dx, dweight, dbias, None, None, None, None, None, None


def sync_batch_norm(
    input: Tensor,
    running_mean: Tensor | None,
    running_var: Tensor | None,
    weight: Tensor | None = None,
    bias: Tensor | None = None,
    momentum: float = 0.1,
    eps: float = 1e-5,
    process_group: Any | None = None,
) -> Tensor:
    r"""Training-mode Batch Normalization with statistics over the whole ``process_group``'s batch.

    Every rank of the group must call it (with its own slice of the batch, possibly of another size,
    possibly empty). The result on each rank is its slice of
    ``torch.nn.functional.batch_norm(torch.cat(all_inputs), ..., training=True)``, the running
    statistics (if given) are updated identically on every rank with the global unbiased variance,
    and ``input``'s gradient is that of BatchNorm on the concatenated batch. See the module docstring
    for the math. One ``all_gather`` in the forward and one ``all_reduce`` in the backward.

    Args:
        input: (N, C, *) on this rank; N may be 0.
        running_mean, running_var: (C,) buffers updated in place, or None.
        weight, bias: (C,) affine parameters, or None.
        momentum: the running statistics' update factor.
        eps: added to the variance.
        process_group: the group to synchronize over (default: the whole world).
    """
    group = dist.group.WORLD if process_group is None else process_group
    world_size = dist.get_world_size(group)
    if input.size(1) == 0:
        raise ValueError("SyncBatchNorm number of input channels should be non-zero")
    _checks.eps_for_batch_norm(eps, True)
    _checks.running_stats_not_differentiable(running_mean, running_var)
    _checks.per_channel_sizes(input.size(1), running_mean, running_var, weight, bias, True)
    _checks.running_stats_pair(running_mean, running_var)
    _checks.floating(input, "batch_norm")
    _checks.parameter_dtypes(
        input, weight, bias, running_mean, running_var, check_order=(weight, running_mean, running_var, bias)
    )
    y = _SyncBatchNorm.apply(input, weight, bias, running_mean, running_var, momentum, eps, group, world_size)
    return _laid_out(y, _suggested_format(input))
