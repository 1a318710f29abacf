r"""Set kernels: GroupNorm, InstanceNorm (GroupNorm with one channel per group) and GroupNorm+SiLU,
forward and backward, on NCHW and channels_last input alike.

The input is seen as ``(N, C, S)`` (S: the spatial positions) with element strides ``(sN, sC, sS)``:
``(C·S, S, 1)`` for contiguous input, ``(S·C, 1, C)`` for channels_last. One program owns ``GROUPS``
whole groups of one sample (a "set" is one (n, group): ``CG`` channels × S positions) and walks them in
tiles of ``[GROUPS, BLOCK_C, BLOCK_S]``: channels of a group (blocks of ``BLOCK_C``), then positions.
Triton specializes a stride of 1, so the same code reads along the positions for NCHW and along the
channels for channels_last; several groups per program keep channels_last reads wide when groups are
narrow (InstanceNorm: 32 or more channels side by side).

Forward: pass 1 merges each tile's (mean, M2) into the set's with Chan's formula (float32); pass 2
writes ``(x - mean) · rstd · w + b`` (then SiLU), reading x again (from L2 for sets up to a few hundred KB).
Backward: pass 1 sums ``dz`` and ``dz · xhat`` per channel (``dz = dy``, or ``dy · silu'(z)`` with z
recomputed from x and the statistics: nothing but x and (N, G) statistics is saved) and writes them as
the per-sample partials of ``dbias`` and ``dweight``; pass 2 writes
``dx = rstd · (g - c1 - xhat · c2)`` with ``g = dz · w``, ``c1 = mean(g)``, ``c2 = mean(g · xhat)``.
The partials, an (N, C) float32 buffer, are summed over N in a fixed order.

Few sets (fewer programs than SMs: GroupNorm(32) at batch 1-4, as diffusion models run it) leave most of
the GPU idle with one program per set, so each set's positions are then split over ``splits`` programs
(grid axis 1, :func:`~normkit.backends.triton.config.set_splits`): the forward's first kernel writes each
split's (mean, M2, count), the second merges them in split order (every program the same merge) and
writes its split of the output; the backward's first kernel writes each split's per-channel sums as rows
of an (N·splits, C) buffer, the second adds a set's rows for ``c1`` and ``c2`` and writes its split of dx,
and the parameter gradients are the column sums of that buffer.
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import torch
import triton
import triton.language as tl
from torch import Tensor

from .. import config
from .common import chan_merge, rounded, silu, silu_slope
from .reduce import sum_partials

__all__ = ["set_forward", "set_backward", "ncs_view"]


@triton.jit
def _tile(n, g, c0, s0, G, S, sN, sC, sS, CG: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_S: tl.constexpr):
    """Offsets, channel indices and mask of the tile at channel c0 and position s0 of groups ``g``."""
    ci = c0 + tl.arange(0, BLOCK_C)
    s = s0 + tl.arange(0, BLOCK_S)
    c = g[:, None] * CG + ci[None, :]  # [GROUPS, BLOCK_C]
    c_mask = (g < G)[:, None] & (ci < CG)[None, :]
    mask = c_mask[:, :, None] & (s < S)[None, None, :]
    offs = n * sN + c.to(tl.int64)[:, :, None] * sC + s.to(tl.int64)[None, None, :] * sS
    return offs, c, c_mask, mask


@triton.jit
def _set_shift(X, n, g, G, S, sN, sC, sS, CG: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_S: tl.constexpr):
    """The set's shift: its first tile's mean (every split computes the same), so that a large mean keeps
    its bits in the statistics of ``x - shift``."""
    offs, c, c_mask, mask = _tile(n, g, 0, 0, G, S, sN, sC, sS, CG, BLOCK_C, BLOCK_S)
    first = tl.sum(tl.sum(tl.load(X + offs, mask=mask, other=0.0).to(tl.float32), axis=2), axis=1)
    return first / tl.cast(tl.minimum(S, BLOCK_S) * tl.minimum(CG, BLOCK_C), tl.float32)


@triton.jit
def _stats_range(X, n, g, shift, s_lo, s_hi, G, S, sN, sC, sS, GROUPS: tl.constexpr, CG: tl.constexpr,
                 BLOCK_C: tl.constexpr, BLOCK_S: tl.constexpr):
    """(mean, M2, count) per group of ``x - shift`` over positions ``[s_lo, s_hi)``, tiles merged with Chan's
    formula in order."""
    mean = tl.zeros([GROUPS], dtype=tl.float32)
    m2 = tl.zeros([GROUPS], dtype=tl.float32)
    seen = tl.zeros([GROUPS], dtype=tl.float32)
    for c0 in range(0, CG, BLOCK_C):
        for s0 in range(s_lo, s_hi, BLOCK_S):
            offs, c, c_mask, mask = _tile(n, g, c0, s0, G, S, sN, sC, sS, CG, BLOCK_C, BLOCK_S)
            x = tl.where(mask, tl.load(X + offs, mask=mask, other=0.0).to(tl.float32) - shift[:, None, None], 0.0)
            count = tl.cast(tl.minimum(S - s0, BLOCK_S) * tl.minimum(CG - c0, BLOCK_C), tl.float32)
            tile_mean = tl.sum(tl.sum(x, axis=2), axis=1) / count
            xc = tl.where(mask, x - tile_mean[:, None, None], 0.0)
            mean, m2, seen = chan_merge(mean, m2, seen, tile_mean, tl.sum(tl.sum(xc * xc, axis=2), axis=1), count)
    return mean, m2, seen


@triton.jit
def _apply_range(X, Y, W, B, n, g, shift, mean, rstd, s_lo, s_hi, G, S, sN, sC, sS, CG: tl.constexpr,
                 BLOCK_C: tl.constexpr, BLOCK_S: tl.constexpr, GROUPS: tl.constexpr, HAS_WEIGHT: tl.constexpr,
                 HAS_BIAS: tl.constexpr, SILU: tl.constexpr):
    """``y = ((x - shift) - mean) · rstd · w + b`` (then SiLU) over positions ``[s_lo, s_hi)``."""
    for c0 in range(0, CG, BLOCK_C):
        offs, c, c_mask, mask = _tile(n, g, c0, 0, G, S, sN, sC, sS, CG, BLOCK_C, BLOCK_S)
        scale = tl.broadcast_to(rstd[:, None], [GROUPS, BLOCK_C])
        if HAS_WEIGHT:
            scale = scale * tl.load(W + c, mask=c_mask, other=0.0).to(tl.float32)
        if HAS_BIAS:
            beta = tl.load(B + c, mask=c_mask, other=0.0).to(tl.float32)
        for s0 in range(s_lo, s_hi, BLOCK_S):
            offs, c, c_mask, mask = _tile(n, g, c0, s0, G, S, sN, sC, sS, CG, BLOCK_C, BLOCK_S)
            x = tl.load(X + offs, mask=mask, other=0.0).to(tl.float32)
            y = ((x - shift[:, None, None]) - mean[:, None, None]) * scale[:, :, None]
            if HAS_BIAS:
                y = y + beta[:, :, None]
            if SILU:
                y = silu(y)
            tl.store(Y + offs, rounded(y, Y.dtype.element_ty), mask=mask)


@triton.jit
def _store_stats(MEAN, RSTD, VAR, stat, valid, mean, var, rstd, num_stats):
    """A set's statistics: the mean relative to the shift (the second half of MEAN), rstd and the variance."""
    tl.store(MEAN + num_stats + stat, mean, mask=valid)
    tl.store(RSTD + stat, rstd, mask=valid)
    tl.store(VAR + stat, var, mask=valid)


@triton.jit
def _set_forward_kernel(
    X, Y, W, B, MEAN, RSTD, VAR,
    G, S, sN, sC, sS, eps, group_blocks, num_stats,
    CG: tl.constexpr, GROUPS: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_S: tl.constexpr,
    HAS_WEIGHT: tl.constexpr, HAS_BIAS: tl.constexpr, SILU: tl.constexpr,
):
    pid = tl.program_id(0)
    n = (pid // group_blocks).to(tl.int64)
    g = (pid % group_blocks) * GROUPS + tl.arange(0, GROUPS)
    shift = _set_shift(X, n, g, G, S, sN, sC, sS, CG, BLOCK_C, BLOCK_S)
    mean, m2, _ = _stats_range(X, n, g, shift, 0, S, G, S, sN, sC, sS, GROUPS, CG, BLOCK_C, BLOCK_S)
    var = m2 / (S * CG)
    rstd = tl.math.rsqrt(var + eps)
    tl.store(MEAN + n * G + g, shift, mask=g < G)
    _store_stats(MEAN, RSTD, VAR, n * G + g, g < G, mean, var, rstd, num_stats)
    _apply_range(X, Y, W, B, n, g, shift, mean, rstd, 0, S, G, S, sN, sC, sS, CG, BLOCK_C, BLOCK_S, GROUPS,
                 HAS_WEIGHT, HAS_BIAS, SILU)


@triton.jit
def _split_stats_kernel(
    X, MEAN, PART, G, S, sN, sC, sS, group_blocks, num_stats, span,
    CG: tl.constexpr, GROUPS: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_S: tl.constexpr,
):
    """Split ``program_id(1)`` of a set: its (mean, M2, count) into PART, a (3, num_stats, splits) buffer;
    split 0 writes the set's shift."""
    pid, split, splits = tl.program_id(0), tl.program_id(1), tl.num_programs(1)
    n = (pid // group_blocks).to(tl.int64)
    g = (pid % group_blocks) * GROUPS + tl.arange(0, GROUPS)
    stat = n * G + g
    shift = _set_shift(X, n, g, G, S, sN, sC, sS, CG, BLOCK_C, BLOCK_S)
    if split == 0:
        tl.store(MEAN + stat, shift, mask=g < G)
    s_lo = split * span
    mean, m2, seen = _stats_range(X, n, g, shift, s_lo, tl.minimum(s_lo + span, S), G, S, sN, sC, sS, GROUPS, CG,
                                  BLOCK_C, BLOCK_S)
    part = stat * splits + split
    block = num_stats * splits
    tl.store(PART + part, mean, mask=g < G)
    tl.store(PART + block + part, m2, mask=g < G)
    tl.store(PART + 2 * block + part, seen, mask=g < G)


@triton.jit
def _split_apply_kernel(
    X, Y, W, B, PART, MEAN, RSTD, VAR, G, S, sN, sC, sS, eps, group_blocks, num_stats, span,
    CG: tl.constexpr, GROUPS: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_S: tl.constexpr,
    HAS_WEIGHT: tl.constexpr, HAS_BIAS: tl.constexpr, SILU: tl.constexpr,
):
    """Split ``program_id(1)`` of a set's output: the splits' moments merged in split order (the same merge
    in every program), split 0 writing the statistics."""
    pid, split, splits = tl.program_id(0), tl.program_id(1), tl.num_programs(1)
    n = (pid // group_blocks).to(tl.int64)
    g = (pid % group_blocks) * GROUPS + tl.arange(0, GROUPS)
    stat = n * G + g
    valid = g < G
    block = num_stats * splits
    mean = tl.zeros([GROUPS], dtype=tl.float32)
    m2 = tl.zeros([GROUPS], dtype=tl.float32)
    seen = tl.zeros([GROUPS], dtype=tl.float32)
    for r in range(0, splits):
        part = stat * splits + r
        mean, m2, seen = chan_merge(
            mean, m2, seen, tl.load(PART + part, mask=valid, other=0.0),
            tl.load(PART + block + part, mask=valid, other=0.0),
            tl.load(PART + 2 * block + part, mask=valid, other=0.0),  # a count of 0 leaves a group as it is
        )
    shift = tl.load(MEAN + stat, mask=valid, other=0.0)
    var = m2 / (S * CG)
    rstd = tl.math.rsqrt(var + eps)
    if split == 0:
        _store_stats(MEAN, RSTD, VAR, stat, valid, mean, var, rstd, num_stats)
    s_lo = split * span
    _apply_range(X, Y, W, B, n, g, shift, mean, rstd, s_lo, tl.minimum(s_lo + span, S), G, S, sN, sC, sS, CG,
                 BLOCK_C, BLOCK_S, GROUPS, HAS_WEIGHT, HAS_BIAS, SILU)


@triton.jit
def _set_params(W, B, c, c_mask, HAS_WEIGHT: tl.constexpr, HAS_BIAS: tl.constexpr):
    """A channel block's weight and bias in float32 (1 and 0 without them)."""
    w = tl.load(W + c, mask=c_mask, other=0.0).to(tl.float32) if HAS_WEIGHT else tl.where(c_mask, 1.0, 0.0)
    b = tl.load(B + c, mask=c_mask, other=0.0).to(tl.float32) if HAS_BIAS else tl.zeros_like(w)
    return w, b


@triton.jit
def _grad_sums(DY, X, n, g, c0, shift, mean, rstd, w, b, s_lo, s_hi, G, S, sN, sC, sS, GROUPS: tl.constexpr,
               CG: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_S: tl.constexpr, SILU: tl.constexpr):
    """Per channel of the block at ``c0``: the sums of dz and dz · xhat over positions ``[s_lo, s_hi)``."""
    sum_dz = tl.zeros([GROUPS, BLOCK_C], dtype=tl.float32)
    sum_dz_xhat = tl.zeros([GROUPS, BLOCK_C], dtype=tl.float32)
    for s0 in range(s_lo, s_hi, BLOCK_S):
        offs, c, c_mask, mask = _tile(n, g, c0, s0, G, S, sN, sC, sS, CG, BLOCK_C, BLOCK_S)
        x = tl.load(X + offs, mask=mask, other=0.0).to(tl.float32)
        dz = tl.load(DY + offs, mask=mask, other=0.0).to(tl.float32)
        xc = (x - shift[:, None, None]) - mean[:, None, None]
        xhat = tl.where(mask, xc * rstd[:, None, None], 0.0)
        if SILU:
            dz = dz * silu_slope(xhat * w[:, :, None] + b[:, :, None])
        sum_dz += tl.sum(dz, axis=2)
        sum_dz_xhat += tl.sum(dz * xhat, axis=2)
    return sum_dz, sum_dz_xhat


@triton.jit
def _dx_range(DY, X, DX, W, B, n, g, shift, mean, rstd, c1, c2, s_lo, s_hi, G, S, sN, sC, sS, CG: tl.constexpr,
              BLOCK_C: tl.constexpr, BLOCK_S: tl.constexpr, HAS_WEIGHT: tl.constexpr, HAS_BIAS: tl.constexpr,
              SILU: tl.constexpr):
    """``dx = rstd · (dz · w - c1 - xhat · c2)`` over positions ``[s_lo, s_hi)``."""
    for c0 in range(0, CG, BLOCK_C):
        offs, c, c_mask, mask = _tile(n, g, c0, 0, G, S, sN, sC, sS, CG, BLOCK_C, BLOCK_S)
        w, b = _set_params(W, B, c, c_mask, HAS_WEIGHT, HAS_BIAS)
        for s0 in range(s_lo, s_hi, BLOCK_S):
            offs, c, c_mask, mask = _tile(n, g, c0, s0, G, S, sN, sC, sS, CG, BLOCK_C, BLOCK_S)
            x = tl.load(X + offs, mask=mask, other=0.0).to(tl.float32)
            dz = tl.load(DY + offs, mask=mask, other=0.0).to(tl.float32)
            xhat = ((x - shift[:, None, None]) - mean[:, None, None]) * rstd[:, None, None]
            if SILU:
                dz = dz * silu_slope(xhat * w[:, :, None] + b[:, :, None])
            dx = (dz * w[:, :, None] - c1[:, None, None] - xhat * c2[:, None, None]) * rstd[:, None, None]
            tl.store(DX + offs, rounded(dx, DX.dtype.element_ty), mask=mask)


@triton.jit
def _saved_stats(MEAN, RSTD, pid, group_blocks, G, num_stats, GROUPS: tl.constexpr):
    """A backward program's sample, its groups and their saved statistics: ``(n, g, shift, mean, rstd)``."""
    n = (pid // group_blocks).to(tl.int64)
    g = (pid % group_blocks) * GROUPS + tl.arange(0, GROUPS)
    shift = tl.load(MEAN + n * G + g, mask=g < G, other=0.0)
    mean = tl.load(MEAN + num_stats + n * G + g, mask=g < G, other=0.0)
    rstd = tl.load(RSTD + n * G + g, mask=g < G, other=0.0)
    return n, g, shift, mean, rstd


@triton.jit
def _set_backward_kernel(
    DY, X, DX, W, B, MEAN, RSTD, DW_PART, DB_PART,
    G, C, S, sN, sC, sS, group_blocks, num_stats,
    CG: tl.constexpr, GROUPS: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_S: tl.constexpr,
    HAS_WEIGHT: tl.constexpr, HAS_BIAS: tl.constexpr, SILU: tl.constexpr,
    NEED_DW: tl.constexpr, NEED_DB: tl.constexpr,
):
    pid = tl.program_id(0)
    n, g, shift, mean, rstd = _saved_stats(MEAN, RSTD, pid, group_blocks, G, num_stats, GROUPS)
    c1 = tl.zeros([GROUPS], dtype=tl.float32)
    c2 = tl.zeros([GROUPS], dtype=tl.float32)
    # pass 1: per-channel sums of dz and dz * xhat (the parameter-gradient partials), and c1, c2
    for c0 in range(0, CG, BLOCK_C):
        offs, c, c_mask, mask = _tile(n, g, c0, 0, G, S, sN, sC, sS, CG, BLOCK_C, BLOCK_S)
        w, b = _set_params(W, B, c, c_mask, HAS_WEIGHT, HAS_BIAS)
        sum_dz, sum_dz_xhat = _grad_sums(DY, X, n, g, c0, shift, mean, rstd, w, b, 0, S, G, S, sN, sC, sS, GROUPS,
                                         CG, BLOCK_C, BLOCK_S, SILU)
        # each loop result gets one use (the masks change nothing): triton 3.6's thread-locality pass
        # asserts that an accumulated reduction's result is used once, and both are used twice below
        sum_dz = tl.where(c_mask, sum_dz, 0.0)
        sum_dz_xhat = tl.where(c_mask, sum_dz_xhat, 0.0)
        part = n * C + c
        if NEED_DW:
            tl.store(DW_PART + part, sum_dz_xhat, mask=c_mask)
        if NEED_DB:
            tl.store(DB_PART + part, sum_dz, mask=c_mask)
        c1 += tl.sum(w * sum_dz, axis=1)
        c2 += tl.sum(w * sum_dz_xhat, axis=1)
    c1 = c1 / (S * CG)
    c2 = c2 / (S * CG)
    _dx_range(DY, X, DX, W, B, n, g, shift, mean, rstd, c1, c2, 0, S, G, S, sN, sC, sS, CG, BLOCK_C, BLOCK_S,
              HAS_WEIGHT, HAS_BIAS, SILU)


@triton.jit
def _split_grads_kernel(
    DY, X, W, B, MEAN, RSTD, DW_PART, DB_PART, G, C, S, sN, sC, sS, group_blocks, num_stats, span,
    CG: tl.constexpr, GROUPS: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_S: tl.constexpr,
    HAS_WEIGHT: tl.constexpr, HAS_BIAS: tl.constexpr, SILU: tl.constexpr,
):
    """Split ``program_id(1)``'s per-channel sums of dz · xhat and dz, into row ``n · splits + split`` of the
    (N · splits, C) buffers DW_PART and DB_PART."""
    pid, split, splits = tl.program_id(0), tl.program_id(1), tl.num_programs(1)
    n, g, shift, mean, rstd = _saved_stats(MEAN, RSTD, pid, group_blocks, G, num_stats, GROUPS)
    s_lo = split * span
    for c0 in range(0, CG, BLOCK_C):
        offs, c, c_mask, mask = _tile(n, g, c0, 0, G, S, sN, sC, sS, CG, BLOCK_C, BLOCK_S)
        w, b = _set_params(W, B, c, c_mask, HAS_WEIGHT, HAS_BIAS)
        sum_dz, sum_dz_xhat = _grad_sums(DY, X, n, g, c0, shift, mean, rstd, w, b, s_lo, tl.minimum(s_lo + span, S),
                                         G, S, sN, sC, sS, GROUPS, CG, BLOCK_C, BLOCK_S, SILU)
        part = (n * splits + split) * C + c
        tl.store(DW_PART + part, sum_dz_xhat, mask=c_mask)
        tl.store(DB_PART + part, sum_dz, mask=c_mask)


@triton.jit
def _split_dx_kernel(
    DY, X, DX, W, B, MEAN, RSTD, DW_PART, DB_PART, G, C, S, sN, sC, sS, group_blocks, num_stats, span,
    CG: tl.constexpr, GROUPS: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_S: tl.constexpr,
    HAS_WEIGHT: tl.constexpr, HAS_BIAS: tl.constexpr, SILU: tl.constexpr,
):
    """Split ``program_id(1)`` of a set's dx: c1 and c2 from the splits' sums (added in split order, the same
    in every program)."""
    pid, split, splits = tl.program_id(0), tl.program_id(1), tl.num_programs(1)
    n, g, shift, mean, rstd = _saved_stats(MEAN, RSTD, pid, group_blocks, G, num_stats, GROUPS)
    c1 = tl.zeros([GROUPS], dtype=tl.float32)
    c2 = tl.zeros([GROUPS], dtype=tl.float32)
    for c0 in range(0, CG, BLOCK_C):
        offs, c, c_mask, mask = _tile(n, g, c0, 0, G, S, sN, sC, sS, CG, BLOCK_C, BLOCK_S)
        w, b = _set_params(W, B, c, c_mask, HAS_WEIGHT, HAS_BIAS)
        sum_dz = tl.zeros([GROUPS, BLOCK_C], dtype=tl.float32)
        sum_dz_xhat = tl.zeros([GROUPS, BLOCK_C], dtype=tl.float32)
        for r in range(0, splits):
            part = (n * splits + r) * C + c
            sum_dz += tl.load(DB_PART + part, mask=c_mask, other=0.0)
            sum_dz_xhat += tl.load(DW_PART + part, mask=c_mask, other=0.0)
        c1 += tl.sum(w * sum_dz, axis=1)
        c2 += tl.sum(w * sum_dz_xhat, axis=1)
    c1 = c1 / (S * CG)
    c2 = c2 / (S * CG)
    s_lo = split * span
    _dx_range(DY, X, DX, W, B, n, g, shift, mean, rstd, c1, c2, s_lo, tl.minimum(s_lo + span, S), G, S, sN, sC, sS,
              CG, BLOCK_C, BLOCK_S, HAS_WEIGHT, HAS_BIAS, SILU)


def ncs_view(x: Tensor, merge_batch: bool = False) -> tuple[Tensor, tuple[int, int, int], tuple[int, int, int]]:
    """``x`` (N, C, *) as ``(tensor, (N, C, S), (sN, sC, sS))``: itself when contiguous or channels_last
    (channel dim innermost and dense), else a contiguous copy.

    ``merge_batch`` (BatchNorm: one statistic per channel over every sample) folds the batch into the
    positions of a channels_last tensor, ``(1, C, N·S)``, so that its channels are read as the columns
    of one (N·S, C) matrix."""
    n, c = x.shape[0], x.shape[1]
    s = x.numel() // max(n * c, 1)
    if x.is_contiguous() and not (merge_batch and s == 1):
        return x, (n, c, s), (c * s, s, 1)
    if x.movedim(1, -1).is_contiguous():
        if merge_batch:
            return x, (1, c, n * s), (0, 1, c)
        return x, (n, c, s), (s * c, 1, c)
    x = x.contiguous()
    return x, (n, c, s), (c * s, s, 1)


def like(t: Tensor, x: Tensor) -> Tensor:
    """``t`` (x's shape) with x's strides (a copy only when they differ)."""
    if t.stride() == x.stride():
        return t
    return torch.empty_like(x).copy_(t)


def _set_config(cg: int, groups: int, s: int, channels_inner: bool) -> tuple[int, int, int]:
    """``(GROUPS, BLOCK_C, BLOCK_S)``: groups per program and the tile's channel and position extents."""
    tile = config.tile_elements("sets")
    block_c = min(config.next_power_of_2(cg), tile)
    per_program = 1
    if channels_inner:  # read 32 or more adjacent channels at a time when groups are narrow
        per_program = max(1, min(config.next_power_of_2(groups), 32 // block_c, tile // block_c))
    block_s = max(1, min(config.next_power_of_2(s), tile // (per_program * block_c)))
    if not channels_inner:  # short positions (small images, 2-D input): fill the tile with groups
        per_program = max(1, min(config.next_power_of_2(groups), tile // (block_c * block_s)))
    return per_program, block_c, block_s


class _Launch(NamedTuple):
    """Every launch parameter of one set-kernel call."""

    cg: int
    per_program: int
    block_c: int
    block_s: int
    group_blocks: int
    warps: int
    splits: int
    span: int  # positions per split (a multiple of block_s)


def _plan(n: int, c: int, s: int, groups: int, channels_inner: bool, sms: int) -> _Launch:
    cg = c // groups
    per_program, block_c, block_s = _set_config(cg, groups, s, channels_inner)
    group_blocks = config.cdiv(groups, per_program)
    s_blocks = config.cdiv(s, block_s)
    elements = per_program * block_c * block_s
    splits = config.set_splits(n * group_blocks, s_blocks, sms, elements)
    per_split = config.cdiv(s_blocks, splits)
    return _Launch(cg, per_program, block_c, block_s, group_blocks, config.warps_for(elements, "sets"),
                   config.cdiv(s_blocks, per_split), per_split * block_s)  # no empty split


@functools.lru_cache(maxsize=1024)
def _cached_plan(n: int, c: int, s: int, groups: int, channels_inner: bool, sms: int, tile: int) -> _Launch:
    return _plan(n, c, s, groups, channels_inner, sms)  # tile: in the key only (tests cap it)


def _launch(n: int, c: int, s: int, groups: int, strides: tuple[int, int, int], device: torch.device) -> _Launch:
    """The launch parameters of a call, computed once per shape (host time is what small norms on a GPU are
    short of), or afresh while ``config.tuning`` replaces a choice."""
    channels_inner = strides[1] == 1 and s > 1
    sms = config.num_sms(device)
    if config.tuned():
        return _plan(n, c, s, groups, channels_inner, sms)
    return _cached_plan(n, c, s, groups, channels_inner, sms, config.tile_elements("sets"))


def set_forward(
    x: Tensor, groups: int, weight: Tensor | None, bias: Tensor | None, eps: float, silu: bool
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """GroupNorm (+ SiLU) of x (N, C, *) with ``groups`` groups: ``(y, mean, rstd, var)``, y in x's
    layout and dtype, the statistics float32 of shape (N, groups) (var: biased), the mean as (2, N, groups):
    a shift and the mean relative to it (their sum is the mean)."""
    xk, (n, c, s), strides = ncs_view(x)
    y = torch.empty_like(xk)
    stats = [torch.empty(shape, dtype=torch.float32, device=x.device) for shape in ((2, n, groups), (n, groups))]
    stats.append(torch.empty_like(stats[1]))
    p = _launch(n, c, s, groups, strides, x.device)
    w, b = weight if weight is not None else xk, bias if bias is not None else xk
    if p.splits == 1:
        _set_forward_kernel[(n * p.group_blocks,)](
            xk, y, w, b, *stats, groups, s, *strides, eps, p.group_blocks, n * groups,
            CG=p.cg, GROUPS=p.per_program, BLOCK_C=p.block_c, BLOCK_S=p.block_s,
            HAS_WEIGHT=weight is not None, HAS_BIAS=bias is not None, SILU=silu, num_warps=p.warps,
        )
        return (y, *stats)
    part = torch.empty((3, n * groups, p.splits), dtype=torch.float32, device=x.device)
    grid = (n * p.group_blocks, p.splits)
    _split_stats_kernel[grid](
        xk, stats[0], part, groups, s, *strides, p.group_blocks, n * groups, p.span,
        CG=p.cg, GROUPS=p.per_program, BLOCK_C=p.block_c, BLOCK_S=p.block_s, num_warps=p.warps,
    )
    _split_apply_kernel[grid](
        xk, y, w, b, part, *stats, groups, s, *strides, eps, p.group_blocks, n * groups, p.span,
        CG=p.cg, GROUPS=p.per_program, BLOCK_C=p.block_c, BLOCK_S=p.block_s,
        HAS_WEIGHT=weight is not None, HAS_BIAS=bias is not None, SILU=silu, num_warps=p.warps,
    )
    return (y, *stats)


def set_backward(
    dy: Tensor, x: Tensor, groups: int, weight: Tensor | None, bias: Tensor | None, mean: Tensor, rstd: Tensor,
    silu: bool, need_dw: bool, need_db: bool,
) -> tuple[Tensor, Tensor | None, Tensor | None]:
    """``(dx, dweight, dbias)`` of :func:`set_forward`: dx in x's layout and dtype, parameter gradients
    float32 (C,) or None when not asked for."""
    xk, (n, c, s), strides = ncs_view(x)
    dyk = like(dy, xk)
    dx = torch.empty_like(xk)
    need_dw = need_dw and weight is not None
    p = _launch(n, c, s, groups, strides, x.device)
    w, b = weight if weight is not None else mean, bias if bias is not None else mean
    flags = dict(CG=p.cg, GROUPS=p.per_program, BLOCK_C=p.block_c, BLOCK_S=p.block_s, HAS_WEIGHT=weight is not None,
                 HAS_BIAS=bias is not None, SILU=silu, num_warps=p.warps)
    if p.splits == 1:
        dw_part = torch.empty((n, c), dtype=torch.float32, device=x.device) if need_dw else None
        db_part = torch.empty((n, c), dtype=torch.float32, device=x.device) if need_db else None
        _set_backward_kernel[(n * p.group_blocks,)](
            dyk, xk, dx, w, b, mean, rstd, dw_part if dw_part is not None else mean,
            db_part if db_part is not None else mean, groups, c, s, *strides, p.group_blocks, n * groups, **flags,
            NEED_DW=need_dw, NEED_DB=need_db,
        )
    else:  # both sums feed c1 and c2, so both buffers are written whatever the caller needs
        dw_part, db_part = (torch.empty((n * p.splits, c), dtype=torch.float32, device=x.device) for _ in range(2))
        grid = (n * p.group_blocks, p.splits)
        args = (dw_part, db_part, groups, c, s, *strides, p.group_blocks, n * groups, p.span)
        _split_grads_kernel[grid](dyk, xk, w, b, mean, rstd, *args, **flags)
        _split_dx_kernel[grid](dyk, xk, dx, w, b, mean, rstd, *args, **flags)
    dw, db = sum_partials(dw_part if need_dw else None, db_part if need_db else None)
    return dx, dw, db
