"""Triton helpers shared by the row and channel kernels: merging partial moments, SiLU and its slope."""

from __future__ import annotations

import triton
import triton.language as tl

from .. import config


@triton.jit
def chan_merge(mean_a, m2_a, n_a, mean_b, m2_b, n_b):
    """Chan et al.'s pairwise update: the (mean, M2, count) of two disjoint sets from each set's own.

    M2 is the sum of squared deviations from the mean. Merging means, never raw sums of squares, keeps
    the variance exact when |mean| >> std (E[x^2] - E[x]^2 would cancel). Counts are float32.
    """
    n = n_a + n_b
    delta = mean_b - mean_a
    frac = n_b / tl.maximum(n, 1.0)
    return mean_a + delta * frac, m2_a + m2_b + delta * delta * n_a * frac, n


@triton.jit
def silu(z):
    """``silu(z) = z * s(z)``, s the logistic sigmoid."""
    return z * tl.sigmoid(z)


@triton.jit
def silu_slope(z):
    """``silu'(z) = s + z * s * (1 - s) = s * (1 + z * (1 - s))`` (docs/fused.md)."""
    s = tl.sigmoid(z)
    return s * (1.0 + z * (1.0 - s))


# The interpreter (TRITON_INTERPRET=1) rounds float32 -> bfloat16 toward zero, where GPUs round to
# nearest even. Under the interpreter only, round by hand so that tests see what a GPU computes.
_ROUND_BY_HAND = tl.constexpr(config.INTERPRET)


@triton.jit
def rounded(v, dtype: tl.constexpr):
    """float32 ``v`` converted to ``dtype``, rounding to nearest even."""
    if _ROUND_BY_HAND and dtype == tl.bfloat16:
        u = v.to(tl.uint32, bitcast=True)
        u = (u + (((u >> 16) & 1) + 0x7FFF)) & 0xFFFF0000
        return tl.where(v != v, v, u.to(tl.float32, bitcast=True)).to(dtype)
    else:
        return v.to(dtype)
