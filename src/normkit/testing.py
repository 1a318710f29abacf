"""Comparison helpers shared by the test suite and ``normkit verify``.

Results are compared with a float64 *truth* (the reference computed on float64 copies of the inputs),
never with one global tolerance: each dtype has its own (:data:`TOLERANCES`), and where a same-precision
baseline exists (torch's own kernel on the same low-precision input) the bound is the three-way one used
by quack and flash-attention,

    |ours - truth| <= 2 * |baseline - truth| + atol + rtol * |truth|

so normkit may be as inexact as torch is on the same input, twice over, but not more.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

__all__ = ["Tolerance", "TOLERANCES", "Comparison", "tolerance", "compare", "assert_close"]


@dataclass(frozen=True)
class Tolerance:
    atol: float
    rtol: float


#: Per-dtype tolerances against a float64 truth, for outputs of unit scale (normalized values and
#: their gradients). Low-precision rows are a few units in the last place of the format:
#: bfloat16 has 8 significant bits (eps 7.8e-3), float16 11 (eps 9.8e-4).
TOLERANCES: dict[torch.dtype, Tolerance] = {
    torch.float64: Tolerance(atol=1e-10, rtol=1e-8),
    torch.float32: Tolerance(atol=2e-5, rtol=2e-5),
    torch.float16: Tolerance(atol=2e-3, rtol=2e-3),
    torch.bfloat16: Tolerance(atol=1.6e-2, rtol=1.6e-2),
}


def tolerance(dtype: torch.dtype) -> Tolerance:
    """The tolerance of ``dtype`` from :data:`TOLERANCES`."""
    return TOLERANCES[dtype]


@dataclass(frozen=True)
class Comparison:
    """Worst element of one comparison: its error, what was allowed there, and whether all passed."""

    max_error: float
    allowed: float
    ok: bool

    def __str__(self) -> str:
        return f"max error {self.max_error:.3g} (allowed {self.allowed:.3g}): {'ok' if self.ok else 'FAIL'}"


def compare(
    ours: Tensor, truth: Tensor, dtype: torch.dtype | None = None, baseline: Tensor | None = None
) -> Comparison:
    """Compare ``ours`` with the float64 ``truth`` under ``dtype``'s tolerance (default: ours' dtype).

    NaNs must sit at the same places in both; infinities must match exactly.
    """
    if ours.shape != truth.shape:
        raise AssertionError(f"shape {tuple(ours.shape)} != truth's {tuple(truth.shape)}")
    tol = tolerance(dtype or ours.dtype)
    o, t = ours.detach().to(torch.float64), truth.detach().to(torch.float64)
    if o.numel() == 0:
        return Comparison(0.0, tol.atol, True)
    nan_o, nan_t = torch.isnan(o), torch.isnan(t)
    if not torch.equal(nan_o, nan_t):
        return Comparison(float("nan"), tol.atol, False)
    finite = ~nan_t
    o, t = o[finite], t[finite]
    if o.numel() == 0:
        return Comparison(0.0, tol.atol, True)
    inf = torch.isinf(t) | torch.isinf(o)
    if not torch.equal(o[inf], t[inf]):
        return Comparison(float("inf"), tol.atol, False)
    o, t = o[~inf], t[~inf]
    err = (o - t).abs()
    allowed = tol.atol + tol.rtol * t.abs()
    if baseline is not None:
        b = baseline.detach().to(torch.float64)[finite][~inf]
        allowed = allowed + 2 * (b - t).abs()
    if err.numel() == 0:
        return Comparison(0.0, tol.atol, True)
    margin = err - allowed
    worst = int(torch.argmax(margin))
    return Comparison(float(err.max()), float(allowed[worst]), bool((margin <= 0).all()))


def assert_close(
    ours: Tensor, truth: Tensor, dtype: torch.dtype | None = None, baseline: Tensor | None = None, msg: str = ""
) -> None:
    """:func:`compare` that raises an ``AssertionError`` naming the worst element on failure."""
    result = compare(ours, truth, dtype, baseline)
    if not result.ok:
        raise AssertionError(f"{msg + ': ' if msg else ''}{result}")
