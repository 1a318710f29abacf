"""The conformance matrix: every normkit module against torch.nn, checked on a float64 truth.

A :class:`Case` is one module configuration (kind and constructor arguments) run on one input
(shape, dtype, memory format, value range) in one mode (train, or eval after a training step) under
one normkit backend on one device. :func:`run_case` builds the ``torch.nn`` module and the
``normkit.nn`` module with the same seeded random parameters and running statistics, runs forward
and backward (with a fixed random upstream gradient) through both, and compares normkit's

* output (value, dtype and memory layout),
* input gradient, parameter gradients (``weight``, ``bias``),
* running statistics after the step (``running_mean``, ``running_var``, ``num_batches_tracked``),

with the float64 *truth*: the ``torch.nn`` module converted with ``.double()``, run on the float64 copy
of the same input. Each quantity is judged by :func:`normkit.testing.compare` under the input dtype's
tolerance, with torch's own same-precision result as the baseline of the three-way bound, so normkit
may be as inexact as torch is on the same input (twice over) but not more.

Low-precision inputs (float16, bfloat16) run with float32 parameters and buffers, as in mixed-precision
training; the full matrix adds parameters in the input's own dtype.

Sizes, per backend and device (torch 2.13): 440 cases by default, 9056 with ``full=True`` (a superset
of the default). With the three built-in backends on 2 CPU cores the default matrix (1320 cases) runs
in about 13 seconds.

Python use::

    from normkit import verify
    results = verify.run(verify.build_matrix(full=False))
    assert all(r.ok for r in results)

The command line is ``normkit verify`` (:mod:`normkit.cli`).
"""

from __future__ import annotations

import copy
import itertools
import math
import time
import traceback
import warnings
import zlib
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from . import backends as _backends
from . import nn as _nn
from .nn._compat import TORCH_HAS_BIAS_KWARG
from .reference import LOW_PRECISION_DTYPES
from .testing import compare, tolerance

__all__ = [
    "DTYPES",
    "MODULES",
    "Case",
    "CaseResult",
    "Check",
    "GroupSummary",
    "available_devices",
    "build_matrix",
    "run",
    "run_case",
    "summarize",
]

#: the module kinds the matrix covers (names in both ``torch.nn`` and ``normkit.nn``)
MODULES: tuple[str, ...] = (
    "BatchNorm1d",
    "BatchNorm2d",
    "BatchNorm3d",
    "LayerNorm",
    "InstanceNorm1d",
    "InstanceNorm2d",
    "InstanceNorm3d",
    "GroupNorm",
    "RMSNorm",
    "SyncBatchNorm",  # in one process: BatchNorm (the multi-process checks are in the test suite)
)

#: input dtypes, by the names used on the command line and in results
DTYPES: dict[str, torch.dtype] = {
    "float32": torch.float32,
    "float64": torch.float64,
    "bfloat16": torch.bfloat16,
    "float16": torch.float16,
}
_DTYPE_NAMES = {v: k for k, v in DTYPES.items()}

_FORMATS = {
    "contiguous": torch.contiguous_format,
    "channels_last": torch.channels_last,
    "channels_last_3d": torch.channels_last_3d,
}

#: input value ranges: (scale, shift) of x = scale * N(0, 1) + shift
_DISTRIBUTIONS = {
    "normal": (2.0, 0.5),
    # |mean| >> std: catches E[x^2] - E[x]^2 cancellation in the statistics
    "offset": (1.0, 100.0),
}


def dtype_name(dtype: torch.dtype) -> str:
    """A dtype's name as used on the command line and in results (``float32``, ...)."""
    return _DTYPE_NAMES.get(dtype, str(dtype).removeprefix("torch."))


# --------------------------------------------------------------------------------------------------
# Cases and results
# --------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Case:
    """One cell of the matrix. ``kwargs`` is a sorted tuple of (name, value) pairs (hashable)."""

    module: str
    args: tuple
    kwargs: tuple[tuple[str, Any], ...]
    shape: tuple[int, ...]
    dtype: torch.dtype
    memory_format: str = "contiguous"
    train: bool = True
    backend: str = "reference"
    device: str = "cpu"
    #: dtype of parameters and buffers; None: float32 for low-precision input, else the input's
    param_dtype: torch.dtype | None = None
    distribution: str = "normal"

    @property
    def params_dtype(self) -> torch.dtype:
        if self.param_dtype is not None:
            return self.param_dtype
        return torch.float32 if self.dtype in LOW_PRECISION_DTYPES else self.dtype

    @property
    def mixed(self) -> bool:
        return self.params_dtype != self.dtype

    @property
    def dtype_label(self) -> str:
        """The input dtype, with the parameter dtype when it differs from mixed precision's default."""
        name = dtype_name(self.dtype)
        if self.dtype in LOW_PRECISION_DTYPES and not self.mixed:
            return f"{name} (params {name})"
        return name

    @property
    def constructor(self) -> str:
        parts = [repr(a) for a in self.args] + [f"{k}={v!r}" for k, v in self.kwargs]
        return f"{self.module}({', '.join(parts)})"

    @property
    def key(self) -> str:
        """Everything that decides the data and the math, not where it runs (the seed's source)."""
        return (
            f"{self.constructor} x{'x'.join(map(str, self.shape)) or 'scalar'} {self.dtype_label}"
            f" {self.memory_format} {'train' if self.train else 'eval'} {self.distribution}"
        )

    @property
    def id(self) -> str:
        return f"{self.key} @{self.backend}/{self.device}"

    @property
    def seed(self) -> int:
        return zlib.crc32(self.key.encode())

    def __str__(self) -> str:
        return self.id

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready dict of the fields."""
        return {
            "id": self.id,
            "module": self.module,
            "args": list(self.args),
            "kwargs": {k: v for k, v in self.kwargs},
            "shape": list(self.shape),
            "dtype": dtype_name(self.dtype),
            "param_dtype": dtype_name(self.params_dtype),
            "memory_format": self.memory_format,
            "mode": "train" if self.train else "eval",
            "distribution": self.distribution,
            "backend": self.backend,
            "device": self.device,
            "seed": self.seed,
        }


def _json_number(x: float) -> float | str:
    return x if math.isfinite(x) else str(x)


@dataclass(frozen=True)
class Check:
    """One quantity of one case: its worst error against the truth and what was allowed there.

    ``max_error`` and ``allowed`` are :func:`normkit.testing.compare`'s; ``ratio`` is the largest
    ``error / allowed`` over all elements (> 1 exactly where an element fails); ``torch_error`` is
    torch's own largest error against the truth (informational: it widens the bound, see
    :func:`normkit.testing.compare`); ``note`` says what else failed (dtype, layout, a missing
    gradient).
    """

    quantity: str
    max_error: float
    allowed: float
    ok: bool
    ratio: float = 0.0
    note: str = ""
    torch_error: float = 0.0

    def __str__(self) -> str:
        s = (
            f"{self.quantity}: max error {self.max_error:.3g} (allowed {self.allowed:.3g},"
            f" ratio {self.ratio:.3g}; torch's error {self.torch_error:.3g})"
        )
        if self.note:
            s += f"; {self.note}"
        return s + ("" if self.ok else "  FAIL")

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready dict of the fields."""
        return {
            "quantity": self.quantity,
            "max_error": _json_number(self.max_error),
            "allowed": _json_number(self.allowed),
            "ratio": _json_number(self.ratio),
            "torch_error": _json_number(self.torch_error),
            "ok": self.ok,
            "note": self.note,
        }


@dataclass
class CaseResult:
    case: Case
    checks: list[Check] = field(default_factory=list)
    #: the exception that stopped the case, if any (a failure)
    error: str | None = None
    #: the backend that actually ran normkit's forward (a backend may hand a tensor to the reference)
    executed_by: str | None = None
    seconds: float = 0.0

    @property
    def ok(self) -> bool:
        return self.error is None and bool(self.checks) and all(c.ok for c in self.checks)

    @property
    def failed_checks(self) -> list[Check]:
        return [c for c in self.checks if not c.ok]

    @property
    def worst(self) -> Check | None:
        """The check with the largest error/allowed ratio (NaN counts as worst)."""
        if not self.checks:
            return None
        return max(self.checks, key=lambda c: (not c.ok, _sort_ratio(c.ratio)))

    @property
    def worst_ratio(self) -> float:
        if self.error is not None:
            return math.inf
        w = self.worst
        return 0.0 if w is None else w.ratio

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready dict of the fields."""
        return {
            **self.case.to_dict(),
            "ok": self.ok,
            "error": self.error,
            "executed_by": self.executed_by,
            "seconds": round(self.seconds, 6),
            "worst_ratio": _json_number(self.worst_ratio),
            "checks": [c.to_dict() for c in self.checks],
        }


def _sort_ratio(r: float) -> float:
    return math.inf if math.isnan(r) else r


# --------------------------------------------------------------------------------------------------
# The matrix
# --------------------------------------------------------------------------------------------------


def available_devices() -> list[str]:
    """``cpu``, and ``cuda`` when torch sees a GPU."""
    return ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


def _kw(**kwargs: Any) -> tuple[tuple[str, Any], ...]:
    return tuple(sorted(kwargs.items()))


@dataclass(frozen=True)
class _Spec:
    """Module configurations (one kind and its positional args, several kwargs variants) × shapes."""

    module: str
    args: tuple
    variants: tuple[tuple[tuple[str, Any], ...], ...]
    shapes: tuple[tuple[int, ...], ...]
    #: also run an input far from zero (|mean| >> std); the full matrix always does
    offset: bool = False
    #: also run low-precision input with parameters in its own dtype; the full matrix always does
    pure_low_precision: bool = False


def _spec(module: str, args: tuple, variants: list, shapes: list, **opts: bool) -> _Spec:
    return _Spec(module, args, tuple(variants), tuple(shapes), **opts)


def _bias_off(**kw: Any) -> list[tuple[tuple[str, Any], ...]]:
    """``bias=False`` for BatchNorm/InstanceNorm/GroupNorm, where the installed torch has it."""
    return [_kw(**kw, bias=False)] if TORCH_HAS_BIAS_KWARG else []


def _default_specs() -> list[_Spec]:
    """A representative subset: every module, every constructor variant and input kind at least once."""
    tracked = _kw(affine=True, track_running_stats=True)
    both = {"offset": True, "pure_low_precision": True}
    return [
        _spec("BatchNorm1d", (7,), [_kw(), _kw(momentum=None)], [(16, 7), (4, 7, 13)]),
        _spec("BatchNorm1d", (7,), [_kw(affine=False), _kw(track_running_stats=False)], [(4, 7, 13)]),
        _spec("BatchNorm2d", (6,), [_kw()], [(4, 6, 5, 7)], **both),
        _spec("BatchNorm2d", (3,), [_kw(eps=1e-3, momentum=0.3), *_bias_off()], [(2, 3, 11, 13)]),
        _spec("BatchNorm2d", (32,), [_kw()], [(8, 32, 4, 4)]),
        _spec("BatchNorm3d", (4,), [_kw()], [(2, 4, 3, 5, 7)]),
        _spec("SyncBatchNorm", (6,), [_kw(), _kw(momentum=None)], [(4, 6, 5, 7), (16, 6)]),
        _spec("LayerNorm", (64,), [_kw()], [(4, 13, 64)], **both),
        _spec("LayerNorm", (17,), [_kw(), _kw(elementwise_affine=False), _kw(bias=False)], [(5, 17)]),
        _spec("LayerNorm", ((7, 11),), [_kw()], [(3, 5, 7, 11)]),
        _spec("LayerNorm", (4099,), [_kw()], [(2, 4099)]),
        _spec("RMSNorm", (64,), [_kw()], [(4, 13, 64)], **both),
        _spec("RMSNorm", (17,), [_kw(eps=1e-6), _kw(elementwise_affine=False)], [(5, 17)]),
        _spec("RMSNorm", (1000,), [_kw()], [(3, 1000)]),
        _spec("GroupNorm", (3, 6), [_kw()], [(4, 6, 5, 7)], **both),
        _spec("GroupNorm", (4, 8), [_kw()], [(3, 8, 17)]),
        _spec("GroupNorm", (1, 6), [_kw()], [(2, 6, 3, 4, 5)]),
        _spec("GroupNorm", (6, 6), [_kw()], [(2, 6, 9)]),
        _spec("GroupNorm", (5, 15), [_kw(affine=False), *_bias_off()], [(2, 15, 7, 3)]),
        _spec("InstanceNorm1d", (5,), [_kw(), tracked], [(3, 5, 17)]),
        _spec("InstanceNorm1d", (5,), [_kw(affine=True)], [(5, 17)]),  # unbatched
        _spec("InstanceNorm2d", (3,), [_kw(), tracked], [(2, 3, 7, 9)], **both),
        # N = 1, channels_last: torch's own input gradient is wrong here (see _run)
        _spec("InstanceNorm2d", (3,), [tracked], [(1, 3, 2, 2)]),
        _spec("InstanceNorm3d", (3,), [_kw(), tracked], [(2, 3, 3, 5, 7)]),
    ]


def _full_specs() -> list[_Spec]:
    """The exhaustive sweep: every variant of every module on several shapes each (a superset of the
    default's configurations and shapes)."""
    bn = [
        _kw(),
        _kw(affine=False),
        _kw(track_running_stats=False),
        _kw(momentum=None),
        _kw(eps=1e-3, momentum=0.3),
        *_bias_off(),
    ]
    inorm = [
        _kw(),
        _kw(affine=True),
        _kw(track_running_stats=True),
        _kw(affine=True, track_running_stats=True),
        _kw(affine=True, track_running_stats=True, momentum=None),
        *_bias_off(affine=True),
    ]
    ln = [_kw(), _kw(elementwise_affine=False), _kw(bias=False), _kw(eps=1e-3)]
    rms = [_kw(), _kw(eps=1e-6), _kw(elementwise_affine=False)]
    gn = [_kw(), _kw(affine=False), _kw(eps=1e-3), *_bias_off()]
    return [
        _spec("BatchNorm1d", (7,), bn, [(16, 7), (2, 7), (4, 7, 13), (1, 7, 31), (3, 7, 1)]),
        _spec("BatchNorm1d", (64,), bn, [(8, 64, 33)]),
        _spec("BatchNorm2d", (6,), bn, [(4, 6, 5, 7), (1, 6, 3, 3), (5, 6, 1, 1)]),
        _spec("BatchNorm2d", (3,), bn, [(2, 3, 11, 13)]),
        _spec("BatchNorm2d", (32,), bn, [(8, 32, 4, 4)]),
        _spec("BatchNorm3d", (4,), bn, [(2, 4, 3, 5, 7), (1, 4, 2, 2, 2)]),
        _spec("BatchNorm3d", (5,), bn, [(3, 5, 2, 3, 11)]),
        _spec("SyncBatchNorm", (6,), bn, [(4, 6, 5, 7), (16, 6), (2, 6, 3, 4, 5)]),
        _spec("LayerNorm", (64,), ln, [(4, 13, 64)]),
        _spec("LayerNorm", (17,), ln, [(5, 17), (17,), (2, 3, 5, 17)]),
        _spec("LayerNorm", ((7, 11),), ln, [(3, 5, 7, 11), (7, 11)]),
        _spec("LayerNorm", (1,), ln, [(6, 1)]),
        _spec("LayerNorm", (1000,), ln, [(3, 1000)]),
        _spec("LayerNorm", (4099,), ln, [(2, 4099)]),
        _spec("RMSNorm", (64,), rms, [(4, 13, 64)]),
        _spec("RMSNorm", (17,), rms, [(5, 17), (17,), (2, 3, 5, 17)]),
        _spec("RMSNorm", ((7, 11),), rms, [(3, 5, 7, 11)]),
        _spec("RMSNorm", (1000,), rms, [(3, 1000)]),
        _spec("RMSNorm", (4099,), rms, [(2, 4099)]),
        _spec("GroupNorm", (3, 6), gn, [(4, 6, 5, 7), (2, 6, 9), (2, 6, 3, 4, 5), (3, 6)]),
        _spec("GroupNorm", (1, 6), gn, [(4, 6, 5, 7), (2, 6, 3, 4, 5)]),
        _spec("GroupNorm", (6, 6), gn, [(4, 6, 5, 7), (2, 6, 9)]),
        _spec("GroupNorm", (4, 8), gn, [(3, 8, 17)]),
        _spec("GroupNorm", (5, 15), gn, [(2, 15, 7, 3)]),
        _spec("GroupNorm", (32, 64), gn, [(2, 64, 8, 8)]),
        _spec("InstanceNorm1d", (5,), inorm, [(3, 5, 17), (1, 5, 2), (5, 17)]),
        _spec("InstanceNorm1d", (16,), inorm, [(4, 16, 129)]),
        _spec("InstanceNorm2d", (3,), inorm, [(2, 3, 7, 9), (1, 3, 2, 2), (3, 7, 9)]),
        _spec("InstanceNorm2d", (8,), inorm, [(2, 8, 16, 16)]),
        _spec("InstanceNorm3d", (3,), inorm, [(2, 3, 3, 5, 7), (3, 2, 2, 3)]),
    ]


def _formats(shape: tuple[int, ...]) -> list[str]:
    if len(shape) == 4:
        return ["contiguous", "channels_last"]
    if len(shape) == 5:
        return ["contiguous", "channels_last_3d"]
    return ["contiguous"]


def _is_batch_norm(module: str) -> bool:
    return module.startswith("BatchNorm") or module == "SyncBatchNorm"


def _modes(module: str, kwargs: tuple, full: bool) -> list[bool]:
    if full:
        return [True, False]
    kw = dict(kwargs)
    if _is_batch_norm(module) and kw.get("track_running_stats", True):
        return [True, False]
    if module.startswith("InstanceNorm") and kw.get("track_running_stats", False):
        return [True, False]
    return [True]


def _has_state(module: str, kwargs: tuple) -> bool:
    """Whether the module holds any floating parameter or buffer (else the param dtype is moot)."""
    kw = dict(kwargs)
    if _is_batch_norm(module):
        return kw.get("affine", True) or kw.get("track_running_stats", True)
    if module.startswith("InstanceNorm"):
        return kw.get("affine", False) or kw.get("track_running_stats", False)
    if module == "GroupNorm":
        return kw.get("affine", True)
    return kw.get("elementwise_affine", True)


def _lookup_dtype(d: str | torch.dtype) -> torch.dtype:
    if isinstance(d, torch.dtype):
        return d
    try:
        return DTYPES[d]
    except KeyError:
        raise ValueError(f"unknown dtype {d!r}; choose from {', '.join(DTYPES)}") from None


def build_matrix(
    full: bool = False,
    backends: Sequence[str] | None = None,
    devices: Sequence[str] | None = None,
    dtypes: Sequence[str | torch.dtype] | None = None,
    modules: Sequence[str] | None = None,
) -> list[Case]:
    """The cases to run: the default representative subset, or with ``full`` the exhaustive sweep.

    ``backends`` defaults to :func:`normkit.available_backends`, ``devices`` to
    :func:`available_devices`; ``dtypes`` (names or torch dtypes) and ``modules`` filter the matrix.

    Both sizes cross each module configuration and shape with float32, float64, bfloat16 and float16
    input (low precision with float32 parameters, as in mixed-precision training), with contiguous
    and channels_last (channels_last_3d) layouts for 4-D (5-D) input, on every backend and device.

    * Default: a representative subset that runs in seconds: every module kind and every
      constructor variant (affine/bias off, no running statistics, momentum=None, eps) at least
      once, a few shapes (odd and prime sizes, a long row, N = 1, unbatched), train, plus eval
      (after one training step) where there are running statistics; for one configuration of
      BatchNorm2d, LayerNorm, RMSNorm, GroupNorm and InstanceNorm2d also an input far from zero
      (|mean| >> std) and low-precision parameters.
    * Full: the exhaustive sweep (minutes): every variant × more shapes, train and eval for every
      module, both value ranges, and low-precision parameters wherever there are parameters or buffers.
    """
    backends = list(_backends.available_backends() if backends is None else backends)
    devices = list(available_devices() if devices is None else devices)
    want_dtypes = [_lookup_dtype(d) for d in (dtypes if dtypes is not None else DTYPES.values())]
    if modules is not None:
        names = {m.lower(): m for m in MODULES}
        unknown = [m for m in modules if m.lower() not in names]
        if unknown:
            raise ValueError(f"unknown module {unknown[0]!r}; choose from {', '.join(MODULES)}")
        want_modules = {names[m.lower()] for m in modules}
    else:
        want_modules = set(MODULES)

    cases: list[Case] = []
    for spec in _full_specs() if full else _default_specs():
        if spec.module not in want_modules:
            continue
        dists = list(_DISTRIBUTIONS) if full or spec.offset else ["normal"]
        for kwargs in spec.variants:
            for shape in spec.shapes:
                for dtype in want_dtypes:
                    modes = _modes(spec.module, kwargs, full)
                    for device in devices:
                        param_dtypes = _param_dtypes(spec, kwargs, dtype, device, full)
                        for param_dtype, fmt, train, dist, backend in itertools.product(
                            param_dtypes, _formats(shape), modes, dists, backends
                        ):
                            cases.append(
                                Case(spec.module, spec.args, kwargs, shape, dtype, fmt, train, backend, device,
                                     param_dtype, dist)
                            )
    return cases


#: torch's CUDA kernels of these modules take parameters in the input's dtype only ("expected scalar
#: type BFloat16 but found Float"), so on CUDA their 16-bit cases hold 16-bit parameters
_SAME_DTYPE_ON_CUDA = ("LayerNorm", "GroupNorm")


def _param_dtypes(spec, kwargs, dtype: torch.dtype, device: str, full: bool) -> list[torch.dtype | None]:
    """The parameter dtypes a case runs with (None: mixed precision's default, see :class:`Case`)."""
    low_with_state = dtype in LOW_PRECISION_DTYPES and _has_state(spec.module, kwargs)
    if device == "cuda" and spec.module in _SAME_DTYPE_ON_CUDA:
        return [dtype] if low_with_state else [None]
    if low_with_state and (full or spec.pure_low_precision):
        return [None, dtype]
    return [None]


# --------------------------------------------------------------------------------------------------
# Running one case
# --------------------------------------------------------------------------------------------------


def _randomize(module: torch.nn.Module, gen: torch.Generator) -> None:
    """Seeded parameters and running statistics, away from their trivial initial values."""
    with torch.no_grad():
        for name, p in module.named_parameters():
            r = torch.randn(p.shape, generator=gen, dtype=torch.float64)
            p.copy_(1.0 + 0.5 * r if name == "weight" else 0.5 * r)
        for name, b in module.named_buffers():
            if name == "running_mean":
                b.copy_(0.5 * torch.randn(b.shape, generator=gen, dtype=torch.float64))
            elif name == "running_var":
                b.copy_(0.5 + 1.5 * torch.rand(b.shape, generator=gen, dtype=torch.float64))
            elif name == "num_batches_tracked":
                b.fill_(2)


def _sample(case: Case, gen: torch.Generator) -> Tensor:
    scale, shift = _DISTRIBUTIONS[case.distribution]
    return (scale * torch.randn(case.shape, generator=gen, dtype=torch.float64) + shift).to(case.dtype)


def _layout(x: Tensor, case: Case, device: str | torch.device) -> Tensor:
    x = x.to(device)
    if case.memory_format != "contiguous":
        x = x.contiguous(memory_format=_FORMATS[case.memory_format])
    return x


@dataclass
class _Outcome:
    output: Tensor
    grad_input: Tensor | None
    grads: dict[str, Tensor | None]
    buffers: dict[str, Tensor]


def _step(module: torch.nn.Module, x: Tensor, dy: Tensor) -> _Outcome:
    x = x.detach().clone().requires_grad_(True)
    y = module(x)
    y.backward(dy)
    return _Outcome(
        output=y.detach(),
        grad_input=x.grad,
        grads={n: p.grad for n, p in module.named_parameters()},
        buffers={n: b.detach().clone() for n, b in module.named_buffers()},
    )


def _ratio_and_torch_error(
    ours: Tensor, truth: Tensor, dtype: torch.dtype, baseline: Tensor
) -> tuple[float, float]:
    """(max over elements of |ours - truth| / allowed with compare()'s bound, max |baseline - truth|),
    over the elements finite in ours, truth and baseline."""
    tol = tolerance(dtype)
    o, t, b = ours.detach().double(), truth.detach().double(), baseline.detach().double()
    finite = torch.isfinite(o) & torch.isfinite(t) & torch.isfinite(b)
    if not bool(finite.any()):
        return 0.0, 0.0
    o, t, b = o[finite], t[finite], b[finite]
    torch_err = (b - t).abs()
    allowed = tol.atol + tol.rtol * t.abs() + 2 * torch_err
    return float(((o - t).abs() / allowed).max()), float(torch_err.max())


def _check(
    quantity: str,
    ours: Tensor | None,
    truth: Tensor | None,
    baseline: Tensor | None,
    dtype: torch.dtype,
    *,
    layout: bool = False,
) -> Check:
    if ours is None or truth is None or baseline is None:
        if ours is None and baseline is None:
            return Check(quantity, 0.0, 0.0, True, 0.0, "absent in both")
        missing = "normkit" if ours is None else "torch" if baseline is None else "the float64 truth"
        return Check(quantity, math.nan, math.nan, False, math.nan, f"missing in {missing}")
    notes = []
    if ours.shape != baseline.shape:
        return Check(quantity, math.nan, math.nan, False, math.nan,
                     f"shape {tuple(ours.shape)} != torch's {tuple(baseline.shape)}")
    if ours.dtype != baseline.dtype:
        notes.append(f"dtype {dtype_name(ours.dtype)} != torch's {dtype_name(baseline.dtype)}")
    if layout and not _same_layout(ours, baseline):
        notes.append(f"strides {ours.stride()} != torch's {baseline.stride()}")
    if ours.dtype in (torch.int64, torch.int32):  # num_batches_tracked: exact
        equal = torch.equal(ours.cpu(), baseline.cpu()) and torch.equal(ours.cpu(), truth.cpu())
        err = float((ours.cpu() - truth.cpu()).abs().max()) if ours.numel() else 0.0
        if not equal:
            notes.append(f"{ours.tolist()} != torch's {baseline.tolist()}")
        return Check(quantity, err, 0.0, equal and not notes, 0.0 if equal else math.inf, "; ".join(notes))
    o, t, b = ours.cpu(), truth.cpu(), baseline.cpu()
    result = compare(o, t, dtype=dtype, baseline=b)
    ratio, torch_err = _ratio_and_torch_error(o, t, dtype, b)
    if result.ok:
        ratio = min(ratio, 1.0)  # compare() is the judge; the ratio only grades
    else:
        ratio = max(ratio, 1.0 + 1e-12)
        if not math.isfinite(result.max_error):
            ratio = math.inf
            notes.append("NaN/Inf at different places than the truth")
    return Check(quantity, result.max_error, result.allowed, result.ok and not notes, ratio,
                 "; ".join(notes), torch_err)


def _same_layout(a: Tensor, b: Tensor) -> bool:
    """Same memory layout: equal strides along every dim of size > 1 (a size-1 dim's is arbitrary)."""
    return all(sa == sb for n, sa, sb in zip(a.shape, a.stride(), b.stride(), strict=True) if n > 1)


def _run(case: Case) -> tuple[list[Check], str]:
    gen = torch.Generator().manual_seed(case.seed)
    device = torch.device(case.device)
    torch_cls = getattr(torch.nn, case.module)
    ours_cls = getattr(_nn, case.module)
    kwargs = dict(case.kwargs)

    seed_module = torch_cls(*case.args, **kwargs)
    _randomize(seed_module, gen)
    pdt = case.params_dtype
    base = copy.deepcopy(seed_module).to(device=device, dtype=pdt)
    truth = copy.deepcopy(base).to(device="cpu", dtype=torch.float64)  # the rounded parameters, exactly
    if case.module == "RMSNorm" and truth.eps is None:
        # eps=None means float32's machine epsilon for every input but float64 (float64's)
        truth.eps = torch.finfo(torch.float64 if case.dtype == torch.float64 else torch.float32).eps
    ours = ours_cls(*case.args, **kwargs)
    ours.load_state_dict(seed_module.state_dict())
    ours = ours.to(device=device, dtype=pdt)

    x = _sample(case, gen)
    dy = torch.randn(case.shape, generator=gen, dtype=torch.float64).to(case.dtype)
    warm = _sample(case, gen)
    x_dev, dy_dev, warm_dev = _layout(x, case, device), _layout(dy, case, device), _layout(warm, case, device)
    # The truth runs on contiguous CPU copies: its job is the exact math, which does not depend on
    # the layout, and torch's own kernels have layout bugs (on CPU, InstanceNorm's input gradient is
    # wrong for N = 1 with a channels_last upstream gradient, torch 2.13), which a same-layout truth
    # would share with the baseline and so blame on normkit.
    x64, dy64, warm64 = x.double(), dy.double(), warm.double()

    with _backends.use_backend(case.backend):
        executed_by = _backends.resolve(x_dev).name
    if not case.train:
        # one training step so the running statistics are the modules' own, then eval
        with torch.no_grad():
            base.train()(warm_dev)
            truth.train()(warm64)
            with _backends.use_backend(case.backend):
                ours.train()(warm_dev)
        base.eval(), truth.eval(), ours.eval()
    else:
        base.train(), truth.train(), ours.train()

    try:
        b = _step(base, x_dev, dy_dev)
        t = _step(truth, x64, dy64)
    except Exception as e:
        raise RuntimeError(f"torch itself failed on this case (harness bug): {type(e).__name__}: {e}") from e
    with _backends.use_backend(case.backend):
        o = _step(ours, x_dev, dy_dev)

    dt = case.dtype
    checks = [
        _check("output", o.output, t.output, b.output, dt, layout=True),
        _check("grad_input", o.grad_input, t.grad_input, b.grad_input, dt),
    ]
    # parameter gradients and running statistics are judged in their own dtype (float32 with
    # low-precision input), not the input's
    for name in sorted(set(b.grads) | set(o.grads)):
        checks.append(_check(f"grad_{name}", o.grads.get(name), t.grads.get(name), b.grads.get(name), pdt))
    for name in sorted(set(b.buffers) | set(o.buffers)):
        checks.append(_check(name, o.buffers.get(name), t.buffers.get(name), b.buffers.get(name), pdt))
    return checks, executed_by


def run_case(case: Case) -> CaseResult:
    """Run one case; an exception in normkit is recorded as the case's failure, not raised."""
    start = time.perf_counter()
    result = CaseResult(case)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # e.g. torch's "Mismatch dtype ... fused implementation"
            result.checks, result.executed_by = _run(case)
    except Exception as e:  # noqa: BLE001 - every failure is a result
        tb = traceback.extract_tb(e.__traceback__)
        where = f" (at {tb[-1].filename}:{tb[-1].lineno})" if tb else ""
        result.error = f"{type(e).__name__}: {e}{where}"
    result.seconds = time.perf_counter() - start
    return result


def run(
    cases: Iterable[Case],
    progress: Callable[[CaseResult], None] | None = None,
    *,
    threads: int | None = 1,
) -> list[CaseResult]:
    """Run every case in order; ``progress`` is called with each result as it completes.

    ``threads`` sets torch's intra-op CPU threads for the run (restored afterwards; None leaves
    torch's setting). The default is 1: the matrix's tensors are below torch's parallel grain size,
    so more threads only add overhead, and on a loaded machine (e.g. beside a test run) the
    oversubscribed threads slowed the matrix tenfold.
    """
    saved = torch.get_num_threads()
    if threads is not None:
        torch.set_num_threads(threads)
    try:
        results = []
        for case in cases:
            r = run_case(case)
            results.append(r)
            if progress is not None:
                progress(r)
        return results
    finally:
        if threads is not None:
            torch.set_num_threads(saved)


# --------------------------------------------------------------------------------------------------
# Summaries
# --------------------------------------------------------------------------------------------------


@dataclass
class GroupSummary:
    """The results of one module × dtype × backend × device group."""

    module: str
    dtype: str
    backend: str
    device: str
    cases: int = 0
    checks: int = 0
    failed_cases: int = 0
    failed_checks: int = 0
    worst_ratio: float = 0.0
    worst_quantity: str = ""
    worst_case: str = ""
    #: the worst check's largest |normkit - truth|
    worst_error: float = 0.0
    #: the input dtype's tolerance, as "atol/rtol"
    tolerance: str = ""
    seconds: float = 0.0

    @property
    def ok(self) -> bool:
        return self.failed_cases == 0

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready dict of the fields."""
        d = dict(self.__dict__)
        for k in ("worst_ratio", "worst_error"):
            d[k] = _json_number(d[k])
        d["ok"] = self.ok
        return d


def summarize(results: Sequence[CaseResult]) -> list[GroupSummary]:
    """Results grouped by module × dtype × backend × device, sorted in :data:`MODULES`' order."""
    groups: dict[tuple[str, str, str, str], GroupSummary] = {}
    first: dict[tuple[str, str, str, str], Case] = {}
    for r in results:
        c = r.case
        key = (c.module, c.dtype_label, c.backend, c.device)
        g = groups.get(key)
        if g is None:
            tol = tolerance(c.dtype)
            g = groups[key] = GroupSummary(*key, tolerance=f"{tol.atol:.2g}/{tol.rtol:.2g}")
            first[key] = c
        g.cases += 1
        g.checks += len(r.checks)
        g.seconds += r.seconds
        g.failed_checks += len(r.failed_checks) + (r.error is not None)
        g.failed_cases += not r.ok
        ratio = r.worst_ratio
        if _sort_ratio(ratio) > _sort_ratio(g.worst_ratio) or not g.worst_case:
            g.worst_ratio = ratio
            g.worst_quantity = "exception" if r.error else (r.worst.quantity if r.worst else "")
            g.worst_case = c.id
            g.worst_error = r.worst.max_error if r.worst and not r.error else math.nan
    dtype_order = list(DTYPES.values())

    def order(g: GroupSummary) -> tuple:
        c = first[(g.module, g.dtype, g.backend, g.device)]
        return (MODULES.index(c.module) if c.module in MODULES else len(MODULES), c.module,
                dtype_order.index(c.dtype) if c.dtype in dtype_order else len(dtype_order),
                not c.mixed and c.dtype in LOW_PRECISION_DTYPES, c.device, c.backend)

    return sorted(groups.values(), key=order)


def count_checks(results: Sequence[CaseResult]) -> tuple[int, int]:
    """(checks run, checks failed); a case stopped by an exception counts as one failed check."""
    total = sum(len(r.checks) + (r.error is not None) for r in results)
    failed = sum(len(r.failed_checks) + (r.error is not None) for r in results)
    return total, failed
