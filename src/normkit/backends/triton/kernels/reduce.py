"""Small kernels that finish reductions: fixed-order sums of per-program partials, and the in-place
update of BatchNorm/InstanceNorm running statistics.

Parameter gradients (and BatchNorm's per-channel sums) are first summed by many programs, each into its
own row of a ``(P, N)`` float32 buffer; :func:`sum_partials` then adds the P rows of each column in an
order fixed by P alone (a weight's and a bias's buffers in one launch). With no atomics anywhere the
result does not depend on which program finished first.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from .. import config

__all__ = ["sum_partials", "update_running_stats"]


@triton.jit
def _column_sums(P, OUT, num_rows, N, BLOCK_R: tl.constexpr, BLOCK_N: tl.constexpr):
    cols = tl.program_id(0).to(tl.int64) * BLOCK_N + tl.arange(0, BLOCK_N)
    col_mask = cols < N
    # BLOCK_R rows per step, so that many loads are in flight (one row per step left a program waiting
    # on memory latency P times: 528 rows on an H200); each lane of acc adds its
    # rows in order, and the lanes are added once at the end: a fixed order for a given P
    acc = tl.zeros([BLOCK_R, BLOCK_N], dtype=tl.float32)
    for r0 in range(0, num_rows, BLOCK_R):
        rows = r0 + tl.arange(0, BLOCK_R)
        mask = (rows < num_rows)[:, None] & col_mask[None, :]
        acc += tl.load(P + rows.to(tl.int64)[:, None] * N + cols[None, :], mask=mask, other=0.0)
    tl.store(OUT + cols, tl.sum(acc, axis=0), mask=col_mask)


@triton.jit
def _sum_partials_kernel(P, OUT, P2, OUT2, num_rows, N, BLOCK_R: tl.constexpr, BLOCK_N: tl.constexpr):
    # grid axis 1 picks the buffer: a weight's and a bias's partials are summed by one launch
    if tl.program_id(1) == 0:
        _column_sums(P, OUT, num_rows, N, BLOCK_R, BLOCK_N)
    else:
        _column_sums(P2, OUT2, num_rows, N, BLOCK_R, BLOCK_N)


def sum_partials(*partials: Tensor | None) -> tuple[Tensor | None, ...]:
    """Column sums of one or two contiguous float32 ``(P, N)`` buffers of one shape, in a fixed order,
    in one launch: a float32 ``(N,)`` for each buffer, None for each None (a launch costs host time,
    which small norms on a GPU are short of)."""
    given = [p for p in partials if p is not None]
    if len(given) > 2 or any(p.shape != given[0].shape for p in given):
        raise ValueError("sum_partials takes at most two buffers of one shape")
    if not given:
        return tuple(None for _ in partials)
    num_rows, n = given[0].shape
    outs = [torch.empty(n, dtype=torch.float32, device=p.device) for p in given]
    second = 1 if len(given) == 2 else 0
    block_n = min(64, config.next_power_of_2(max(n, 1)))
    block_r = min(32, config.next_power_of_2(max(num_rows, 1)))
    _sum_partials_kernel[(config.cdiv(n, block_n), len(given))](
        given[0], outs[0], given[second], outs[second], num_rows, n, BLOCK_R=block_r, BLOCK_N=block_n, num_warps=4
    )
    found = iter(outs)
    return tuple(None if p is None else next(found) for p in partials)


@triton.jit
def _update_running_kernel(
    RUNNING_MEAN, RUNNING_VAR, MEAN, VAR, C, momentum, unbias, BLOCK: tl.constexpr, PAIR: tl.constexpr
):
    c = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    mask = c < C
    mean = tl.load(MEAN + c, mask=mask, other=0.0)
    if PAIR:  # BatchNorm's (2, C) mean: a shift and the mean relative to it, added as torch's sum(0) would
        mean = mean + tl.load(MEAN + C + c, mask=mask, other=0.0)
    var = tl.load(VAR + c, mask=mask, other=0.0) * unbias
    rm = tl.load(RUNNING_MEAN + c, mask=mask, other=0.0).to(tl.float32)
    rv = tl.load(RUNNING_VAR + c, mask=mask, other=0.0).to(tl.float32)
    tl.store(RUNNING_MEAN + c, (rm * (1.0 - momentum) + mean * momentum).to(RUNNING_MEAN.dtype.element_ty), mask=mask)
    tl.store(RUNNING_VAR + c, (rv * (1.0 - momentum) + var * momentum).to(RUNNING_VAR.dtype.element_ty), mask=mask)


def update_running_stats(
    running_mean: Tensor, running_var: Tensor, mean: Tensor, var: Tensor, momentum: float, count: int
) -> None:
    """``running = (1 - momentum) * running + momentum * batch`` in place, with the variance made
    unbiased (times ``count / (count - 1)``), as :func:`normkit.reference.batch_norm` does.
    ``mean`` and ``var`` (the biased batch variance) are float32 ``(C,)``, or ``mean`` is BatchNorm's
    contiguous ``(2, C)`` pair, whose rows the kernel adds (no separate sum, one launch fewer); the
    running tensors keep their dtype. Non-contiguous running tensors are updated through a contiguous copy."""
    c = var.numel()
    block = min(1024, config.next_power_of_2(max(c, 1)))
    rm = running_mean if running_mean.is_contiguous() else running_mean.contiguous()
    rv = running_var if running_var.is_contiguous() else running_var.contiguous()
    _update_running_kernel[(config.cdiv(c, block),)](
        rm, rv, mean, var, c, float(momentum), count / max(count - 1, 1), BLOCK=block, PAIR=mean.dim() == 2,
        num_warps=4,
    )
    if rm is not running_mean:
        running_mean.copy_(rm)
    if rv is not running_var:
        running_var.copy_(rv)
