r"""Row kernels: LayerNorm and RMSNorm over the last dimension of an (M, N) view, with an optional
residual add in front (``h = x + residual``, rounded to x's dtype, is normalized and returned).

Forward, one program per tile of ``BLOCK_M`` rows:

* ``ONE_TILE`` (N fits :func:`~normkit.backends.triton.config.max_block`): the tile is loaded once and
  kept in registers; mean, then the variance about it (passes over registers, not over memory).
* otherwise one row per program, two passes over memory in column blocks: statistics (RMSNorm: a
  vector of float32 sums of squares; LayerNorm: each block's mean and M2, merged with Chan's formula),
  then the output. The second pass reads the row again, from L2 for rows of up to a few hundred KB.

LayerNorm's mean is kept as a pair, ``shift`` (a float32 mean: of the row, or of its first block) and
the mean of ``x - shift``, stored as a (2, M) tensor; ``x - shift`` is exact for x near its mean, so
``((x - shift) - mean_d) * rstd`` keeps the bits that one float32 mean would lose when |mean| >> std
(1e4 + N(0, 0.01): an error of 0.1 in the output otherwise).

Backward (``docs/backward.md``), with :math:`g = dy \cdot w`, :math:`c_1 = \overline{g}`,
:math:`c_2 = \overline{g \hat x}`: :math:`dx = \mathrm{rstd}\,(g - c_1 - \hat x c_2)` (RMSNorm: no
:math:`c_1`), plus ``dh`` (the gradient reaching ``h`` from outside) for the fused adds. A fixed number of
programs each walks every ``G``-th row tile and sums ``dy * xhat`` and ``dy`` for its rows into its own row
of a ``(G, N)`` float32 buffer (in registers for one-tile rows, read-modify-write per column block
otherwise); :func:`~normkit.backends.triton.kernels.reduce.sum_partials` adds the G rows in a fixed order.
No atomics: the same input gives the same bits.

All statistics and sums are float32; offsets are int64, so tensors past 2**31 elements work.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from .. import config
from .common import chan_merge, rounded
from .reduce import sum_partials

__all__ = ["row_forward", "row_backward"]


@triton.jit
def _act(G, mask, GATE: tl.constexpr):
    """The gate's activation in float32: ``GATE`` 1, SiLU; 2, sigmoid."""
    g = tl.load(G, mask=mask, other=0.0).to(tl.float32)
    if GATE == 1:
        return g / (1.0 + tl.exp(-g))
    return 1.0 / (1.0 + tl.exp(-g))


@triton.jit
def _gated(y, G, mask, ROUND_FIRST: tl.constexpr, GATE: tl.constexpr, y_type: tl.constexpr):
    """The gated norms' last step: ``y · act(gate)`` in float32, with y first rounded to the output's
    dtype when ``ROUND_FIRST`` (Qwen3-Next rounds its Llama-style norm)."""
    if ROUND_FIRST:
        y = rounded(y, y_type).to(tl.float32)
    return y * _act(G, mask, GATE)


@triton.jit
def _param_tile(P, rows, cols, mask, N, wgroups, GROUPED: tl.constexpr):
    """A weight or bias for a tile, float32, of the tile's shape: one vector for every row, or (``GROUPED``,
    groups of a longer row as rows) the ``(row % wgroups)``-th N of a weight over the whole row."""
    if GROUPED:
        p = tl.load(P + (rows % wgroups)[:, None] * N + cols[None, :], mask=mask, other=0.0).to(tl.float32)
    else:
        p = tl.broadcast_to(tl.load(P + cols, mask=cols < N, other=0.0).to(tl.float32)[None, :], mask.shape)
    return p


@triton.jit
def _row_forward_kernel(
    X, R, H, Y, W, B, MEAN, RSTD, G,
    M, N, stride_x, stride_r, stride_h, stride_y, stride_g, eps, wgroups,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, ONE_TILE: tl.constexpr,
    RMS: tl.constexpr, HAS_RESIDUAL: tl.constexpr, HAS_WEIGHT: tl.constexpr, HAS_BIAS: tl.constexpr,
    ROUND_FIRST: tl.constexpr, ROUND_RSTD: tl.constexpr, GATE: tl.constexpr, GATE_FIRST: tl.constexpr,
    GROUPED: tl.constexpr,
):
    rows = tl.program_id(0).to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)
    row_mask = rows < M
    cols = tl.arange(0, BLOCK_N)
    x_rows = X + rows[:, None] * stride_x
    r_rows = R + rows[:, None] * stride_r
    h_rows = H + rows[:, None] * stride_h
    y_rows = Y + rows[:, None] * stride_y
    g_rows = G + rows[:, None] * stride_g
    if ONE_TILE:
        mask = row_mask[:, None] & (cols < N)[None, :]
        x = tl.load(x_rows + cols[None, :], mask=mask, other=0.0).to(tl.float32)
        if GATE_FIRST:  # the gated row is normalized (Mamba-2's order)
            x = x * _act(g_rows + cols[None, :], mask, GATE)
        if HAS_RESIDUAL:
            h = rounded(x + tl.load(r_rows + cols[None, :], mask=mask, other=0.0).to(tl.float32), H.dtype.element_ty)
            tl.store(h_rows + cols[None, :], h, mask=mask)
            x = h.to(tl.float32)  # the norm of h as rounded, as the unfused ops compute it
        if RMS:
            rstd = tl.math.rsqrt(tl.sum(x * x, axis=1) / N + eps)
            if ROUND_RSTD:  # the scale rounded to y's dtype before it multiplies x (DeepSeek-V4's order)
                xhat = x * rounded(rstd, Y.dtype.element_ty).to(tl.float32)[:, None]
            else:
                xhat = x * rstd[:, None]
        else:
            shift = tl.sum(x, axis=1) / N
            d = tl.where(mask, x - shift[:, None], 0.0)  # exact where x is near its mean (Sterbenz)
            mean_d = tl.sum(d, axis=1) / N  # what float32 rounding took from the mean
            xc = tl.where(mask, d - mean_d[:, None], 0.0)
            rstd = tl.math.rsqrt(tl.sum(xc * xc, axis=1) / N + eps)
            xhat = xc * rstd[:, None]
            tl.store(MEAN + rows, shift, mask=row_mask)
            tl.store(MEAN + M + rows, mean_d, mask=row_mask)
        tl.store(RSTD + rows, rstd, mask=row_mask)
        y = xhat
        if ROUND_FIRST:  # the normalized value rounded to y's dtype before the weight (HF Llama's order)
            y = rounded(y, Y.dtype.element_ty).to(tl.float32)
        if HAS_WEIGHT:
            y = y * _param_tile(W, rows, cols, mask, N, wgroups, GROUPED)
        if HAS_BIAS:
            y = y + _param_tile(B, rows, cols, mask, N, wgroups, GROUPED)
        if GATE != 0 and not GATE_FIRST:
            y = _gated(y, g_rows + cols[None, :], mask, ROUND_FIRST, GATE, Y.dtype.element_ty)
        tl.store(y_rows + cols[None, :], rounded(y, Y.dtype.element_ty), mask=mask)
    else:
        # pass 1: statistics over column blocks (and h = x + residual, stored for pass 2 to read). LayerNorm
        # works on x - shift, the shift being the first block's mean, so that a large mean keeps its bits
        sumsq = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
        mean = tl.zeros([BLOCK_M], dtype=tl.float32)
        m2 = tl.zeros([BLOCK_M], dtype=tl.float32)
        if not RMS:
            first = row_mask[:, None] & (cols < N)[None, :]
            x = tl.load(x_rows + cols[None, :], mask=first, other=0.0).to(tl.float32)
            if GATE_FIRST:
                x = x * _act(g_rows + cols[None, :], first, GATE)
            if HAS_RESIDUAL:
                x = rounded(x + tl.load(r_rows + cols[None, :], mask=first, other=0.0).to(tl.float32),
                            H.dtype.element_ty).to(tl.float32)
            shift = tl.sum(x, axis=1) / BLOCK_N
        for start in range(0, N, BLOCK_N):
            c = start + cols
            mask = row_mask[:, None] & (c < N)[None, :]
            x = tl.load(x_rows + c[None, :], mask=mask, other=0.0).to(tl.float32)
            if GATE_FIRST:
                x = x * _act(g_rows + c[None, :], mask, GATE)
            if HAS_RESIDUAL:
                h = rounded(x + tl.load(r_rows + c[None, :], mask=mask, other=0.0).to(tl.float32), H.dtype.element_ty)
                tl.store(h_rows + c[None, :], h, mask=mask)
                x = h.to(tl.float32)
            if RMS:
                sumsq += x * x
            else:
                count = tl.cast(tl.minimum(N - start, BLOCK_N), tl.float32)
                x = tl.where(mask, x - shift[:, None], 0.0)
                block_mean = tl.sum(x, axis=1) / count
                xc = tl.where(mask, x - block_mean[:, None], 0.0)
                block_m2 = tl.sum(xc * xc, axis=1)
                mean, m2, _ = chan_merge(mean, m2, tl.cast(start, tl.float32), block_mean, block_m2, count)
        if RMS:
            rstd = tl.math.rsqrt(tl.sum(sumsq, axis=1) / N + eps)
        else:
            rstd = tl.math.rsqrt(m2 / N + eps)
            tl.store(MEAN + rows, shift, mask=row_mask)
            tl.store(MEAN + M + rows, mean, mask=row_mask)
        tl.store(RSTD + rows, rstd, mask=row_mask)
        if HAS_RESIDUAL:
            tl.debug_barrier()  # h written by other threads of this program is read back below
        # pass 2: the output
        for start in range(0, N, BLOCK_N):
            c = start + cols
            mask = row_mask[:, None] & (c < N)[None, :]
            if HAS_RESIDUAL:
                x = tl.load(h_rows + c[None, :], mask=mask, other=0.0).to(tl.float32)
            else:
                x = tl.load(x_rows + c[None, :], mask=mask, other=0.0).to(tl.float32)
            if GATE_FIRST:
                x = x * _act(g_rows + c[None, :], mask, GATE)
            if RMS and ROUND_RSTD:
                y = x * rounded(rstd, Y.dtype.element_ty).to(tl.float32)[:, None]
            elif RMS:
                y = x * rstd[:, None]
            else:
                y = ((x - shift[:, None]) - mean[:, None]) * rstd[:, None]
            if ROUND_FIRST:
                y = rounded(y, Y.dtype.element_ty).to(tl.float32)
            if HAS_WEIGHT:
                y = y * _param_tile(W, rows, c, mask, N, wgroups, GROUPED)
            if HAS_BIAS:
                y = y + _param_tile(B, rows, c, mask, N, wgroups, GROUPED)
            if GATE != 0 and not GATE_FIRST:
                y = _gated(y, g_rows + c[None, :], mask, ROUND_FIRST, GATE, Y.dtype.element_ty)
            tl.store(y_rows + c[None, :], rounded(y, Y.dtype.element_ty), mask=mask)


@triton.jit
def _row_backward_kernel(
    DY, X, DH, DX, W, MEAN, RSTD, DW_PART, DB_PART,
    M, N, stride_dy, stride_x, stride_dh, stride_dx, num_tiles,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, ONE_TILE: tl.constexpr,
    RMS: tl.constexpr, HAS_DH: tl.constexpr, HAS_WEIGHT: tl.constexpr,
    NEED_DW: tl.constexpr, NEED_DB: tl.constexpr,
):
    pid = tl.program_id(0)
    programs = tl.num_programs(0)
    cols = tl.arange(0, BLOCK_N)
    part_row = pid.to(tl.int64) * N
    if ONE_TILE:
        col_mask = cols < N
        if HAS_WEIGHT:
            w = tl.load(W + cols, mask=col_mask, other=0.0).to(tl.float32)[None, :]
        dw_acc = tl.zeros([BLOCK_N], dtype=tl.float32)
        db_acc = tl.zeros([BLOCK_N], dtype=tl.float32)
        for tile in range(pid, num_tiles, programs):
            rows = tl.cast(tile, tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)
            row_mask = rows < M
            mask = row_mask[:, None] & col_mask[None, :]
            x = tl.load(X + rows[:, None] * stride_x + cols[None, :], mask=mask, other=0.0).to(tl.float32)
            dy = tl.load(DY + rows[:, None] * stride_dy + cols[None, :], mask=mask, other=0.0).to(tl.float32)
            rstd = tl.load(RSTD + rows, mask=row_mask, other=0.0)
            if RMS:
                xhat = x * rstd[:, None]
            else:
                shift = tl.load(MEAN + rows, mask=row_mask, other=0.0)
                mean_d = tl.load(MEAN + M + rows, mask=row_mask, other=0.0)
                xhat = tl.where(mask, ((x - shift[:, None]) - mean_d[:, None]) * rstd[:, None], 0.0)
            g = dy * w if HAS_WEIGHT else dy
            c2 = tl.sum(g * xhat, axis=1) / N
            if RMS:
                dx = (g - xhat * c2[:, None]) * rstd[:, None]
            else:
                c1 = tl.sum(g, axis=1) / N
                dx = (g - c1[:, None] - xhat * c2[:, None]) * rstd[:, None]
            if HAS_DH:
                dx += tl.load(DH + rows[:, None] * stride_dh + cols[None, :], mask=mask, other=0.0).to(tl.float32)
            tl.store(DX + rows[:, None] * stride_dx + cols[None, :], rounded(dx, DX.dtype.element_ty), mask=mask)
            if NEED_DW:
                dw_acc += tl.sum(dy * xhat, axis=0)
            if NEED_DB:
                db_acc += tl.sum(dy, axis=0)
        if NEED_DW:
            tl.store(DW_PART + part_row + cols, dw_acc, mask=col_mask)
        if NEED_DB:
            tl.store(DB_PART + part_row + cols, db_acc, mask=col_mask)
    else:
        # one row per tile; the partial sums live in this program's row of the (G, N) buffers
        for r in range(pid, M, programs):
            row = tl.cast(r, tl.int64)  # a new name: the loop variable itself stays int32
            x_row = X + row * stride_x
            dy_row = DY + row * stride_dy
            rstd = tl.load(RSTD + row)
            if not RMS:
                shift = tl.load(MEAN + row)
                mean_d = tl.load(MEAN + M + row)
            c1_acc = tl.zeros([BLOCK_N], dtype=tl.float32)
            c2_acc = tl.zeros([BLOCK_N], dtype=tl.float32)
            for start in range(0, N, BLOCK_N):  # pass 1: c1 and c2
                c = start + cols
                mask = c < N
                x = tl.load(x_row + c, mask=mask, other=0.0).to(tl.float32)
                dy = tl.load(dy_row + c, mask=mask, other=0.0).to(tl.float32)
                xhat = x * rstd if RMS else tl.where(mask, ((x - shift) - mean_d) * rstd, 0.0)
                g = dy * tl.load(W + c, mask=mask, other=0.0).to(tl.float32) if HAS_WEIGHT else dy
                c1_acc += g
                c2_acc += g * xhat
            c1 = tl.sum(c1_acc, axis=0) / N
            c2 = tl.sum(c2_acc, axis=0) / N
            for start in range(0, N, BLOCK_N):  # pass 2: dx and the partial parameter gradients
                c = start + cols
                mask = c < N
                x = tl.load(x_row + c, mask=mask, other=0.0).to(tl.float32)
                dy = tl.load(dy_row + c, mask=mask, other=0.0).to(tl.float32)
                xhat = x * rstd if RMS else tl.where(mask, ((x - shift) - mean_d) * rstd, 0.0)
                g = dy * tl.load(W + c, mask=mask, other=0.0).to(tl.float32) if HAS_WEIGHT else dy
                dx = (g - xhat * c2) * rstd if RMS else (g - c1 - xhat * c2) * rstd
                if HAS_DH:
                    dx += tl.load(DH + row * stride_dh + c, mask=mask, other=0.0).to(tl.float32)
                tl.store(DX + row * stride_dx + c, rounded(dx, DX.dtype.element_ty), mask=mask)
                if NEED_DW:
                    part = DW_PART + part_row + c
                    tl.store(part, tl.load(part, mask=mask, other=0.0) + dy * xhat, mask=mask)
                if NEED_DB:
                    part = DB_PART + part_row + c
                    tl.store(part, tl.load(part, mask=mask, other=0.0) + dy, mask=mask)


def _rows(t: Tensor, n: int) -> Tensor:
    """``t`` as an (M, n) matrix whose rows are contiguous (a view when possible, else a copy)."""
    t2 = t.reshape(-1, n)
    return t2 if t2.stride(-1) == 1 or n == 1 else t2.contiguous()


#: the gate activations of :func:`row_forward` (``GATE`` in the kernel)
GATES = {"silu": 1, "sigmoid": 2}


def row_forward(
    x: Tensor, residual: Tensor | None, weight: Tensor | None, bias: Tensor | None, n: int, eps: float, rms: bool,
    round_first: bool = False, round_rstd: bool = False, gate: Tensor | None = None, gate_act: str = "silu",
    gate_first: bool = False, weight_groups: int = 1,
) -> tuple[Tensor, Tensor | None, Tensor | None, Tensor]:
    """Normalize each row of n elements: ``(y, h, mean, rstd)`` with y and h (x + residual, or None) of
    shape (M, n) in x's dtype, rstd float32 (M,) and mean float32 (2, M) (None for RMSNorm): a shift and
    the mean relative to it, whose sum is the mean to more bits than one float32 holds. ``round_first``:
    the normalized value is rounded to x's dtype before the weight multiplies it; ``round_rstd``
    (RMSNorm without parameters): the scale is rounded to x's dtype before it multiplies x (rstd is
    returned unrounded). ``gate`` (x's shape and dtype; not with a residual or ``round_rstd``): y is
    ``round(v · act(gate))`` in float32, v the norm before its last rounding (after it with
    ``round_first``), ``act`` the ``gate_act`` of :data:`GATES`; with ``gate_first``, y is the norm of
    ``x · act(gate)``. ``weight_groups``: the weight and bias have ``weight_groups · n`` elements, row i
    taking the ``(i % weight_groups)``-th n (groups of n of a longer row, a weight over the whole row)."""
    x2 = _rows(x, n)
    m = x2.shape[0]
    y = torch.empty((m, n), dtype=x.dtype, device=x.device)
    r2 = _rows(residual, n) if residual is not None else None
    h = torch.empty_like(y) if residual is not None else None
    mean = None if rms else torch.empty((2, m), dtype=torch.float32, device=x.device)
    rstd = torch.empty(m, dtype=torch.float32, device=x.device)
    g2 = _rows(gate, n) if gate is not None else None
    block_m, block_n, one_tile = config.row_config(n, x.dtype)
    grid = (config.cdiv(m, block_m),)
    _row_forward_kernel[grid](
        x2, r2 if r2 is not None else x2, h if h is not None else y, y,
        weight if weight is not None else rstd, bias if bias is not None else rstd,
        mean if mean is not None else rstd, rstd, g2 if g2 is not None else x2,
        m, n, x2.stride(0), r2.stride(0) if r2 is not None else 0, n, n, g2.stride(0) if g2 is not None else 0, eps,
        weight_groups, BLOCK_M=block_m, BLOCK_N=block_n, ONE_TILE=one_tile, RMS=rms, HAS_RESIDUAL=residual is not None,
        HAS_WEIGHT=weight is not None, HAS_BIAS=bias is not None, ROUND_FIRST=round_first, ROUND_RSTD=round_rstd,
        GATE=GATES[gate_act] if gate is not None else 0, GATE_FIRST=gate_first, GROUPED=weight_groups > 1,
        num_warps=config.row_warps(block_m, block_n),
    )
    return y, h, mean, rstd


def row_backward(
    dy: Tensor, xh: Tensor, dh: Tensor | None, weight: Tensor | None, mean: Tensor | None, rstd: Tensor,
    n: int, rms: bool, need_dw: bool, need_db: bool,
) -> tuple[Tensor, Tensor | None, Tensor | None]:
    """``(dx, dweight, dbias)`` for :func:`row_forward`: dx (M, n) in xh's dtype (``+ dh`` when given),
    parameter gradients float32 (n,) or None when not asked for."""
    x2, dy2 = _rows(xh, n), _rows(dy, n)
    dh2 = _rows(dh, n) if dh is not None else None
    m = x2.shape[0]
    dx = torch.empty((m, n), dtype=xh.dtype, device=xh.device)
    block_m, block_n, one_tile = config.row_config(n, xh.dtype)
    num_tiles = config.cdiv(m, block_m)
    programs = config.row_backward_programs(num_tiles, one_tile, xh.device)
    need_dw = need_dw and weight is not None
    part_shape = (programs, n)
    alloc = torch.empty if one_tile else torch.zeros
    dw_part = alloc(part_shape, dtype=torch.float32, device=xh.device) if need_dw else None
    db_part = alloc(part_shape, dtype=torch.float32, device=xh.device) if need_db else None
    _row_backward_kernel[(programs,)](
        dy2, x2, dh2 if dh2 is not None else dy2, dx, weight if weight is not None else rstd,
        mean if mean is not None else rstd, rstd,
        dw_part if dw_part is not None else rstd, db_part if db_part is not None else rstd,
        m, n, dy2.stride(0), x2.stride(0), dh2.stride(0) if dh2 is not None else 0, n, num_tiles,
        BLOCK_M=block_m, BLOCK_N=block_n, ONE_TILE=one_tile, RMS=rms, HAS_DH=dh is not None,
        HAS_WEIGHT=weight is not None, NEED_DW=need_dw, NEED_DB=need_db,
        num_warps=config.row_warps(block_m, block_n),
    )
    dw, db = sum_partials(dw_part, db_part)
    return dx, dw, db
