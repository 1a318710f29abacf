r"""BatchNorm kernels: one statistic per channel, over every sample and position.

The input is seen as ``(N, C, S)`` with strides ``(sN, sC, sS)`` (:func:`.sets.ncs_view`; a channels_last
tensor is one (N·S, C) matrix). The work is a list of *items*, one per (sample, block of BLOCK_S
positions), for each block of BLOCK_C channels. A channel has far more elements than one program should
read, so each reduction has two stages, both in a fixed order (bitwise reproducible):

* forward: ``split`` programs per channel block each merge their items' (mean, M2) with Chan's formula
  into a partial row; :func:`_finalize_stats_kernel` merges the rows (in an order fixed by their number)
  into mean, rstd and the biased variance; :func:`_apply_kernel` writes ``(x - mean) · rstd · w + b``.
  Eval (fixed running statistics) runs the last kernel alone.
* backward: the same split sums ``dy`` and ``dy · xhat`` per channel into partial rows,
  :func:`~.reduce.sum_partials` adds them (these are dbias and dweight), and :func:`_apply_grad_kernel`
  writes ``dx = rstd · (g - c1 - xhat · c2)`` with ``g = dy · w`` (eval: ``g · rstd``).

The running statistics are updated by :func:`~.reduce.update_running_stats` from the batch statistics
(it adds the (2, C) mean's halves itself).
"""

from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl
from torch import Tensor

from .. import config
from .common import chan_merge, rounded
from .reduce import sum_partials
from .sets import like, ncs_view

__all__ = ["batch_forward", "batch_backward"]


@triton.jit
def _item_tile(item, c, C, S, sN, sC, sS, s_blocks, BLOCK_S: tl.constexpr):
    """Offsets and mask of one item (a sample's block of positions) for channels ``c``; valid positions."""
    item = tl.cast(item, tl.int64)
    n = item // s_blocks
    s0 = (item % s_blocks) * BLOCK_S
    s = s0 + tl.arange(0, BLOCK_S)
    mask = (c < C)[:, None] & (s < S)[None, :]
    offs = n * sN + c.to(tl.int64)[:, None] * sC + s[None, :] * sS
    return offs, mask, tl.cast(tl.minimum(S - s0, BLOCK_S), tl.float32)


@triton.jit
def _partial_stats_kernel(
    X, MEAN, PART_MEAN, PART_M2, PART_COUNT, C, S, sN, sC, sS, s_blocks, items, items_per_split,
    BLOCK_C: tl.constexpr, BLOCK_S: tl.constexpr,
):
    c = tl.program_id(0) * BLOCK_C + tl.arange(0, BLOCK_C)
    split = tl.program_id(1)
    # every split works on x - shift, the same shift for all (the channel's first tile's mean), so that
    # a large mean keeps its bits; the first split writes it as the first half of the mean
    offs, mask, valid = _item_tile(0, c, C, S, sN, sC, sS, s_blocks, BLOCK_S)
    shift = tl.sum(tl.load(X + offs, mask=mask, other=0.0).to(tl.float32), axis=1) / valid
    if split == 0:
        tl.store(MEAN + c, shift, mask=c < C)
    mean = tl.zeros([BLOCK_C], dtype=tl.float32)
    m2 = tl.zeros([BLOCK_C], dtype=tl.float32)
    count = tl.zeros([BLOCK_C], dtype=tl.float32)
    first = split * items_per_split
    for item in range(first, tl.minimum(first + items_per_split, items)):
        offs, mask, valid = _item_tile(item, c, C, S, sN, sC, sS, s_blocks, BLOCK_S)
        x = tl.where(mask, tl.load(X + offs, mask=mask, other=0.0).to(tl.float32) - shift[:, None], 0.0)
        tile_mean = tl.sum(x, axis=1) / valid
        xc = tl.where(mask, x - tile_mean[:, None], 0.0)
        mean, m2, count = chan_merge(mean, m2, count, tile_mean, tl.sum(xc * xc, axis=1), valid)
    part = split.to(tl.int64) * C + c
    tl.store(PART_MEAN + part, mean, mask=c < C)
    tl.store(PART_M2 + part, m2, mask=c < C)
    tl.store(PART_COUNT + part, count, mask=c < C)


@triton.jit
def _finalize_stats_kernel(
    PART_MEAN, PART_M2, PART_COUNT, MEAN, RSTD, VAR, C, splits, eps, BLOCK_R: tl.constexpr, BLOCK: tl.constexpr
):
    c = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    mask = c < C
    # BLOCK_R partial rows per step (many loads in flight); each lane merges its rows in order, then the
    # lanes are merged by a tree of the same Chan update: a fixed order for a given number of splits
    mean = tl.zeros([BLOCK_R, BLOCK], dtype=tl.float32)
    m2 = tl.zeros([BLOCK_R, BLOCK], dtype=tl.float32)
    count = tl.zeros([BLOCK_R, BLOCK], dtype=tl.float32)
    for r0 in range(0, splits, BLOCK_R):
        r = r0 + tl.arange(0, BLOCK_R)
        m = (r < splits)[:, None] & mask[None, :]
        part = r.to(tl.int64)[:, None] * C + c[None, :]
        mean, m2, count = chan_merge(
            mean, m2, count,
            tl.load(PART_MEAN + part, mask=m, other=0.0), tl.load(PART_M2 + part, mask=m, other=0.0),
            tl.load(PART_COUNT + part, mask=m, other=0.0),  # a count of 0 leaves a lane as it is
        )
    mean, m2, count = tl.reduce((mean, m2, count), 0, chan_merge)
    var = m2 / tl.maximum(count, 1.0)
    tl.store(MEAN + C + c, mean, mask=mask)
    tl.store(RSTD + c, tl.math.rsqrt(var + eps), mask=mask)
    tl.store(VAR + c, var, mask=mask)


@triton.jit
def _apply_kernel(
    X, Y, W, B, MEAN, RSTD, SAVE_MEAN, SAVE_RSTD, SAVE_VAR, C, S, sN, sC, sS, s_blocks, eps,
    BLOCK_C: tl.constexpr, BLOCK_S: tl.constexpr, HAS_WEIGHT: tl.constexpr, HAS_BIAS: tl.constexpr,
    FIXED: tl.constexpr, SAVE: tl.constexpr,
):
    c = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    offs, mask, _ = _item_tile(tl.program_id(0), c, C, S, sN, sC, sS, s_blocks, BLOCK_S)
    c_mask = c < C
    if FIXED:  # MEAN and RSTD are the running mean and variance, as stored (any float dtype)
        shift = tl.load(MEAN + c, mask=c_mask, other=0.0).to(tl.float32)
        mean = tl.zeros_like(shift)
        var = tl.load(RSTD + c, mask=c_mask, other=1.0).to(tl.float32)
        scale = tl.math.rsqrt(var + eps)
        if SAVE:  # the statistics used, for a backward, in the layout of the batch's: written by one item
            if tl.program_id(0) == 0:
                tl.store(SAVE_MEAN + c, shift, mask=c_mask)
                tl.store(SAVE_MEAN + C + c, mean, mask=c_mask)
                tl.store(SAVE_RSTD + c, scale, mask=c_mask)
                tl.store(SAVE_VAR + c, var, mask=c_mask)
    else:
        shift = tl.load(MEAN + c, mask=c_mask, other=0.0)
        mean = tl.load(MEAN + C + c, mask=c_mask, other=0.0)
        scale = tl.load(RSTD + c, mask=c_mask, other=0.0)
    if HAS_WEIGHT:
        scale = scale * tl.load(W + c, mask=c_mask, other=0.0).to(tl.float32)
    x = tl.load(X + offs, mask=mask, other=0.0).to(tl.float32)
    y = ((x - shift[:, None]) - mean[:, None]) * scale[:, None]
    if HAS_BIAS:
        y = y + tl.load(B + c, mask=c_mask, other=0.0).to(tl.float32)[:, None]
    tl.store(Y + offs, rounded(y, Y.dtype.element_ty), mask=mask)


@triton.jit
def _partial_grads_kernel(
    DY, X, MEAN, RSTD, PART_DW, PART_DB, C, S, sN, sC, sS, s_blocks, items, items_per_split,
    BLOCK_C: tl.constexpr, BLOCK_S: tl.constexpr,
):
    c = tl.program_id(0) * BLOCK_C + tl.arange(0, BLOCK_C)
    split = tl.program_id(1)
    shift = tl.load(MEAN + c, mask=c < C, other=0.0)
    mean = tl.load(MEAN + C + c, mask=c < C, other=0.0)
    rstd = tl.load(RSTD + c, mask=c < C, other=0.0)
    sum_dy = tl.zeros([BLOCK_C, BLOCK_S], dtype=tl.float32)
    sum_dy_xhat = tl.zeros([BLOCK_C, BLOCK_S], dtype=tl.float32)
    first = split * items_per_split
    for item in range(first, tl.minimum(first + items_per_split, items)):
        offs, mask, _ = _item_tile(item, c, C, S, sN, sC, sS, s_blocks, BLOCK_S)
        x = tl.load(X + offs, mask=mask, other=0.0).to(tl.float32)
        dy = tl.load(DY + offs, mask=mask, other=0.0).to(tl.float32)
        sum_dy += dy
        sum_dy_xhat += dy * tl.where(mask, ((x - shift[:, None]) - mean[:, None]) * rstd[:, None], 0.0)
    part = split.to(tl.int64) * C + c
    tl.store(PART_DW + part, tl.sum(sum_dy_xhat, axis=1), mask=c < C)
    tl.store(PART_DB + part, tl.sum(sum_dy, axis=1), mask=c < C)


@triton.jit
def _apply_grad_kernel(
    DY, X, DX, W, MEAN, RSTD, SUM_DY, SUM_DY_XHAT, C, S, sN, sC, sS, s_blocks, count,
    BLOCK_C: tl.constexpr, BLOCK_S: tl.constexpr, HAS_WEIGHT: tl.constexpr, TRAINING: tl.constexpr,
):
    c = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    offs, mask, _ = _item_tile(tl.program_id(0), c, C, S, sN, sC, sS, s_blocks, BLOCK_S)
    c_mask = c < C
    rstd = tl.load(RSTD + c, mask=c_mask, other=0.0)
    w = tl.load(W + c, mask=c_mask, other=0.0).to(tl.float32) if HAS_WEIGHT else tl.where(c_mask, 1.0, 0.0)
    dy = tl.load(DY + offs, mask=mask, other=0.0).to(tl.float32)
    if TRAINING:
        shift = tl.load(MEAN + c, mask=c_mask, other=0.0)
        mean = tl.load(MEAN + C + c, mask=c_mask, other=0.0)
        c1 = tl.load(SUM_DY + c, mask=c_mask, other=0.0) / count
        c2 = tl.load(SUM_DY_XHAT + c, mask=c_mask, other=0.0) / count
        x = tl.load(X + offs, mask=mask, other=0.0).to(tl.float32)
        xhat = ((x - shift[:, None]) - mean[:, None]) * rstd[:, None]
        dx = (dy - c1[:, None] - xhat * c2[:, None]) * (w * rstd)[:, None]
    else:
        dx = dy * (w * rstd)[:, None]
    tl.store(DX + offs, rounded(dx, DX.dtype.element_ty), mask=mask)


def _blocks(c: int, s: int, channels_inner: bool, tile: int) -> tuple[int, int]:
    """``(BLOCK_C, BLOCK_S)``: wide along whichever of channels and positions is contiguous."""
    if channels_inner:
        block_c = min(config.next_power_of_2(c), 64, tile)
        return block_c, max(1, min(config.next_power_of_2(s), tile // block_c))
    block_s = min(config.next_power_of_2(s), tile)
    return max(1, min(config.next_power_of_2(c), tile // block_s)), block_s


def _splits(items: int, channel_blocks: int, sms: int) -> tuple[int, int]:
    """``(splits, items_per_split)``: about four programs per SM in the reduction, none empty."""
    wanted = max(1, min(items, config.cdiv(4 * sms, channel_blocks)))
    per_split = config.cdiv(items, wanted)
    return config.cdiv(items, per_split), per_split


@functools.lru_cache(maxsize=1024)
def _tiling(n: int, c: int, s: int, channels_inner: bool, sms: int, tile: int) -> tuple[int, ...]:
    """Every launch parameter of one shape, computed once per shape rather than in every forward and
    backward (host time is what small norms on a GPU are short of)."""
    block_c, block_s = _blocks(c, s, channels_inner, tile)
    s_blocks = config.cdiv(s, block_s)
    items, channel_blocks = n * s_blocks, config.cdiv(c, block_c)
    splits, per_split = _splits(items, channel_blocks, sms)
    return block_c, block_s, s_blocks, items, channel_blocks, splits, per_split


class _Layout:
    """The (N, C, S) view of x and the tiling every BatchNorm kernel of one call shares."""

    def __init__(self, x: Tensor) -> None:
        self.x, (n, self.c, self.s), self.strides = ncs_view(x, merge_batch=True)
        (self.block_c, self.block_s, self.s_blocks, self.items, self.channel_blocks, self.splits,
         self.items_per_split) = _tiling(
            n, self.c, self.s, self.strides[1] == 1, config.num_sms(x.device), config.tile_elements("batch")
        )
        # outside the cache: config.tuning may set it
        self.warps = config.warps_for(self.block_c * self.block_s, "batch")

    @property
    def dims(self) -> tuple[int, ...]:
        return (self.c, self.s, *self.strides, self.s_blocks)

    @property
    def apply_grid(self) -> tuple[int, int]:
        return (self.items, self.channel_blocks)

    @property
    def split_grid(self) -> tuple[int, int]:
        return (self.channel_blocks, self.splits)


def batch_forward(
    x: Tensor, weight: Tensor | None, bias: Tensor | None, fixed_mean: Tensor | None, fixed_var: Tensor | None,
    eps: float, need_stats: bool = True,
) -> tuple[Tensor, Tensor | None, Tensor | None, Tensor | None]:
    """BatchNorm of x (N, C, *): ``(y, mean, rstd, var)``, y in x's layout and dtype, float32 (C,)
    statistics, the mean as (2, C): a shift and the mean relative to it (their sum is the mean). With
    ``fixed_mean``/``fixed_var`` (eval) those are used instead of the batch's: the kernel reads them as
    they are stored, and the statistics are returned only when ``need_stats`` (for a backward)."""
    lay = _Layout(x)
    dev = x.device
    y = torch.empty_like(lay.x)
    if fixed_mean is not None:
        # with need_stats the kernel also writes the statistics it used (copies: a later training step may
        # change the buffers), as the mean pair (the fixed mean, 0), rstd and the variance in float32: three
        # allocations instead of six torch ops
        if need_stats:
            mean = torch.empty((2, lay.c), dtype=torch.float32, device=dev)
            rstd, var = (torch.empty(lay.c, dtype=torch.float32, device=dev) for _ in range(2))
        else:
            mean = rstd = var = None
        _apply_kernel[lay.apply_grid](
            lay.x, y, weight if weight is not None else y, bias if bias is not None else y,
            fixed_mean.contiguous(), fixed_var.contiguous(), mean if need_stats else y, rstd if need_stats else y,
            var if need_stats else y, *lay.dims, eps,
            BLOCK_C=lay.block_c, BLOCK_S=lay.block_s, HAS_WEIGHT=weight is not None, HAS_BIAS=bias is not None,
            FIXED=True, SAVE=need_stats, num_warps=lay.warps,
        )
        return y, mean, rstd, var
    part = torch.empty((3, lay.splits, lay.c), dtype=torch.float32, device=dev).unbind(0)  # three (splits, C)
    mean = torch.empty((2, lay.c), dtype=torch.float32, device=dev)
    rstd, var = (torch.empty(lay.c, dtype=torch.float32, device=dev) for _ in range(2))
    _partial_stats_kernel[lay.split_grid](
        lay.x, mean, *part, *lay.dims, lay.items, lay.items_per_split,
        BLOCK_C=lay.block_c, BLOCK_S=lay.block_s, num_warps=lay.warps,
    )
    block = min(64, config.next_power_of_2(lay.c))
    _finalize_stats_kernel[(config.cdiv(lay.c, block),)](
        *part, mean, rstd, var, lay.c, lay.splits, eps,
        BLOCK_R=min(32, config.next_power_of_2(lay.splits)), BLOCK=block, num_warps=4,
    )
    _apply_kernel[lay.apply_grid](
        lay.x, y, weight if weight is not None else mean, bias if bias is not None else mean, mean, rstd, mean, rstd,
        var, *lay.dims, eps, BLOCK_C=lay.block_c, BLOCK_S=lay.block_s, HAS_WEIGHT=weight is not None,
        HAS_BIAS=bias is not None, FIXED=False, SAVE=False, num_warps=lay.warps,
    )
    return y, mean, rstd, var


def batch_backward(
    dy: Tensor, x: Tensor, weight: Tensor | None, mean: Tensor, rstd: Tensor, training: bool,
    need_dw: bool, need_db: bool,
) -> tuple[Tensor, Tensor | None, Tensor | None]:
    """``(dx, dweight, dbias)`` of :func:`batch_forward` (``training``: the statistics were the
    batch's, so dx has their gradient too); parameter gradients float32 (C,), or None."""
    lay = _Layout(x)
    dyk = like(dy, lay.x)
    dev = x.device
    need_dw = need_dw and weight is not None
    sum_dy = sum_dy_xhat = None
    if training or need_dw or need_db:
        part_dw, part_db = torch.empty((2, lay.splits, lay.c), dtype=torch.float32, device=dev)
        _partial_grads_kernel[lay.split_grid](
            dyk, lay.x, mean, rstd, part_dw, part_db, *lay.dims, lay.items, lay.items_per_split,
            BLOCK_C=lay.block_c, BLOCK_S=lay.block_s, num_warps=lay.warps,
        )
        sum_dy_xhat, sum_dy = sum_partials(part_dw, part_db)
    dx = torch.empty_like(lay.x)
    count = x.numel() // lay.c
    _apply_grad_kernel[lay.apply_grid](
        dyk, lay.x, dx, weight if weight is not None else mean, mean, rstd,
        sum_dy if sum_dy is not None else mean, sum_dy_xhat if sum_dy_xhat is not None else mean,
        *lay.dims, float(count),
        BLOCK_C=lay.block_c, BLOCK_S=lay.block_s, HAS_WEIGHT=weight is not None, TRAINING=training,
        num_warps=lay.warps,
    )
    return dx, sum_dy_xhat if need_dw else None, sum_dy if need_db else None
